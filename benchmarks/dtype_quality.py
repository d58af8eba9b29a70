"""Working precision on the CPU: ``prune`` and ``eval`` SmolLM2 in float32 and in bfloat16 (``--dtype``), same
method, ratio and calibration; the perplexities side by side and the size of the saved folders.

    python benchmarks/dtype_quality.py --model smollm2-135m --method flap --ratio 0.2 \\
        --md benchmarks/results/dtype_smollm2-135m.md --json benchmarks/results/dtype_smollm2-135m.json

Goals (issue 11): the bfloat16 perplexities within 2% of float32, the bfloat16 folder half the size.
Perplexity does not depend on machine load; the results file records what else ran.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def others() -> list[str]:
    r = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True, text=True)
    return [line[:160] for line in r.stdout.splitlines()[1:8]]


def secateurs(*args) -> str:
    cmd = [sys.executable, "-m", "secateurs", *args]
    print("running: secateurs " + " ".join(args), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return r.stdout


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="flap")
    p.add_argument("--ratio", default="0.2")
    p.add_argument("--nsamples", default="32")
    p.add_argument("--seqlen", default="512")
    p.add_argument("--eval-rows", default="32", help="rows of wiki:test for `secateurs eval` (512 tokens each)")
    p.add_argument("--md", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="secateurs-dtype-"))
    out = {"settings": vars(a), "others_before": others(), "load_before": os.getloadavg(), "runs": {}}
    try:
        for dtype in ("float32", "bfloat16"):
            folder = work / dtype
            prune = ["prune", a.model, "--method", a.method, "--ratio", a.ratio, "--nsamples", a.nsamples, "--seqlen",
                     a.seqlen, "--dtype", dtype, "--quiet", "--out", str(folder)]
            secateurs(*prune)
            res = json.loads((folder / "result.json").read_text())
            ev = ["eval", str(folder), "--ppl", "wiki:test,lambada", "--rows", a.eval_rows, "--dtype", dtype, "--quiet",
                  "--json", str(work / f"eval-{dtype}.json")]
            secateurs(*ev)
            e = json.loads((work / f"eval-{dtype}.json").read_text())
            weights = (folder / "model.safetensors").stat().st_size
            out["runs"][dtype] = {
                "prune": "secateurs " + " ".join(prune).replace(str(work) + "/", ""),
                "eval": "secateurs " + " ".join(ev).replace(str(work) + "/", ""),
                "ppl_calib_before": res["ppl_calib_before"], "ppl_calib_after": res["ppl_calib_after"],
                "ppl_test_before": res["ppl_test_before"], "ppl_test_after": res["ppl_test_after"],
                "eval_ppl": {k: v["ppl"] for k, v in e["ppl"].items()}, "removed_blocks": res["removed_blocks"],
                "ratio": res["ratio_achieved"], "search_seconds": res["search_seconds"],
                "weights_bytes": weights, "folder_bytes": folder_bytes(folder),
                "saved_dtype": json.loads((folder / "config.json").read_text()).get("dtype")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    f, b = out["runs"]["float32"], out["runs"]["bfloat16"]
    rel = {k: b["eval_ppl"][k] / f["eval_ppl"][k] - 1 for k in f["eval_ppl"]}
    rel["prune: calib after"] = b["ppl_calib_after"] / f["ppl_calib_after"] - 1
    rel["prune: wiki:test after"] = b["ppl_test_after"] / f["ppl_test_after"] - 1
    out["relative_ppl_difference"] = rel
    out["weights_size_ratio"] = b["weights_bytes"] / f["weights_bytes"]
    out["folder_size_ratio"] = b["folder_bytes"] / f["folder_bytes"]
    out["goals_met"] = {"ppl_within_2pct": all(abs(v) <= 0.02 for v in rel.values()),
                        "half_size": out["weights_size_ratio"] <= 0.5 + 1e-3}
    out["others_after"], out["load_after"] = others(), os.getloadavg()
    text = json.dumps(out, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text)
    if a.md:
        lines = [f"# {a.model} pruned and evaluated in float32 and in bfloat16 on the CPU", "",
                 f"{a.method} to {a.ratio}, calibration wiki {a.nsamples} x {a.seqlen} (seed 0); `eval`: "
                 f"{a.eval_rows} rows of 512 tokens per set.", "",
                 "| | float32 | bfloat16 | bfloat16 / float32 - 1 |", "| --- | ---: | ---: | ---: |"]
        for k in f["eval_ppl"]:
            lines.append(f"| eval {k} ppl (pruned) | {f['eval_ppl'][k]:.3f} | {b['eval_ppl'][k]:.3f} | {rel[k]:+.2%} |")
        lines.append(f"| prune: calib ppl after | {f['ppl_calib_after']:.3f} | {b['ppl_calib_after']:.3f} | "
                     f"{rel['prune: calib after']:+.2%} |")
        lines.append(f"| prune: wiki:test ppl after (16 x 512) | {f['ppl_test_after']:.3f} | {b['ppl_test_after']:.3f} | "
                     f"{rel['prune: wiki:test after']:+.2%} |")
        lines.append(f"| dense wiki:test ppl (16 x 512) | {f['ppl_test_before']:.3f} | {b['ppl_test_before']:.3f} | "
                     f"{b['ppl_test_before'] / f['ppl_test_before'] - 1:+.2%} |")
        lines.append(f"| model.safetensors | {f['weights_bytes'] / 2**20:.1f} MiB | {b['weights_bytes'] / 2**20:.1f} MiB | "
                     f"x{out['weights_size_ratio']:.3f} |")
        lines.append(f"| whole folder | {f['folder_bytes'] / 2**20:.1f} MiB | {b['folder_bytes'] / 2**20:.1f} MiB | "
                     f"x{out['folder_size_ratio']:.3f} |")
        lines += ["", f"Same removed blocks: {f['removed_blocks'] == b['removed_blocks']}; ratios {f['ratio']:.4f} / "
                  f"{b['ratio']:.4f}; config.json dtype: {f['saved_dtype']} / {b['saved_dtype']}.", "", "Commands:", ""]
        for r in (f, b):
            lines += [f"    {r['prune']}", f"    {r['eval']}"]
        lines += ["", f"Load average before / after: {out['load_before']} / {out['load_after']}. Busiest other "
                  "processes before:", ""] + [f"    {x}" for x in out["others_before"]]
        Path(a.md).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
