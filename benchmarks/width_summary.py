"""Prints the markdown rows of benchmarks/results/width_smollm2.md from the run folders of width_table.sh.
Usage: python benchmarks/width_summary.py runs/width"""
import json
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/width")
dense = json.loads((root / "dense_eval.json").read_text())["ppl"]["wiki:test"]["ppl"]
print("| method | ratio | wiki:test PPL | calib PPL | method s | search loop s | fitness evals | best vs uniform fitness; LLM answers |")
print("|---|---|---|---|---|---|---|---|")
print(f"| dense | 0 | {dense:.2f} | | | | | |")
for ratio in ("0.2", "0.4"):
    for m in ("wanda-sp", "flap", "classic", "local"):
        d = root / f"{m}-{ratio}"
        if not (d / "result.json").exists():
            print(f"| {m} | {ratio} | (not run) | | | | | |")
            continue
        r = json.loads((d / "result.json").read_text())
        ev = json.loads((d / "eval.json").read_text())["ppl"]["wiki:test"]["ppl"] if (d / "eval.json").exists() else float("nan")
        md = r.get("method_details", {})
        name = {"classic": "self-pruner (classic)", "local": "self-pruner (local SmolLM2)"}.get(m, m + (" (uniform)" if m == "wanda-sp" else ""))
        fit = f"{md['best_fitness']:.2f} vs uniform {md['uniform_fitness']:.2f}" if "best_fitness" in md else ""
        src = md.get("search", {})
        llm = ""
        if m == "local":
            llm = (f"proposals {src['by_source']}, selections {src['selections_by_source']}, "
                   f"failed attempts {src['failed_attempts']}, tokens {src['tokens']}")
        loop = f"{md['search_wall_s']:.0f}" if "search_wall_s" in md else ""
        print(f"| {name} | {r['ratio_achieved']:.4f} | {ev:.2f} | {r['ppl_calib_after']:.2f} | {r['search_seconds']:.0f} | "
              f"{loop} | {md.get('fitness_evaluations', '')} | {fit} {llm} |")
