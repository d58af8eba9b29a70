"""Depth pruning quality: blockpruner, shortgpt and sleb on one model at one target ratio, same calibration
for all three. Runs the CLI for each method (``secateurs prune``, then ``secateurs eval``; finished outputs
are reused, so the script resumes), then measures prefill latency of every pruned model against the dense
one in the same process (alternating), and writes a Markdown table with the commands.

    python benchmarks/depth_quality.py smollm2-135m --ratio 0.25 --nsamples 4 --seqlen 256 --rows 8
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

METHODS = ("blockpruner", "shortgpt", "sleb")


def sh(cmd: list[str], log) -> None:
    log(f"$ {shlex.join(cmd)}")
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", "src")))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--rows", type=int, default=8, help="wiki:test rows of 512 tokens for the perplexity")
    p.add_argument("--prompt", type=int, default=256, help="prefill prompt length")
    p.add_argument("--rounds", type=int, default=3, help="alternating latency rounds (5 timed passes each)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--runs", default="runs/depth", help="where pruned models go")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    runs = Path(a.runs) / a.model
    runs.mkdir(parents=True, exist_ok=True)
    commands = []
    py = [sys.executable, "-m", "secateurs"]
    names = ["dense"] + a.methods.split(",")
    for name in names:
        out = runs / name
        if name != "dense":
            cmd = py + ["prune", a.model, "--method", name, "--ratio", str(a.ratio), "--nsamples", str(a.nsamples),
                        "--seqlen", str(a.seqlen), "--eval", "", "--quiet", "--out", str(out)]
            commands.append(cmd)
            if not (out / "result.json").exists():
                sh(cmd, print)
        target = a.model if name == "dense" else str(out)
        ev = runs / f"{name}.eval.json"
        cmd = py + ["eval", target, "--ppl", "wiki:test", "--seqlen", "512", "--rows", str(a.rows), "--quiet", "--json", str(ev)]
        commands.append(cmd)
        if not ev.exists():
            sh(cmd, print)

    import torch

    from secateurs.eval.bench import prefill_ms
    from secateurs.sources import load_model

    models = {n: load_model(a.model if n == "dense" else str(runs / n), progress=False)[0] for n in names}
    times = {n: [] for n in names}
    for _ in range(a.rounds):
        for n in names:
            times[n].append(prefill_ms(models[n], a.prompt, reps=5, warmup=1))
    lat = {n: statistics.median(v) for n, v in times.items()}
    rows = []
    for n in names:
        ppl = json.loads((runs / f"{n}.eval.json").read_text())["ppl"]["wiki:test"]["ppl"]
        res = json.loads((runs / n / "result.json").read_text()) if n != "dense" else None
        rows.append({"method": n, "ratio": res["ratio_achieved"] if res else 0.0, "ppl": ppl,
                     "removed": res["removed_blocks"] if res else [], "search_s": res["search_seconds"] if res else 0.0,
                     "calib_ppl": res["ppl_calib_after"] if res else None, "prefill_ms": lat[n],
                     "speedup": lat["dense"] / lat[n]})
    lines = [f"# Depth pruning on {a.model} at target ratio {a.ratio}", "",
             f"Calibration: wiki (= wiki:calib), {a.nsamples} rows of {a.seqlen} tokens, seed 0, the same rows for every "
             f"method. Perplexity: wiki:test, first {a.rows} rows of 512 tokens (BOS per row where the model needs it). "
             f"Prefill: CPU ({torch.get_num_threads()} threads, machine shared with other jobs), float32, batch 1, "
             f"{a.prompt}-token prompt, median over {a.rounds} alternating rounds of the median of 5 timed passes "
             "(1 warm-up); speedup = dense / pruned in the same process.", "",
             "| method | ratio achieved | wiki:test ppl | calib ppl | prefill ms | prefill speedup | search s | removed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        calib = f"{r['calib_ppl']:.2f}" if r["calib_ppl"] is not None else "-"
        lines.append(f"| {r['method']} | {r['ratio']:.4f} | {r['ppl']:.2f} | {calib} | {r['prefill_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['search_s']:.0f} | {' '.join(r['removed'])} |")
    lines += ["", "Commands (PYTHONPATH=src, from the repository root):", "", "```"]
    lines += [shlex.join(["python"] + c[1:]) for c in commands]
    lines += [shlex.join(["python"] + sys.argv), "```", ""]
    path = Path(a.out) / f"depth_{a.model}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    (Path(a.out) / f"depth_{a.model}.json").write_text(json.dumps({"settings": vars(a), "rows": rows, "prefill_ms_all": times}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
