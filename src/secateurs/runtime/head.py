"""The output head in blocks of the vocabulary: the loss and the probability mass of the calibration rows,
computed ``HEAD_BLOCK`` vocabulary rows at a time, whether the head is in memory or read from its file.

Every path (a resident model, a model split across GPUs, a layer-by-layer model) runs the same operations on
the same blocks, so their results are bitwise equal; the full ``[tokens, vocabulary]`` logits never exist (on
Gemma's 262k vocabulary they were 1 GiB for 4 rows of 256 tokens).

- ``HeadNLL``: the summed next-token NLL of one batch: per block ``z = softcap(x @ W_block.T).float()``, the
  running ``lse = logaddexp(lse, logsumexp(z))``, and the target's own logit taken from its block; the NLL of a
  token is ``lse - z_target``, summed per row in float64.
- ``HeadMass``: the summed softmax probability of every vocabulary token over a batch's positions (two passes
  over the blocks: the log-sum-exp, then ``exp(z - lse)``), added into a float64 total batch after batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

HEAD_BLOCK = 8192  # vocabulary rows per block of the output head


def block_bounds(vocab: int, block: int = HEAD_BLOCK) -> list[tuple[int, int]]:
    return [(a, min(vocab, a + block)) for a in range(0, vocab, block)]


def _logits(adapter, x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor:
    return adapter.softcap(F.linear(x, w.to(x.device), None if bias is None else bias.to(x.device)).float())


def _flat(x: torch.Tensor, drop_last: bool) -> torch.Tensor:
    return (x[:, :-1] if drop_last else x).reshape(-1, x.shape[-1])


class HeadNLL:
    """Per-row summed NLL of one batch (ids [b, s]): ``add`` the batch's normed final hidden states ``x``
    [b, s, H] with every block in order, then ``result``. ``x`` is passed each time, so that it may be kept
    outside memory between blocks."""

    def __init__(self, adapter, x: torch.Tensor, ids: torch.Tensor):
        self.adapter = adapter
        self.rows = ids.shape[0]
        self.tgt = ids[:, 1:].reshape(-1).to(x.device)
        self.lse = torch.full((self.tgt.shape[0],), -math.inf, device=x.device)
        self.z_t = torch.zeros_like(self.lse)

    def add(self, x: torch.Tensor, a: int, w: torch.Tensor, bias=None) -> None:
        z = _logits(self.adapter, _flat(x, True), w, bias)
        mine = ((self.tgt >= a) & (self.tgt < a + w.shape[0])).nonzero().squeeze(-1)
        self.z_t[mine] = z[mine, self.tgt[mine] - a]
        self.lse = torch.logaddexp(self.lse, torch.logsumexp(z, -1))

    def result(self) -> torch.Tensor:
        return (self.lse - self.z_t).double().view(self.rows, -1).sum(1).cpu()


class HeadMass:
    """Softmax mass of every vocabulary token over the positions of one batch (normed final hidden states ``x``),
    added into a float64 [vocab] total: ``add_lse`` with every block in order (first pass), then ``add_mass``
    with every block (second pass)."""

    def __init__(self, adapter, x: torch.Tensor):
        self.adapter = adapter
        self.lse = torch.full((x.shape[0] * x.shape[1],), -math.inf, device=x.device)

    def add_lse(self, x: torch.Tensor, w: torch.Tensor, bias=None) -> None:
        self.lse = torch.logaddexp(self.lse, torch.logsumexp(_logits(self.adapter, _flat(x, False), w, bias), -1))

    def add_mass(self, x: torch.Tensor, total: torch.Tensor, a: int, w: torch.Tensor, bias=None) -> None:
        z = _logits(self.adapter, _flat(x, False), w, bias)
        total[a : a + w.shape[0]] += torch.exp(z - self.lse[:, None]).sum(0).double().cpu()


def resident_blocks(adapter):
    """(start, weight rows, bias rows) of every block of a resident head (views, no copies)."""
    head = adapter.lm_head()
    for a, e in block_bounds(head.weight.shape[0]):
        yield a, head.weight[a:e], None if head.bias is None else head.bias[a:e]
