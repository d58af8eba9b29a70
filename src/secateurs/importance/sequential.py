"""Wanda-sp's sequential width plan at given per-layer rates (used by wanda-sp and Self-Pruner).

Layers are pruned in order and each is calibrated on the outputs of the layers before it *as pruned*: the
calibration rows are captured once at the input of layer 0; for layer ``l`` the input statistics of its
output projections are gathered on the current hidden states, its heads and channels chosen by Wanda-sp
scores at its rate (``width.layer_plan_at_rate``), and the hidden states advanced through the layer as pruned
(simulated by masking, ``width.MaskedPlan``; the model stays dense). A layer-by-layer model (``--max-memory``)
reads each layer once; the hidden states stay within the budget (``runtime.onload.HiddenStore``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..plan import PruningPlan
from ..progress import progress_bar
from ..runtime.onload import HiddenStore
from ..runtime.passes import batches_of, capture_batches, layer_weights
from ..runtime.placement import onloader_of, to_module_device
from .activations import InputStats, run_layer
from .width import MaskedPlan, head_scores, layer_plan_at_rate, wanda_column_scores

if TYPE_CHECKING:
    from ..methods import PruneContext


def layer_inputs(ctx: PruneContext, batch_size: int):
    """Per calibration batch: the hidden states entering layer 0 and the keyword arguments of every layer."""
    embs, kws, _ = capture_batches(ctx.model, batches_of(ctx.calib, batch_size), finals=False)
    return list(zip(embs, kws))


@torch.no_grad()
def sequential_plan(ctx: PruneContext, rates: list[float], batch_size: int = 4, method: str = "wanda-sp") -> PruningPlan:
    """Wanda-sp at the given per-layer rates, layer by layer on the outputs of the already pruned layers."""
    ad, spec = ctx.adapter, ctx.spec
    plan = PruningPlan.dense(spec, method)
    batches = layer_inputs(ctx, batch_size)
    ol = onloader_of(ctx.model)
    hidden = HiddenStore(ol.spill if ol is not None else None)
    for b, (h, _) in enumerate(batches):
        hidden.put(b, h)
    kws = [kw for _, kw in batches]
    del batches
    for i in progress_bar(range(spec.n_layers), desc="wanda-sp layers", enabled=ctx.progress):
        with layer_weights(ctx.model, i) as layer:
            o, down = ad.proj(layer, ad.o), ad.proj(layer, ad.down)
            with InputStats({"o": o, "down": down}) as st:
                for b, kw in enumerate(kws):
                    run_layer(ad, layer, *to_module_device(layer, hidden.get(b), kw[i]))
            heads = head_scores(wanda_column_scores(o.weight, st.l2("o")), spec.head_dim)
            channels = wanda_column_scores(down.weight, st.l2("down"))
            plan.layers[i] = layer_plan_at_rate(spec, rates[i], heads.cpu(), channels.cpu(), ctx.keep_heads)
            with MaskedPlan(ad, spec, {i: plan.layers[i]}):
                for b, kw in enumerate(kws):
                    hidden.put(b, run_layer(ad, layer, *to_module_device(layer, hidden.get(b), kw[i])))
    hidden.close()
    return plan
