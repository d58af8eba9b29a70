"""``result.json``: what a ``prune``, ``apply`` or ``heal`` run (or ``secateurs.save``) did and measured, with
the settings that produced it; built here, by ``make_result``, for all of them.

Format ``secateurs-result/1`` (the key ``"format"``); files written before the format was versioned have no
``"format"`` key and are read as version 1. Held-out perplexity is recorded with its rows: ``eval_set``,
``eval_rows`` (rows measured) and ``eval_seqlen`` (tokens per row).
"""
from __future__ import annotations

from pathlib import Path

from ._version import __version__
from .errors import UserError

FORMAT = "secateurs-result/1"


def versions() -> dict:
    import torch
    import transformers

    return {"secateurs": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def plan_counts(plan, spec, ratio_target: float | None = None) -> dict:
    """What a plan removes from the dense model of ``spec``."""
    return {"ratio_target": ratio_target, "ratio_achieved": plan.ratio(spec), "params_before": spec.total_params,
            "params_after": plan.params(spec), "removed_blocks": [b.name for b in plan.removed_blocks()]}


def held_out(eval_set: str | None, rows, seqlen: int, before: float | None, after: float | None) -> dict:
    """The held-out perplexity before and after, with its rows (``rows``: the measured rows, or None)."""
    return {"eval_set": eval_set or None, "eval_rows": rows.shape[0] if rows is not None else None,
            "eval_seqlen": seqlen if rows is not None else None, "ppl_test_before": before, "ppl_test_after": after}


def make_result(method: str, model: str | None, settings: dict, counts: dict, held: dict, versions_: dict | None = None,
                **more) -> dict:
    """The result.json of a run: its method and model, the settings that produced it, what the plan removes
    (``plan_counts``), the held-out perplexity (``held_out``), what else the run measured (``more``) and the
    versions of the software."""
    return {"format": FORMAT, "method": method, "model": model, "settings": settings, **counts, **held, **more,
            "versions": versions_ or versions()}


def check_format(result: dict, path: str | Path) -> dict:
    """``result`` if its format is one this version reads (``FORMAT``, or none: written before versioning);
    otherwise a UserError naming the format found and the one accepted."""
    fmt = result.get("format")
    if fmt is not None and fmt != FORMAT:
        raise UserError(f"{path} has format {fmt!r}; this secateurs reads {FORMAT!r} (or files without a format)")
    return result


def held_out_rows(result: dict) -> tuple[int, int] | None:
    """(rows, tokens per row) of a result's held-out perplexity, or None when unknown. Files written before
    the format was versioned measured it with the rows of ``settings.seqlen`` (the calibration's, for prune)."""
    settings = result.get("settings") or {}
    rows = result.get("eval_rows", settings.get("eval_rows"))
    seqlen = result.get("eval_seqlen", settings.get("eval_seqlen", settings.get("seqlen")))
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (rows, seqlen))
    return (rows, seqlen) if ok else None


def held_out_label(result: dict) -> str:
    """``wiki:test ppl (16 rows of 512)``: the held-out perplexity's name with its rows, from a result."""
    from .eval.perplexity import rows_label

    rows = held_out_rows(result)
    return f"{result['eval_set']} ppl" + (f" ({rows_label(*rows)})" if rows else "")
