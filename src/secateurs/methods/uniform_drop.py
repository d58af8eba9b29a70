"""uniform-drop: the simplest depth baseline. Whole layers are dropped from the last but one backwards until
the parameter ratio is reached (the first and the last layer always stay). It needs no calibration and exists
to prove the pipeline end to end."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..plan import PruningPlan, RatioRule
from ..search.greedy import layer_candidates, reach
from . import MethodConfig, PruneContext, register_method


@dataclass
class UniformDropConfig(MethodConfig):
    rule = RatioRule("layers")
    query_heads = "kept"

    def reach(self, spec):
        return reach(spec, layer_candidates(spec.n_layers, keep_ends=True))

    def evaluations(self, spec, ratio, rows, engine=None) -> tuple[int, int, str]:
        """No search and no calibration pass (``runtime.estimate``)."""
        return 0, rows, "no calibration"


@register_method("uniform-drop", "drop whole layers from the last but one backwards (no calibration; a sanity baseline)",
                 UniformDropConfig)
def uniform_drop(ctx: PruneContext, cfg: UniformDropConfig) -> PruningPlan:
    plan = PruningPlan.dense(ctx.spec, "uniform-drop")
    for layer in range(ctx.spec.n_layers - 2, 0, -1):
        if plan.ratio(ctx.spec) >= ctx.ratio:
            break
        plan.layers[layer].attn = plan.layers[layer].mlp = False
    if plan.ratio(ctx.spec) < ctx.ratio:
        raise UserError(f"target ratio {ctx.ratio} is out of reach for uniform-drop: dropping every layer but the "
                        f"first and the last gives {plan.ratio(ctx.spec):.4f}")
    return plan
