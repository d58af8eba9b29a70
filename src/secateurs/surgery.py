"""Applying a plan physically: removed blocks are gone, kept heads/channels are sliced into smaller tensors.

- Heads: rows of q (by query head), k and v (by key/value head), columns of o; the adapter then updates the
  attention module's own size attributes (``resize_attn``: the query-per-KV count).
- Channels: rows of gate and up, columns of down (``resize_mlp``).
- Bias compensation: added to the output projection (a bias-free projection gets a bias).
- A layer with both blocks removed is deleted from the layer list; a layer with one block removed becomes a
  ``branches.PartialLayer`` that keeps the surviving branch's modules under their original names (so state-dict
  keys stay those of the stock architecture) and runs ``h + post(module(pre(h)))`` for it alone.
- The adapter installs the remaining layers (``set_layers``): attention ``layer_idx`` values (their KV-cache
  slots), ``config.num_hidden_layers`` and ``config.layer_types`` are renumbered to the layers that remain.
"""
from __future__ import annotations

import torch
from torch import nn

from .branches import PartialLayer
from .models.base import Adapter, get_adapter, head_indices
from .plan import LayerPlan, PruningPlan


def _slice_linear(lin: nn.Linear, rows=None, cols=None, add_bias: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.data
    b = lin.bias.data if lin.bias is not None else None
    if rows is not None:
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=w.device)
        w = w.index_select(0, rows_t)
        b = b.index_select(0, rows_t) if b is not None else None
    if cols is not None:
        w = w.index_select(1, torch.as_tensor(cols, dtype=torch.long, device=w.device))
    if add_bias is not None:
        add_bias = add_bias.to(w.device, w.dtype)
        b = add_bias if b is None else b + add_bias
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    return new


def narrow_layer(adapter: Adapter, layer: nn.Module, lp: LayerPlan, spec) -> None:
    """Slices heads and channels of one layer in place and adds bias compensation."""
    hd = spec.head_dim
    if lp.attn and (lp.heads is not None or lp.attn_bias):
        attn = adapter.block(layer, "attn")
        heads, kv = lp.kept_heads(spec), lp.kept_kv(spec)
        cur_heads = getattr(attn, adapter.q).weight.shape[0] // hd
        if cur_heads != spec.n_heads and lp.heads is not None:
            raise ValueError("narrow_layer applies to a dense layer only")
        bias = torch.tensor(lp.attn_bias) if lp.attn_bias else None
        rows_q = head_indices(heads, hd) if lp.heads is not None else None
        rows_kv = head_indices(kv, hd) if lp.heads is not None else None
        setattr(attn, adapter.q, _slice_linear(getattr(attn, adapter.q), rows=rows_q))
        setattr(attn, adapter.k, _slice_linear(getattr(attn, adapter.k), rows=rows_kv))
        setattr(attn, adapter.v, _slice_linear(getattr(attn, adapter.v), rows=rows_kv))
        setattr(attn, adapter.o, _slice_linear(getattr(attn, adapter.o), cols=rows_q, add_bias=bias))
        adapter.resize_attn(attn, len(heads), len(kv))
    if lp.mlp and (lp.channels is not None or lp.mlp_bias):
        mlp = adapter.block(layer, "mlp")
        ch = lp.channels
        bias = torch.tensor(lp.mlp_bias) if lp.mlp_bias else None
        setattr(mlp, adapter.gate, _slice_linear(getattr(mlp, adapter.gate), rows=ch))
        setattr(mlp, adapter.up, _slice_linear(getattr(mlp, adapter.up), rows=ch))
        setattr(mlp, adapter.down, _slice_linear(getattr(mlp, adapter.down), cols=ch, add_bias=bias))
        adapter.resize_mlp(mlp, len(lp.kept_channels(spec)))


@torch.no_grad()
def apply_plan(model: nn.Module, plan: PruningPlan, spec=None) -> nn.Module:
    """Applies ``plan`` to a dense model in place and returns it. The plan is validated first."""
    adapter = get_adapter(model)
    spec = spec or adapter.spec()
    plan.validate(spec)
    layers = adapter.layers()
    if len(layers) != spec.n_layers:
        raise ValueError("apply_plan needs the dense model (its layer count differs from the plan's)")
    new_layers, kept = [], []
    for i, (layer, lp) in enumerate(zip(layers, plan.layers)):
        if not lp.attn and not lp.mlp:
            continue
        narrow_layer(adapter, layer, lp, spec)
        if lp.attn and lp.mlp:
            new_layers.append(layer)
        else:
            kind = "attn" if lp.attn else "mlp"
            new_layers.append(PartialLayer(layer, adapter.branch(kind), kind, len(new_layers), spec.head_dim))
        kept.append(i)
    adapter.set_layers(new_layers, kept)
    model.secateurs_plan = plan
    return model
