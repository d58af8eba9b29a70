"""``result.json``: what a ``prune`` or ``apply`` run did and measured, with the settings that produced it.

Format ``secateurs-result/1`` (the key ``"format"``); files written before the format was versioned have no
``"format"`` key and are read as version 1. Held-out perplexity is recorded with its rows: ``eval_set``,
``eval_rows`` (rows measured) and ``eval_seqlen`` (tokens per row).
"""
from __future__ import annotations

from pathlib import Path

from .errors import UserError

FORMAT = "secateurs-result/1"


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
