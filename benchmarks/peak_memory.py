"""Peak memory of ``secateurs prune`` with and without a memory budget (``--max-memory``), same plan.

Every run is a fresh process (``python -m secateurs prune ...``); its peak resident set size is read by a
wrapper process from ``getrusage(RUSAGE_CHILDREN)`` (the largest RSS the child reached, file-backed pages
included). The budget is a quarter of the model's float32 size (``--budget-fraction``). For each method the
unbudgeted and budgeted runs are compared: the plan (``plan.json`` layers), the removed blocks, the saved weights
(bitwise), the perplexities and, for a search, every step's loss (``order.json``) must be identical; the goal is a
budgeted peak of at most 40% of the unbudgeted.

    python benchmarks/peak_memory.py --model gemma3-270m --nsamples 4 --seqlen 256 --eval-rows 4 \\
        --json benchmarks/results/peak_memory_gemma3-270m.json --md benchmarks/results/peak_memory_gemma3-270m.md

Peak RSS is not affected by other processes' load (only time is); the results file records what else ran.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WRAPPER = """
import json, resource, subprocess, sys, time
t0 = time.time()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": r.returncode, "peak_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "wall_s": time.time() - t0, "stdout": r.stdout[-4000:], "stderr": r.stderr[-4000:]}))
"""

METHODS = {"flap": ["--method", "flap", "--ratio", "0.2"], "blockpruner": ["--method", "blockpruner", "--steps", "2"]}


def float32_bytes(model: str) -> int:
    """The model's size in float32: every parameter once (a tied head counted once), from its meta skeleton."""
    from transformers import AutoConfig

    from secateurs.sources import resolve
    from secateurs.runtime.estimate import model_sizes
    from secateurs.runtime.loading import _meta_model

    import torch

    folder = resolve(model, progress=False)
    return model_sizes(_meta_model(AutoConfig.from_pretrained(folder), torch.float32), torch.float32).weights


def others() -> list[str]:
    """What else was running (the busiest processes)."""
    r = subprocess.run(["ps", "-eo", "pcpu,rss,args", "--sort=-pcpu"], capture_output=True, text=True)
    return [line[:160] for line in r.stdout.splitlines()[1:8]]


def run(cmd: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                                TOKENIZERS_PARALLELISM="false"))
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if out["rc"] != 0:
        raise SystemExit(f"failed ({out['rc']}): {' '.join(cmd)}\n{out['stderr']}")
    return out


def same_weights(a: Path, b: Path) -> bool:
    """Bitwise, one tensor at a time (two 1.5B checkpoints at once would need 13 GB)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(a / "model.safetensors"), "pt") as fa, safe_open(str(b / "model.safetensors"), "pt") as fb:
        keys = set(fa.keys())
        return keys == set(fb.keys()) and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in sorted(keys))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--methods", default="flap,blockpruner")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-rows", type=int, default=4)
    p.add_argument("--budget-fraction", type=float, default=0.25, help="budget = this fraction of the float32 size")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    a = p.parse_args()

    budget = int(float32_bytes(a.model) * a.budget_fraction)
    rows, results = [], {"settings": vars(a) | {"budget_bytes": budget, "threads": os.environ.get("OMP_NUM_THREADS"),
                                                  "cpu": platform.processor() or platform.machine()},
                         "others_before": others(), "load_before": os.getloadavg(), "runs": {}}
    work = Path(tempfile.mkdtemp(prefix="secateurs-peak-"))
    try:
        for method in a.methods.split(","):
            base = [sys.executable, "-m", "secateurs", "prune", a.model, *METHODS[method], "--nsamples", str(a.nsamples),
                    "--seqlen", str(a.seqlen), "--eval-rows", str(a.eval_rows), "--quiet"]
            got = {}
            for tag, extra in (("unbudgeted", []), ("budgeted", ["--max-memory", str(budget)])):
                out = work / f"{method}-{tag}"
                cmd = [*base, "--out", str(out), *extra]
                print(f"running: {' '.join(cmd[1:])}", flush=True)
                r = run(cmd)
                res = json.loads((out / "result.json").read_text())
                got[tag] = {"command": "python " + " ".join(cmd[1:]).replace(str(work) + "/", ""), "peak_rss_mb": r["peak_rss_kb"] / 1024,
                            "wall_s": r["wall_s"], "placement": res.get("placement"), "removed_blocks": res["removed_blocks"],
                            "ratio": res["ratio_achieved"], "ppl_calib_after": res["ppl_calib_after"],
                            "ppl_test_after": res["ppl_test_after"], "estimates": res.get("estimates"),
                            "plan_layers": json.loads((out / "plan.json").read_text())["layers"],
                            "order": [(st["removed"], st["loss"]) for st in json.loads((out / "order.json").read_text())["steps"]]
                            if (out / "order.json").exists() else None}
                print(f"  peak RSS {got[tag]['peak_rss_mb']:.0f} MB, {r['wall_s']:.0f} s", flush=True)
            u, b = got["unbudgeted"], got["budgeted"]
            same = {"plan": u["plan_layers"] == b["plan_layers"], "removed_blocks": u["removed_blocks"] == b["removed_blocks"],
                    "weights": same_weights(work / f"{method}-unbudgeted", work / f"{method}-budgeted"),
                    "perplexities": (u["ppl_calib_after"], u["ppl_test_after"]) == (b["ppl_calib_after"], b["ppl_test_after"])}
            if u["order"] is not None:
                same["search order and losses (bitwise)"] = u["order"] == b["order"]
            for g in (u, b):
                del g["plan_layers"]
            ratio = b["peak_rss_mb"] / u["peak_rss_mb"]
            results["runs"][method] = {"unbudgeted": u, "budgeted": b, "identical": same, "peak_ratio": ratio,
                                       "goal_met": ratio <= 0.40 and all(same.values())}
            rows.append((method, u["peak_rss_mb"], b["peak_rss_mb"], ratio, same))
            print(f"{method}: {u['peak_rss_mb']:.0f} MB -> {b['peak_rss_mb']:.0f} MB ({ratio:.1%}); identical {same}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["others_after"] = others()
    results["load_after"] = os.getloadavg()
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=1))
    if a.md:
        lines = [f"# Peak memory of `prune {a.model}` with and without `--max-memory` ({time.strftime('%Y-%m-%d')})", "",
                 f"Budget: {budget:,} bytes = {a.budget_fraction} of the model's float32 size; calibration {a.nsamples} x "
                 f"{a.seqlen}, {a.eval_rows} held-out rows; peak RSS of a fresh process (getrusage of the child).", "",
                 "| method | unbudgeted peak RSS | budgeted peak RSS | ratio | plan, weights, perplexities identical |",
                 "| --- | ---: | ---: | ---: | --- |"]
        for method, u, b, ratio, same in rows:
            lines.append(f"| {method} | {u:.0f} MB | {b:.0f} MB | **{ratio:.1%}** | {'yes' if all(same.values()) else same} |")
        lines += ["", "Commands:", ""]
        for method in results["runs"]:
            for tag in ("unbudgeted", "budgeted"):
                lines.append(f"    {results['runs'][method][tag]['command']}")
        lines += ["", f"Load average before / after: {results['load_before']} / {results['load_after']}.",
                  "Busiest other processes before the runs:", ""] + [f"    {x}" for x in results["others_before"]]
        Path(a.md).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
