"""Perplexity of a GGUF file in llama.cpp, defined as ``secateurs.eval.perplexity`` defines it for PyTorch.

- **Rows**: the text set is tokenized by llama.cpp's own tokenizer (the one in the file) and cut into rows
  exactly as the PyTorch path does (``secateurs.data.tokenize_rows``: joined with blank lines, consecutive
  rows, BOS first where the architecture needs it: ``model.needs_bos``). As the exported tokenizer reproduces
  the Hugging Face one, these are the PyTorch path's rows (tested).
- **Perplexity**: each row is evaluated from an empty KV cache with logits for every position; the NLL is
  computed in float64 from llama.cpp's float32 logits; ``PPL = exp(mean NLL)`` over ``rows * (seqlen - 1)``
  predicted tokens.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch

from ..data import load_texts, tokenize_rows
from ..errors import UserError
from ..eval.perplexity import PPLResult
from ..progress import progress_bar
from .binding import default_threads
from .model import GGUFInfo, logits, needs_bos, open_model, read_info


class Tokenizer:
    """llama.cpp's tokenizer behind the two things ``secateurs.data.tokenize_rows`` uses."""

    def __init__(self, llm):
        self.llm = llm
        bos = llm.token_bos()
        self.bos_token_id = None if bos is None or bos < 0 else int(bos)

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=False)
        return SimpleNamespace(input_ids=torch.tensor([ids], dtype=torch.long))


def eval_rows(llm, info: GGUFInfo, name: str, seqlen: int, max_rows: int | None):
    """The rows of a text set for a GGUF model (see the module docstring)."""
    rows = tokenize_rows(Tokenizer(llm), load_texts(name), seqlen, needs_bos(info))
    if rows.shape[0] == 0:
        raise UserError(f"text set {name!r} has fewer than {seqlen} tokens")
    return rows[:max_rows] if max_rows else rows


def row_nll(llm, row) -> float:
    """Summed NLL (float64) of the tokens of ``row`` after its first."""
    x = logits(llm, row)[:-1].astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(x - m).sum(axis=1)))
    tgt = np.asarray(row[1:], dtype=np.int64)
    return float((lse - x[np.arange(len(tgt)), tgt]).sum())


def perplexity(llm, rows, progress: bool = False, desc: str = "perplexity"):
    total = 0.0
    for i in progress_bar(range(rows.shape[0]), desc=desc, enabled=progress):
        total += row_nll(llm, rows[i].tolist())
    tokens = rows.shape[0] * (rows.shape[1] - 1)
    nll = total / tokens
    return PPLResult(math.exp(nll), nll, tokens, rows.shape[1], rows.shape[0])


class Handle:
    """An opened GGUF for ``secateurs eval`` (see secateurs.eval.engines)."""

    engine = "llama.cpp"
    supports_tasks = False

    def __init__(self, path: str, seqlen: int, threads: int | None = None):
        self.info = read_info(path)
        self.llm = open_model(path, n_ctx=seqlen, threads=threads, logits_all=True)
        self.threads = threads or default_threads()

    def rows(self, name: str, seqlen: int, max_rows: int | None):
        return eval_rows(self.llm, self.info, name, seqlen, max_rows)

    def perplexity(self, rows, batch_size: int = 1, progress: bool = False, desc: str = "perplexity"):
        return perplexity(self.llm, rows, progress=progress, desc=desc)

    def settings(self) -> dict:
        return {"engine": self.engine, "threads": self.threads, "gguf_type": self.info.type_name, "arch": self.info.arch}
