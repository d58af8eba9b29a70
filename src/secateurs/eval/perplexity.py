"""Perplexity.

Definition: the rows (each a full token sequence, BOS first where the model needs it) are run through the
model; every token after the first of its row is predicted from the tokens before it in the same row;
``PPL = exp(mean NLL)`` over all those predicted tokens, ``rows * (seqlen - 1)`` of them. No gradients. The
NLL comes from the output head in vocabulary blocks (``runtime.head``), whether the model is in memory or
runs layer by layer (``--max-memory``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..defaults import HELD_OUT_ROWS, HELD_OUT_SEQLEN  # noqa: F401 (the held-out rows' defaults, shared)
from ..runtime import passes


def rows_label(rows: int, seqlen: int) -> str:
    """How a perplexity's rows are named wherever one is printed: ``16 rows of 512``."""
    return f"{rows} row{'s' if rows != 1 else ''} of {seqlen}"


@dataclass
class PPLResult:
    ppl: float
    nll: float  # mean NLL per predicted token
    tokens: int  # predicted tokens
    seqlen: int
    rows: int

    @property
    def label(self) -> str:
        return rows_label(self.rows, self.seqlen)

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens, "seqlen": self.seqlen, "rows": self.rows}


def row_nll(model, rows: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Summed NLL of every row in ``rows``, as a float64 tensor [rows] (``runtime.passes.row_nll``: the output
    head in vocabulary blocks, the model resident or layer by layer)."""
    return passes.row_nll(model, rows, batch_size or rows.shape[0])


@torch.inference_mode()
def perplexity(model, rows: torch.Tensor, batch_size: int = 4, progress: bool = False, desc: str = "perplexity") -> PPLResult:
    """Perplexity of ``model`` on ``rows`` (LongTensor [n, seqlen]); see the module docstring."""
    total = 0.0
    for v in passes.row_nll(model, rows, batch_size, progress=progress, desc=desc).tolist():  # summed in row order
        total += v
    tokens = rows.shape[0] * (rows.shape[1] - 1)
    mean = total / tokens
    return PPLResult(math.exp(mean), mean, tokens, rows.shape[1], rows.shape[0])
