"""Perplexity.

Definition: the rows (each a full token sequence, BOS first where the model needs it) are run through the
model; every token after the first of its row is predicted from the tokens before it in the same row;
``PPL = exp(mean NLL)`` over all those predicted tokens, ``rows * (seqlen - 1)`` of them. No gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..progress import progress_bar

# Held-out perplexity: the row length and row count that ``eval``, ``prune`` and ``apply`` share by default, so
# that the numbers they print for the same model agree.
HELD_OUT_SEQLEN = 512
HELD_OUT_ROWS = 16


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


def row_nll(model, rows: torch.Tensor) -> torch.Tensor:
    """Summed NLL of every row in ``rows`` (one forward pass), as a float64 tensor [rows]."""
    device = next(model.parameters()).device
    rows = rows.to(device)
    logits = model(input_ids=rows, use_cache=False).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1), reduction="none")
    return nll.view(rows.shape[0], -1).sum(1).double().cpu()


@torch.inference_mode()
def perplexity(model, rows: torch.Tensor, batch_size: int = 4, progress: bool = False, desc: str = "perplexity") -> PPLResult:
    """Perplexity of ``model`` on ``rows`` (LongTensor [n, seqlen]); see the module docstring."""
    total = 0.0
    batches = range(0, rows.shape[0], batch_size)
    for i in progress_bar(batches, desc=desc, enabled=progress):
        total += float(row_nll(model, rows[i : i + batch_size]).sum())
    tokens = rows.shape[0] * (rows.shape[1] - 1)
    nll = total / tokens
    return PPLResult(math.exp(nll), nll, tokens, rows.shape[1], rows.shape[0])
