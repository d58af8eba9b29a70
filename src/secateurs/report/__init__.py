"""``secateurs report``: a markdown page with PNG figures for one or more result folders.

The page holds a summary table, the pruning map (kept fraction per layer and block, as a heatmap),
perplexity and zero-shot accuracy against the pruning ratio and against every measured speedup, and the
settings of every run. What a folder does not hold (no eval.json, no bench.json) is said on the page, not
drawn as empty axes.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_write_text
from .figures import pruning_map, vs_ratio, vs_speedup
from .runs import BENCH, EVAL, Run, find_runs, rows_text

PAGE = "report.md"


def _fmt(v, spec=".3f") -> str:
    return "–" if v is None else format(v, spec)


def _ppl(v) -> str:
    return _fmt(v, ".3f" if v is None or v < 1000 else ".4g")


def _table(runs: list[Run]) -> list[str]:
    sets = sorted({s for r in runs for s in r.ppl})
    kinds = sorted({k for r in runs for k in r.speedup})
    head = ["run", "model", "method", "ratio target", "ratio", "params after"]
    head += [f"ppl {s}, {rows_text(runs, s)} (dense → pruned)" for s in sets]
    head += ["mean acc"] if any(r.tasks for r in runs) else []
    head += [f"{k} speedup" for k in kinds] + ["removed blocks", "saved as"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        res = r.result
        row = [f"`{r.name}`", r.model, r.method, _fmt(res.get("ratio_target")), _fmt(r.ratio),
               f"{res['params_after']:,}" if isinstance(res.get("params_after"), int) else "–"]
        row += [f"{_ppl(r.ppl_dense.get(s))} → {_ppl(r.ppl.get(s))}" for s in sets]
        row += [_fmt(r.mean_accuracy)] if any(x.tasks for x in runs) else []
        row += [_fmt(r.speedup.get(k), ".2f") + ("×" if k in r.speedup else "") for k in kinds]
        removed = res.get("removed_blocks")
        row.append(str(len(removed)) if isinstance(removed, list) else "–")
        row.append(r.export or "–")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _settings(r: Run) -> dict:
    keep = ("settings", "ratio_target", "ratio_achieved", "params_before", "params_after", "eval_set",
            "search_seconds", "ppl_evaluations", "removed_blocks", "versions")
    out = {k: r.result[k] for k in keep if k in r.result}
    if isinstance(out.get("removed_blocks"), list):  # one line, not one line per block
        out["removed_blocks"] = ", ".join(map(str, out["removed_blocks"])) or "none"
    return out


def build_report(dirs: list[str], out: str | Path) -> Path:
    """Writes ``out/report.md`` and its PNG figures; returns the page's path."""
    runs = find_runs(dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs = {"pruning_map": pruning_map(runs, out / "pruning_map.png")}
    figs |= vs_ratio(runs, out)
    figs |= vs_speedup(runs, out)
    md = ["# secateurs report", "",
          f"{len(runs)} run(s): " + ", ".join(f"`{r.folder}`" for r in runs) + ".", "",
          "Ratio = fraction of all parameters removed (embeddings included, tied weights once). Perplexity is "
          "from result.json (held-out set measured by the prune run) and eval.json; accuracy from eval.json; "
          "speedup (dense time / pruned time) from bench.json.", "", "## Summary", ""] + _table(runs) + [""]
    sections = [("Pruning map", "pruning_map", "no plan.json in these folders"),
                ("Perplexity against ratio", "ppl_vs_ratio", "no perplexity in these folders"),
                ("Accuracy against ratio", "accuracy_vs_ratio", f"no task accuracy (no {EVAL} with \"tasks\")")]
    sections += [(f"Quality against measured {k.removeprefix('vs_speedup_')} speedup", k, "") for k in figs if k.startswith("vs_speedup_")]
    if not any(k.startswith("vs_speedup_") for k in figs):
        sections.append(("Quality against measured speedup", "vs_speedup", f"no speedup measured (no {BENCH})"))
    for title, key, missing in sections:
        md += [f"## {title}", ""]
        md += [f"![{title}]({figs[key].name})" if figs.get(key) else f"Not drawn: {missing}.", ""]
    md += ["## Settings of every run", ""]
    for r in runs:
        md += [f"### `{r.name}`", "", f"Folder `{r.folder}`; method {r.method}; model {r.model}.", "",
               "```json", json.dumps(_settings(r), indent=1, sort_keys=True), "```", ""]
    page = out / PAGE
    atomic_write_text(page, "\n".join(md))
    return page
