"""Reading result folders into one record per run.

A result folder is what ``secateurs prune`` or ``secateurs apply`` wrote: ``result.json`` and ``plan.json``,
optionally ``eval.json`` (``secateurs eval PRUNED --json PRUNED/eval.json``: ``{"ppl": {set: {"ppl": x}},
"tasks": {task: accuracy or {"acc": x, ...}}}``) and ``bench.json`` (``{"speedup": {"prefill": x, ...}}``).
A folder holding no result.json but result folders one level down stands for those.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..models.base import ModelSpec
from ..plan import PruningPlan
from ..result import check_format, held_out_rows

RESULT, PLAN, EVAL, BENCH, META = "result.json", "plan.json", "eval.json", "bench.json", "secateurs.json"
ACCURACY_KEYS = ("acc", "accuracy", "acc_norm", "exact_match")  # first one present is a task's accuracy


@dataclass
class Run:
    folder: Path
    name: str
    method: str
    model: str
    ratio: float | None  # achieved parameter ratio
    result: dict = field(default_factory=dict)
    ppl: dict = field(default_factory=dict)  # text set -> perplexity after pruning
    ppl_dense: dict = field(default_factory=dict)  # text set -> perplexity of the dense model
    ppl_rows: dict = field(default_factory=dict)  # text set -> (rows, tokens per row) of its perplexity
    tasks: dict = field(default_factory=dict)  # task -> accuracy after pruning
    speedup: dict = field(default_factory=dict)  # kind (prefill, decode...) -> dense time / pruned time
    kept: list | None = None  # per layer {"attn": fraction, "mlp": fraction}
    export: str | None = None  # how the model folder was saved (secateurs.json): stock-depth, stock-width, custom

    @property
    def mean_accuracy(self) -> float | None:
        return sum(self.tasks.values()) / len(self.tasks) if self.tasks else None


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object")
    return d


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def task_accuracy(v) -> float | None:
    """A task's accuracy from an eval.json entry: a number, or the first of ACCURACY_KEYS in a dict."""
    if isinstance(v, dict):
        for k in ACCURACY_KEYS:
            if _number(v.get(k)) is not None:
                return float(v[k])
        return None
    return _number(v)


def kept_fraction(plan: PruningPlan) -> list[dict]:
    d = plan.dims
    spec = ModelSpec(**{k: d[k] for k in ("model_type", "n_layers", "hidden", "n_heads", "n_kv", "head_dim", "intermediate")},
                     total_params=0)
    return plan.kept_fraction(spec)


def read_run(folder: Path) -> Run:
    result = check_format(_read_json(folder / RESULT), folder / RESULT) if (folder / RESULT).exists() else {}
    plan = PruningPlan.load(folder / PLAN) if (folder / PLAN).exists() else None
    run = Run(folder=folder, name=folder.name, method=result.get("method") or (plan.method if plan else "") or "?",
              model=str(result.get("model") or "?"), ratio=_number(result.get("ratio_achieved")), result=result,
              kept=kept_fraction(plan) if plan else None)
    if (folder / META).exists():
        run.export = _read_json(folder / META).get("export")
    if result.get("eval_set"):
        for key, target in (("ppl_test_after", run.ppl), ("ppl_test_before", run.ppl_dense)):
            if _number(result.get(key)) is not None:
                target[result["eval_set"]] = float(result[key])
        if held_out_rows(result):
            run.ppl_rows[result["eval_set"]] = held_out_rows(result)
    if (folder / EVAL).exists():
        ev = _read_json(folder / EVAL)
        for name, v in (ev.get("ppl") or {}).items():
            p = _number(v.get("ppl") if isinstance(v, dict) else v)
            if p is not None:
                run.ppl[name] = p
                rows = (v.get("rows"), v.get("seqlen")) if isinstance(v, dict) else None
                rows = rows if rows and all(isinstance(x, int) for x in rows) else None
                if run.ppl_rows.get(name) != rows:  # the dense figure was measured on other rows: not comparable
                    run.ppl_dense.pop(name, None)
                run.ppl_rows.pop(name, None)
                if rows:
                    run.ppl_rows[name] = rows
        for task, v in (ev.get("tasks") or {}).items():
            acc = task_accuracy(v)
            if acc is not None:
                run.tasks[task] = acc
    if (folder / BENCH).exists():
        for kind, v in (_read_json(folder / BENCH).get("speedup") or {}).items():
            if _number(v) is not None:
                run.speedup[kind] = float(v)
    return run


def rows_text(runs: list[Run], name: str) -> str:
    """The rows of set ``name``'s perplexity across ``runs``: ``16 rows of 512``, or a note that they differ."""
    from ..eval.perplexity import rows_label

    found = {r.ppl_rows.get(name) for r in runs if name in r.ppl}
    if len(found) == 1 and None not in found:
        return rows_label(*found.pop())
    return "rows differ between runs" if len(found - {None}) > 1 else "rows not recorded"


def find_runs(dirs: list[str]) -> list[Run]:
    """One Run per result folder named (or found one level below a named folder), in the order given."""
    runs, seen = [], set()
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            raise UserError(f"{d} is not a folder; give result folders written by `secateurs prune` or `secateurs apply`")
        if (p / RESULT).exists() or (p / PLAN).exists():
            found = [p]
        else:
            found = sorted(c for c in p.iterdir() if c.is_dir() and ((c / RESULT).exists() or (c / PLAN).exists()))
            if not found:
                raise UserError(f"{d} holds no result.json or plan.json (nor do its sub-folders)")
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                runs.append(read_run(f))
    names = [r.name for r in runs]
    for r in runs:  # same folder names in different places: tell them apart by their parent
        if names.count(r.name) > 1:
            r.name = f"{r.folder.parent.name}/{r.folder.name}"
    return runs
