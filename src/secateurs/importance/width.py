"""Width importance: scores of attention heads and MLP channels from calibration activations.

Both scores look at the *input columns* of the output projections (``o_proj``: one column per head
dimension, a head owns ``head_dim`` consecutive columns; ``down_proj``: one column per MLP channel):

- Wanda-sp:  ``S_j = mean_r |W_rj| * ||X_j||_2``  (X_j = column j of the projection's input, all tokens)
- FLAP:      ``S_j = Var(X_j) * ||W_:,j||_2^2``    (the fluctuation of the input times the column's weight)

A head's score is the sum over its columns (``projection_scores`` gives every layer's column scores by
either rule). FLAP's bias compensation keeps the expected output of a projection when columns go:
``b += W[:, removed] @ mean(X[removed])`` (``layer_compensation``). The weights are read where the runtime
keeps them (``runtime.passes.layer_weights``: resident, or read from the file for a layer-by-layer model).
"""
from __future__ import annotations

import math

import torch

from ..models.base import Adapter, head_indices
from ..runtime.passes import forward_rows, layer_weights
from .activations import InputStats


def output_projections(adapter: Adapter, layers=None) -> dict[str, torch.nn.Linear]:
    """``{"attn.i": o_proj, "mlp.i": down_proj}`` for the given layer indices (all by default)."""
    all_layers = adapter.layers()
    idx = range(len(all_layers)) if layers is None else layers
    out = {}
    for i in idx:
        out[f"attn.{i}"] = adapter.proj(all_layers[i], adapter.o)
        out[f"mlp.{i}"] = adapter.proj(all_layers[i], adapter.down)
    return out


@torch.inference_mode()
def collect_stats(model, adapter: Adapter, rows: torch.Tensor, batch_size: int = 4, layers=None) -> InputStats:
    """Input statistics of every (or the given) layer's o_proj and down_proj over the calibration rows (one
    pass through the model, resident or layer by layer: ``runtime.passes.forward_rows``)."""
    with InputStats(output_projections(adapter, layers)) as st:
        forward_rows(model, rows, batch_size)
    return st


def wanda_column_scores(weight: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    return weight.detach().double().abs().mean(0) * l2.to(weight.device)


def flap_column_scores(weight: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return var.to(weight.device) * weight.detach().double().pow(2).sum(0)


def head_scores(column_scores: torch.Tensor, head_dim: int) -> torch.Tensor:
    return column_scores.view(-1, head_dim).sum(1)


COLUMN_SCORES = {"flap": (flap_column_scores, "var"), "wanda": (wanda_column_scores, "l2")}  # rule -> (score, statistic)


def projection_scores(model, adapter: Adapter, stats: InputStats, rule: str) -> tuple[list, list]:
    """(per layer: the column scores of its ``o_proj`` input, per layer: those of its ``down_proj`` input, one per
    MLP channel) by ``rule`` (``flap`` or ``wanda``) from the statistics of ``collect_stats``; on the device of
    the weights."""
    score, statistic = COLUMN_SCORES[rule]
    of = getattr(stats, statistic)
    attn, mlp = [], []
    for i in range(len(adapter.layers())):
        with layer_weights(model, i) as layer:
            attn.append(score(adapter.proj(layer, adapter.o).weight, of(f"attn.{i}")))
            mlp.append(score(adapter.proj(layer, adapter.down).weight, of(f"mlp.{i}")))
    return attn, mlp


def compensation_bias(weight: torch.Tensor, mean: torch.Tensor, kept_columns) -> list[float] | None:
    """``W[:, removed] @ mean[removed]`` as a list (None when nothing is removed)."""
    keep = torch.zeros(weight.shape[1], dtype=torch.bool)
    keep[torch.as_tensor(list(kept_columns), dtype=torch.long)] = True
    if bool(keep.all()):
        return None
    removed = (~keep).nonzero().flatten()
    b = weight.detach().double()[:, removed.to(weight.device)] @ mean.to(weight.device)[removed.to(weight.device)]
    return [float(x) for x in b.cpu()]


def layer_compensation(model, adapter: Adapter, spec, stats: InputStats, layer: int, heads=None,
                       channels=None) -> tuple[list | None, list | None]:
    """(attention bias, MLP bias) of one layer that keeps ``heads`` / ``channels`` (None: that block is not
    narrowed and gets no bias), from the input means of ``collect_stats``."""
    attn = mlp = None
    with layer_weights(model, layer) as mod:
        if heads is not None:
            attn = compensation_bias(adapter.proj(mod, adapter.o).weight, stats.mean(f"attn.{layer}"),
                                     head_indices(heads, spec.head_dim))
        if channels is not None:
            mlp = compensation_bias(adapter.proj(mod, adapter.down).weight, stats.mean(f"mlp.{layer}"), channels)
    return attn, mlp


# --- rates: how rates become kept heads and channels (the one rule of wanda-sp, Self-Pruner and tell) ---------
#
# A rate ``r`` asks to remove the fraction ``r`` of some units' parameters. A layer gets one rate per block
# (tell: its attention and MLP blocks' assigned ratios; wanda-sp and Self-Pruner: the layer's rate for both):
# - heads: the valid GQA count (``valid_head_counts``: every kept key/value group keeps the same number of
#   query heads) nearest to ``(1 - r_attn) * n_heads``, ties to the smaller, at least one (``kept_heads_at``);
# - channels: the count nearest to ``(1 - r) * intermediate``, at least one (``kept_channels_at``), at the rate
#   ``r`` that brings the layer's removed width parameters (query heads, key/value heads, channels; norms are not
#   pruned) to ``r_attn * attention width + r_mlp * MLP width``: the channels absorb the head rounding, so a
#   layer's removed parameters are its budget to within half a channel, unless the head rounding alone goes
#   past the budget (then no channel goes). When the attention block is removed whole, ``r = r_mlp``.


def kept_heads_at(spec, rate: float) -> int:
    """Query heads an attention block keeps at ``rate`` (the rule above)."""
    target = (1.0 - rate) * spec.n_heads
    return min(valid_head_counts(spec), key=lambda c: (abs(c - target), c))


def kept_channels_at(spec, rate: float) -> int:
    """MLP channels an MLP block keeps at ``rate`` (the rule above)."""
    return min(max(math.ceil((1.0 - rate) * spec.intermediate - 0.5), 1), spec.intermediate)


def layer_width_params(spec) -> int:
    """Prunable width parameters of one (dense) layer: all query heads, KV heads and MLP channels."""
    return spec.n_heads * spec.q_head_params + spec.n_kv * spec.kv_head_params + spec.intermediate * spec.channel_params


def valid_head_counts(spec) -> list[int]:
    """Query-head counts a layer can keep under the GQA rule: g kept groups times k heads each."""
    return sorted({g * k for g in range(1, spec.n_kv + 1) for k in range(1, spec.group_size + 1)})


def mean_rate_for_ratio(spec, ratio: float) -> float:
    """The mean per-layer rate that removes ``ratio`` of the whole model (embeddings included)."""
    from ..errors import UserError

    width = layer_width_params(spec) * spec.n_layers
    rate = ratio * spec.total_params / width
    if rate > max_rate(spec):
        raise UserError(
            f"ratio {ratio} is out of reach for width pruning of this model: the layers' heads and channels are "
            f"{width / spec.total_params:.1%} of its parameters (the rest is embeddings and norms); "
            f"the most width pruning can remove is {width_reach(spec):.4f}"
        )
    return rate


def width_reach(spec, rate: float | None = None) -> float:
    """The ratio of the whole model removed when every layer is pruned at ``rate`` (default: the largest rate,
    ``max_rate``): the most width pruning can remove."""
    rate = max_rate(spec) if rate is None else min(rate, max_rate(spec))
    return rate * layer_width_params(spec) * spec.n_layers / spec.total_params


def max_rate(spec) -> float:
    """The largest rate a layer can take (one query head, its KV head and one channel stay)."""
    keep = spec.q_head_params + spec.kv_head_params + spec.channel_params
    return 1.0 - keep / layer_width_params(spec)


def layer_plan_at_rates(spec, attn_rate: float | None, mlp_rate: float | None, head_score, channel_score,
                        keep_heads: bool = False):
    """The LayerPlan of the rule above: the best-scoring heads and channels of a layer at one rate per block
    (``None``: that block is removed whole). ``keep_heads`` (--engine vllm): no head goes, the channels take
    the whole budget of the layer."""
    from ..plan import LayerPlan, removed_params, select_heads

    lp = LayerPlan(attn=attn_rate is not None, mlp=mlp_rate is not None)
    if lp.attn and attn_rate > 0 and not keep_heads:
        heads = select_heads(head_score, kept_heads_at(spec, attn_rate), spec.n_kv)
        lp.heads = heads if len(heads) < spec.n_heads else None
    if lp.mlp:
        mlp_width = spec.intermediate * spec.channel_params
        rate = mlp_rate
        if lp.attn:  # the layer index matters only for removed blocks
            attn_width = layer_width_params(spec) - mlp_width
            rate = (attn_rate * attn_width + mlp_rate * mlp_width - removed_params(spec, 0, lp)["attn_width"]) / mlp_width
        n_keep = kept_channels_at(spec, rate)
        if n_keep < spec.intermediate:
            lp.channels = sorted(torch.as_tensor(channel_score).argsort(descending=True)[:n_keep].tolist())
    return lp


def layer_plan_at_rate(spec, rate: float, head_score, channel_score, keep_heads: bool = False):
    """The LayerPlan of a layer at the layer rate ``rate`` (both blocks at ``rate``, clipped to [0, 1])."""
    rate = min(max(float(rate), 0.0), 1.0)
    return layer_plan_at_rates(spec, rate, rate, head_score, channel_score, keep_heads)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` over the last dimension (FLAP's per-layer standardization)."""
    x = x.double()
    return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(1e-30)


# --- masking: a plan's effect on the dense model, without surgery ---------------------------------------


def _zero_columns(idx: torch.Tensor):
    def hook(mod, args):
        x = args[0]
        return (x.index_fill(-1, idx.to(x.device), 0),) + tuple(args[1:])
    return hook


def _add_bias(bias: torch.Tensor):
    def hook(mod, args, out):
        return out + bias.to(out.device)
    return hook


class MaskedPlan:
    """Context manager: the dense model behaves as if ``layer_plans`` (``{layer index: LayerPlan}``) were
    applied. The inputs of removed heads' ``o_proj`` columns and removed channels' ``down_proj`` columns are
    zeroed by forward pre-hooks (the weights are not touched, so this works the same on a resident model and on
    one whose layers are read from the file as they run); bias compensation is added by forward hooks. Equal
    to surgery (tests/test_width_methods.py) at the cost of a dense forward pass, without copying the model."""

    def __init__(self, adapter: Adapter, spec, layer_plans: dict):
        self.adapter, self.spec, self.layer_plans = adapter, spec, layer_plans
        self._hooks = []

    def __enter__(self):
        from ..runtime import model_dtype

        layers = self.adapter.layers()
        hd = self.spec.head_dim
        dtype = model_dtype(self.adapter.model)
        for i, lp in self.layer_plans.items():
            o, down = self.adapter.proj(layers[i], self.adapter.o), self.adapter.proj(layers[i], self.adapter.down)
            kept_h = set(lp.kept_heads(self.spec))
            gone_h = [h for h in range(self.spec.n_heads) if h not in kept_h]
            kept_c = set(lp.kept_channels(self.spec))
            for lin, cols in ((o, head_indices(gone_h, hd)), (down, [c for c in range(self.spec.intermediate) if c not in kept_c])):
                if cols:
                    self._hooks.append(lin.register_forward_pre_hook(_zero_columns(torch.as_tensor(cols, dtype=torch.long))))
            for lin, b in ((o, lp.attn_bias), (down, lp.mlp_bias)):
                if b:
                    self._hooks.append(lin.register_forward_hook(_add_bias(torch.tensor(b, dtype=dtype))))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
