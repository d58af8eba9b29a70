"""shortgpt: ShortGPT (Men et al., 2024). Whole layers with the lowest Block Influence on the calibration
rows are removed in one shot, lowest first, until the parameter ratio is reached."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from ..importance.block_influence import block_influence
from ..plan import PruningPlan, RatioRule
from ..search.greedy import layer_candidates, reach
from . import MethodConfig, PruneContext, register_method


@dataclass
class ShortGPTConfig(MethodConfig):
    rule = RatioRule("layers")
    query_heads = "kept"

    batch_size: int = field(default=1, metadata={"help": "calibration rows per forward pass"})

    def reach(self, spec):
        return reach(spec, layer_candidates(spec.n_layers, False))

    def pass_rows(self) -> int:
        return self.batch_size


@register_method("shortgpt", "ShortGPT: remove the whole layers with the lowest Block Influence, in one shot", ShortGPTConfig)
def shortgpt(ctx: PruneContext, cfg: ShortGPTConfig) -> PruningPlan:
    bi = block_influence(ctx.model, ctx.adapter, ctx.calib, max(1, cfg.batch_size))
    plan = PruningPlan.dense(ctx.spec, "shortgpt")
    order = sorted(range(len(bi)), key=lambda l: (bi[l], l))
    removed = []
    for l in order:
        if plan.ratio(ctx.spec) >= ctx.ratio:
            break
        plan.layers[l].attn = plan.layers[l].mlp = False
        removed.append(l)
    if plan.ratio(ctx.spec) < ctx.ratio:
        raise UserError(f"target ratio {ctx.ratio} is out of reach: removing every layer gives {plan.ratio(ctx.spec):.4f}")
    ctx.record(block_influence=bi, removed_layers=removed)
    return plan
