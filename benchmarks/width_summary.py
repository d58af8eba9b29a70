"""The width-pruning table (benchmarks/results/width_smollm2.md) from its raw runs.

    python benchmarks/width_summary.py collect runs/width --json benchmarks/results/width_smollm2.json
    python benchmarks/width_summary.py table benchmarks/results/width_smollm2.json     # prints the table rows

``collect`` gathers what the run folders of width_table.sh hold (every result.json and eval.json, the dense
evaluation) into one JSON file, committed with the table; ``table`` prints the markdown rows from that file
alone, so the table can be regenerated without the run folders (which hold the pruned weights).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RATIOS = ("0.2", "0.4")
METHODS = ("wanda-sp", "flap", "classic", "local")
NAMES = {"wanda-sp": "wanda-sp (uniform)", "classic": "self-pruner (classic)", "local": "self-pruner (local SmolLM2)"}


def collect(root: Path) -> dict:
    def read(path: Path):
        return json.loads(path.read_text()) if path.exists() else None

    runs = {}
    for ratio in RATIOS:
        for m in METHODS:
            d = root / f"{m}-{ratio}"
            runs[f"{m}-{ratio}"] = {"result": read(d / "result.json"), "eval": read(d / "eval.json")}
    return {"source": "benchmarks/width_table.sh", "dense_eval": read(root / "dense_eval.json"), "runs": runs}


def table(data: dict) -> list[str]:
    dense = data["dense_eval"]["ppl"]["wiki:test"]["ppl"]
    lines = ["| method | ratio | wiki:test PPL | calib PPL | method s | search loop s | fitness evals | best vs uniform fitness; LLM answers |",
             "|---|---|---|---|---|---|---|---|",
             f"| dense | 0 | {dense:.2f} | | | | | |"]
    for ratio in RATIOS:
        for m in METHODS:
            run = data["runs"].get(f"{m}-{ratio}") or {}
            r, ev = run.get("result"), run.get("eval")
            if r is None:
                lines.append(f"| {NAMES.get(m, m)} | {ratio} | (not run) | | | | | |")
                continue
            ppl = ev["ppl"]["wiki:test"]["ppl"] if ev else math.nan
            md = r.get("method_details", {})
            fit = f"{md['best_fitness']:.2f} vs uniform {md['uniform_fitness']:.2f}" if "best_fitness" in md else ""
            src = md.get("search", {})
            llm = ""
            if m == "local":
                llm = (f"proposals {src['by_source']}, selections {src['selections_by_source']}, "
                       f"failed attempts {src['failed_attempts']}, tokens {src['tokens']}")
            loop = f"{md['search_wall_s']:.0f}" if "search_wall_s" in md else ""
            lines.append(f"| {NAMES.get(m, m)} | {r['ratio_achieved']:.4f} | {ppl:.2f} | {r['ppl_calib_after']:.2f} | "
                         f"{r['search_seconds']:.0f} | {loop} | {md.get('fitness_evaluations', '')} | {fit} {llm} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="gather the run folders into one JSON file")
    c.add_argument("root", nargs="?", default="runs/width")
    c.add_argument("--json", default="benchmarks/results/width_smollm2.json")
    t = sub.add_parser("table", help="print the markdown rows from the JSON file")
    t.add_argument("json", nargs="?", default="benchmarks/results/width_smollm2.json")
    a = p.parse_args(argv)
    if a.cmd == "collect":
        Path(a.json).write_text(json.dumps(collect(Path(a.root)), indent=1) + "\n")
        print(f"wrote {a.json}")
    else:
        print("\n".join(table(json.loads(Path(a.json).read_text()))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
