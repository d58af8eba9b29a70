"""Measured response of every block: the calibration loss when one block is changed, everything else as it is.

A *base* plan (the dense model, or what a search has committed so far) and, for some blocks, a list of
*variants*: layer plans that differ from the base only in that block (its heads narrowed, its channels
narrowed, with or without bias compensation, or the block removed). The response of a variant is the summed
calibration NLL of the model with that one block changed, in nats (``loss - base_loss`` is its loss increase).

Cost: the greedy search's replay (``search.greedy.Replayer``: embeddings and per-layer arguments captured
once, blocks run one by one). Nothing before a changed block differs from the base, so the base model's state
entering every position is kept (one per batch, advanced position by position) and a variant runs only its own
block and the suffix after it, then the loss head: about half a forward pass on average. Width changes are
simulated by masking (``importance.width.MaskedPlan``: the removed columns of ``o_proj`` / ``down_proj``
zeroed, compensation added by a hook; equal to surgery), removed blocks by skipping them. So every loss is the
loss of the physically pruned model on the same rows (tested against surgery in ``tests/test_response.py``).

``on_block(pos, losses)`` sees each block's losses as they are measured (the caller keeps them: resume).
``PositionReplay`` measures one position at a time, the same losses: a worker's side when they are fanned out.

The loss is the replayer's (``loss(b, h)``): the summed next-token NLL (``search.greedy.Replayer``), or with
``KLReplayer`` (tell's ``--response-loss kl``) the summed KL divergence of the changed model's next-token
distributions from the dense model's, over the same positions.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..models.base import Block, ModelSpec
from ..plan import LayerPlan, PruningPlan
from ..progress import progress_bar
from ..runtime.head import _logits
from ..runtime.placement import module_device, to_module_device
from ..search.greedy import Replayer
from .activations import run_branch
from .width import MaskedPlan


def branch_only(lp: LayerPlan, kind: str) -> LayerPlan:
    """The width changes of one branch of a layer plan (the other branch dense): what ``MaskedPlan`` needs to
    run that branch alone."""
    if kind == "attn":
        return LayerPlan(heads=lp.heads, attn_bias=lp.attn_bias)
    return LayerPlan(channels=lp.channels, mlp_bias=lp.mlp_bias)


def _narrowed(lp: LayerPlan, kind: str) -> bool:
    return bool(lp.heads is not None or lp.attn_bias) if kind == "attn" else bool(lp.channels is not None or lp.mlp_bias)


def run_block(replayer, spec: ModelSpec, pos: int, lp: LayerPlan, h: torch.Tensor, b: int) -> torch.Tensor:
    """Block ``pos`` of batch ``b`` under the layer plan ``lp`` (skipped when removed, masked when narrowed)."""
    layer, kind = Block.at(pos)
    if not getattr(lp, kind):
        return h
    replayer.blocks_run += 1
    # an onloaded model (--max-memory): the layer's weights read onto the device first, as the greedy replay does
    mod = replayer.ol.layer(layer) if replayer.ol is not None else replayer.layers[layer]
    h, kw = to_module_device(mod, h, replayer.kwargs[b][layer])
    if not _narrowed(lp, kind):
        return run_branch(replayer.adapter, mod, kind, h, kw)
    with MaskedPlan(replayer.adapter, spec, {layer: branch_only(lp, kind)}):
        return run_branch(replayer.adapter, mod, kind, h, kw)


def run_from(replayer, spec: ModelSpec, plan: PruningPlan, b: int, h: torch.Tensor, start: int) -> torch.Tensor:
    """Batch ``b`` from the state entering position ``start`` to the end, under ``plan``."""
    for pos in range(start, replayer.n_pos):
        h = run_block(replayer, spec, pos, plan.layers[Block.at(pos).layer], h, b)
    return h


@torch.inference_mode()
def plan_loss(replayer, spec: ModelSpec, plan: PruningPlan) -> float:
    """Summed calibration NLL (nats) of the model under ``plan``."""
    return math.fsum(replayer.loss(b, run_from(replayer, spec, plan, b, replayer.emb[b], 0))
                     for b in range(len(replayer.batches)))


def variant_loss(replayer, spec: ModelSpec, base: PruningPlan, pos: int, lp: LayerPlan, states: list) -> float:
    """Summed NLL with block ``pos`` under ``lp`` and the rest under ``base``, from the base states entering
    ``pos`` (one per batch)."""
    return math.fsum(replayer.loss(b, run_from(replayer, spec, base, b, run_block(replayer, spec, pos, lp, states[b], b),
                                               pos + 1))
                     for b in range(len(replayer.batches)))


def advance(replayer, spec: ModelSpec, base: PruningPlan, pos: int, states: list) -> list:
    """The base states entering ``pos + 1`` from those entering ``pos``."""
    lp = base.layers[Block.at(pos).layer]
    return [run_block(replayer, spec, pos, lp, h, b) for b, h in enumerate(states)]


@torch.inference_mode()
def measure_responses(replayer, spec: ModelSpec, base: PruningPlan, variants: dict[int, list[LayerPlan]],
                      progress: bool = False, on_block: Callable[[int, list[float]], None] | None = None, desc: str = "responses") -> dict:
    """``{pos: [loss of each variant]}`` for the blocks in ``variants`` (module docstring)."""
    states = [replayer.emb[b] for b in range(len(replayer.batches))]
    out = {}
    bar = progress_bar(total=sum(len(v) for v in variants.values()), desc=desc, enabled=progress)
    last = max(variants) if variants else -1
    for pos in range(last + 1):
        if pos in variants:
            losses = []
            for lp in variants[pos]:
                losses.append(variant_loss(replayer, spec, base, pos, lp, states))
                bar.update(1)
            out[pos] = losses
            if on_block is not None:
                on_block(pos, losses)
        if pos < last:
            states = advance(replayer, spec, base, pos, states)
    bar.close()
    return out


class PositionReplay:
    """A pool worker's side of ``measure_responses`` (``--workers``): the responses of one block position per
    call. The base states entering the position asked are advanced from the last position asked on the same
    base (from the embeddings when an earlier one is asked, or another base), by the same operations as one
    process runs, so every loss is bitwise the one ``measure_responses`` gives on the same replayer settings."""

    def __init__(self, replayer, spec: ModelSpec):
        self.r, self.spec = replayer, spec
        self.base, self.pos, self.states = None, 0, None

    def close(self) -> None:
        self.r.close()

    @torch.inference_mode()
    def responses(self, base: PruningPlan, pos: int, variants: list[LayerPlan]) -> list[float]:
        if self.states is None or pos < self.pos or base.layers != self.base.layers:
            self.base, self.pos = base, 0
            self.states = [self.r.emb[b] for b in range(len(self.r.batches))]
        while self.pos < pos:
            self.states = advance(self.r, self.spec, base, self.pos, self.states)
            self.pos += 1
        return [variant_loss(self.r, self.spec, base, pos, lp, self.states) for lp in variants]

    @torch.inference_mode()
    def plan_loss(self, plan: PruningPlan) -> float:
        return plan_loss(self.r, self.spec, plan)


KL_SLICE = 4 << 20  # logits per slice of positions in the KL head (its float64 temporaries: 32 MB each)


def kl_cache_bytes(rows: int, seqlen: int, vocab: int, top: int = 0) -> int:
    """Bytes of the dense model's next-token distributions ``KLReplayer`` keeps: float32 logits (with ``top``,
    only the ``top`` largest and their int32 token ids), a float64 log-normalizer per position."""
    per_position = (min(top, vocab) * 8 if top else vocab * 4) + 8
    return rows * (seqlen - 1) * per_position


class KLReplayer(Replayer):
    """A replayer whose loss is the summed KL divergence ``KL(dense || changed)`` of the next-token
    distributions, in nats, over the positions the NLL sums over (every position but the last of each row,
    ``Replayer.count_tokens``).

    The dense model's distributions are computed once, by the same replay and head as every other plan's
    (``run_from`` under the dense plan), and kept as their float32 logits ``z`` (as the head computes them)
    and float64 log-normalizers ``lse`` (``kl_cache_bytes``). A loss computes, per slice of positions, in
    float64: ``KL = sum_v p_v (z_v - z'_v) - (lse - lse') sum_v p_v`` with ``p = exp(z - lse)``: the
    difference of the logits is taken before anything is rounded to float32 (KL is second order in it, so
    float32 log-probabilities would leave rounding of the order of the KL of a small change). So the dense
    plan's loss is exactly 0, and a loss is one fixed sequence of operations wherever it is computed (a pool
    worker builds the cache from its own replica: bitwise the one of this process). Per position the KL is
    floored at 0 (it is non-negative; the floor only drops rounding).

    With ``top`` (tell's ``--kl-top``) only the ``top`` most probable tokens of each dense distribution are
    kept, and the loss is the KL of the distributions coarsened to those tokens plus one bucket holding the
    rest of the mass (of the dense and of the changed model alike): ``sum_top p_v log(p_v / q_v) +
    (1 - P) log((1 - P) / (1 - Q))``, ``P`` and ``Q`` the two models' mass on the kept tokens. Merging tokens
    never raises a KL, so this is a lower bound of the full one, equal where the rest holds no mass; it keeps
    ``top`` x 8 bytes a position instead of the vocabulary's 4 bytes a token."""

    def __init__(self, model, adapter, rows: torch.Tensor, batch_size: int, spec: ModelSpec, positions: int = 0,
                 top: int = 0):
        """``positions``: positions per slice of the head (0: ``KL_SLICE`` logits' worth); ``top``: tokens kept
        per dense distribution (0: all)."""
        super().__init__(model, adapter, rows, batch_size, head_chunk=0)
        dense = PruningPlan.dense(spec)
        self.slice = positions or max(1, KL_SLICE // self.vocab)
        self.top = min(top, self.vocab) if top else 0
        with torch.inference_mode():
            self.dense = [[self._keep(z, lse) for z, lse in self._slices(run_from(self, spec, dense, b, self.emb[b], 0))]
                          for b in range(len(self.batches))]

    def _keep(self, z: torch.Tensor, lse: torch.Tensor) -> tuple:
        """What is kept of one slice of dense logits: (z, lse), or with ``top`` (its largest logits, their
        token ids as int32, lse)."""
        if not self.top:
            return z, lse
        vals, ids = z.topk(self.top, dim=-1)
        return vals, ids.to(torch.int32), lse

    def _slices(self, h: torch.Tensor):
        """(float32 logits [positions, vocab], float64 log-normalizers [positions]) of the next tokens after
        the final hidden states ``h`` [rows, seqlen, H], one slice of positions at a time."""
        norm, head = self.adapter.final_norm(), self.adapter.lm_head()
        x = norm(h.to(module_device(norm, h.device)))[:, :-1]
        x = x.reshape(-1, x.shape[-1]).to(module_device(head, x.device))
        for a in range(0, x.shape[0], self.slice):
            z = _logits(self.adapter, x[a:a + self.slice], head.weight, head.bias)
            yield z, torch.logsumexp(z.double(), -1)

    def loss(self, b: int, h: torch.Tensor) -> float:
        """Summed KL(dense || this) over batch ``b``'s positions, from its final hidden states."""
        total = []
        for (z, lse), dense in zip(self._slices(h), self.dense[b]):
            kl = self._top_kl(z, lse, *dense) if self.top else self._full_kl(z, lse, *dense)
            total.append(kl.clamp_min(0).sum())
        self.heads_run += 1
        return float(torch.stack(total).sum())

    @staticmethod
    def _full_kl(z, lse, zd, lsed):
        zd, lsed = zd.to(z.device).double(), lsed.to(z.device)
        p = torch.exp(zd - lsed[:, None])
        return (p * zd.sub_(z.double())).sum(-1) - (lsed - lse) * p.sum(-1)

    @staticmethod
    def _top_kl(z, lse, vals, ids, lsed):
        """Per position the KL of the coarsened distributions (class docstring), float64; the log-ratio of a
        kept token is the difference of the logits less that of the normalizers, taken before any rounding."""
        vals, lsed = vals.to(z.device).double(), lsed.to(z.device)
        zk = z.gather(-1, ids.to(z.device).long()).double()
        log_ratio = (vals - zk) - (lsed - lse)[:, None]  # log p_v - log q_v
        p = torch.exp(vals - lsed[:, None])
        q = torch.exp(zk - lse[:, None])
        rest_p = (1 - p.sum(-1)).clamp_min(0)
        rest_q = (1 - q.sum(-1)).clamp_min(torch.finfo(torch.float64).tiny)
        rest = torch.where(rest_p > 0, rest_p * (torch.log(rest_p) - torch.log(rest_q)), 0.0)  # 0 log 0 = 0
        return (p * log_ratio).sum(-1) + rest
