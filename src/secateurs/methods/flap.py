"""flap: fluctuation-based adaptive structured pruning (An et al., AAAI 2024), training-free.

1. One calibration pass over the dense model gathers, per input column of every ``o_proj`` / ``down_proj``,
   the mean and variance of its input.
2. Column score ``Var(X_j) * ||W_:,j||^2``, standardized per layer and per kind (attention columns, MLP
   channels); a head's score is the mean of its columns' standardized scores.
3. One global threshold over all heads and channels of all layers: units at or below it are removed, so
   layers get adaptive widths. The threshold is the one whose plan is nearest to the target ratio (the plan's
   exact parameter count, embeddings included, GQA rounding included); then, the heads fixed, the channel
   threshold alone is refined to land within about one channel of the target. Every layer keeps at least one
   head and one channel; the head count passing the threshold is rounded down to a valid GQA selection.
4. Bias compensation: ``W[:, removed] @ mean(X[removed])`` is added to the output projection's bias.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..importance.width import collect_stats, layer_compensation, projection_scores, standardize
from ..plan import LayerPlan, PruningPlan, select_heads
from . import PruneContext, WidthConfig, register_method


@dataclass
class FlapConfig(WidthConfig):
    batch_size: int = field(default=4, metadata={"help": "calibration rows per forward pass"})
    compensate: bool = field(default=True, metadata={"help": "add FLAP's bias compensation"})


def standardized_scores(ctx: PruneContext, stats) -> tuple[torch.Tensor, torch.Tensor]:
    """(head scores [layers, heads], channel scores [layers, channels]), standardized per layer and kind."""
    spec = ctx.spec
    L = spec.n_layers
    attn, mlp = projection_scores(ctx.model, ctx.adapter, stats, "flap")
    attn, mlp = torch.stack([a.cpu() for a in attn]), torch.stack([m.cpu() for m in mlp])
    heads = standardize(attn).view(L, spec.n_heads, spec.head_dim).mean(-1)
    return heads, standardize(mlp)


def plan_at_threshold(spec, heads: torch.Tensor | None, channels: torch.Tensor, t: float,
                      t_ch: float | None = None) -> PruningPlan:
    """Heads scoring above ``t`` and channels above ``t_ch`` (default ``t``) are kept (at least one of each
    per layer; the head count is rounded down to a valid GQA selection). ``heads`` None: every head is kept."""
    t_ch = t if t_ch is None else t_ch
    plan = PruningPlan.dense(spec, "flap")
    for i in range(spec.n_layers):
        n_h = spec.n_heads if heads is None else max(1, int((heads[i] > t).sum()))
        kept_h = list(range(spec.n_heads)) if heads is None else select_heads(heads[i].tolist(), n_h, spec.n_kv)
        keep_c = (channels[i] > t_ch).nonzero().flatten().tolist() or [int(channels[i].argmax())]
        plan.layers[i] = LayerPlan(heads=None if len(kept_h) == spec.n_heads else kept_h,
                                   channels=None if len(keep_c) == spec.intermediate else keep_c)
    return plan


def _nearest(spec, cuts: torch.Tensor, make, ratio: float) -> tuple[float, PruningPlan]:
    """Bisection over the sorted cut points (the plan's ratio grows with the cut): the cut whose plan's ratio
    is nearest to ``ratio``."""
    lo, hi = 0, len(cuts) - 1
    if make(float(cuts[hi])).ratio(spec) < ratio:
        return float(cuts[hi]), make(float(cuts[hi]))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if make(float(cuts[mid])).ratio(spec) >= ratio:
            hi = mid
        else:
            lo = mid
    return min(((float(cuts[k]), make(float(cuts[k]))) for k in (lo, hi)), key=lambda tp: abs(tp[1].ratio(spec) - ratio))


def threshold_plan(spec, heads: torch.Tensor | None, channels: torch.Tensor, ratio: float) -> PruningPlan:
    """One global threshold over heads and channels, nearest to ``ratio``; then, the heads fixed, the channel
    threshold alone is refined so that the ratio lands within about one channel of the target (head counts
    move in GQA-sized steps). ``heads`` None: every head is kept, the channels alone are cut."""
    minus_inf = torch.tensor([-float("inf")], dtype=torch.float64)
    scores = channels.flatten() if heads is None else torch.cat([heads.flatten(), channels.flatten()])
    cuts = torch.cat([minus_inf, scores.sort().values])
    t, plan = _nearest(spec, cuts, lambda t: plan_at_threshold(spec, heads, channels, t), ratio)
    cuts_ch = torch.cat([minus_inf, channels.flatten().sort().values])
    _, plan = _nearest(spec, cuts_ch, lambda tc: plan_at_threshold(spec, heads, channels, t, tc), ratio)
    if abs(plan.ratio(spec) - ratio) > 0.005:
        raise UserError(f"ratio {ratio} is out of reach for flap on this model (nearest: {plan.ratio(spec):.4f}; "
                        "every layer keeps at least one head" + (" (all of them: --engine vllm)" if heads is None else "")
                        + " and one channel)")
    return plan


def add_compensation(ctx: PruneContext, plan: PruningPlan, stats) -> None:
    for i, lp in enumerate(plan.layers):
        if lp.heads is not None or lp.channels is not None:
            lp.attn_bias, lp.mlp_bias = layer_compensation(ctx.model, ctx.adapter, ctx.spec, stats, i, lp.heads, lp.channels)


@register_method("flap", "fluctuation scores standardized across layers, one global threshold (adaptive widths), "
                 "bias compensation", FlapConfig)
def flap(ctx: PruneContext, cfg: FlapConfig) -> PruningPlan:
    stats = collect_stats(ctx.model, ctx.adapter, ctx.calib, cfg.batch_size)
    heads, channels = standardized_scores(ctx, stats)
    plan = threshold_plan(ctx.spec, None if ctx.keep_heads else heads, channels, ctx.ratio)
    if cfg.compensate:
        add_compensation(ctx, plan, stats)
    ctx.record(kept=plan.kept_fraction(ctx.spec))
    return plan
