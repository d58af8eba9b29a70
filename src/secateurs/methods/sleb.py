"""sleb: SLEB (Song et al., 2024). Greedy removal of whole layers by calibration perplexity, re-scored after
every removal, until the parameter ratio is reached. The first and last layers are kept by default (they are
the ones whose removal breaks a model; ``--no-keep-ends`` makes them candidates too). Same engine and
options as blockpruner (``search.greedy``, ``search.depth``), with a layer (both blocks) as the candidate; the
order is saved, and ``--from-order`` takes the plan of another ratio from it without searching again."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..plan import PruningPlan, RatioRule
from ..runtime.estimate import greedy_evaluations, steps_for_ratio
from ..search.depth import SearchOptions, load_order, run_greedy
from ..search.greedy import layer_candidates, plan_from_order, reach
from . import PruneContext, register_method


@dataclass
class SlebConfig(SearchOptions):
    rule = RatioRule("layers")

    keep_ends: bool = field(default=True, metadata={"help": "never remove the first and the last layer"})

    def reach(self, spec):
        return None if self.from_order else reach(spec, layer_candidates(spec.n_layers, self.keep_ends))

    def evaluations(self, spec, ratio, rows, engine=None) -> tuple[int, int, str]:
        """What the search will run (``runtime.estimate``): candidate evaluations over all calibration rows."""
        if self.from_order or ratio is None:
            return 0, rows, "no search" + (": the plan comes from --from-order" if self.from_order else "")
        cands = layer_candidates(spec.n_layers, self.keep_ends)
        sizes = [spec.block_params(c[0] // 2, "attn") + spec.block_params(c[0] // 2, "mlp") for c in cands]
        steps = steps_for_ratio(spec, ratio, sizes)
        return greedy_evaluations(len(cands), steps), rows, (
            f"{steps} greedy steps over {len(cands)} layers, every candidate evaluated in full (an upper bound)")


@register_method("sleb", "SLEB: greedy whole-layer removal by calibration perplexity (first and last layers kept)", SlebConfig)
def sleb(ctx: PruneContext, cfg: SlebConfig) -> PruningPlan:
    if cfg.from_order:
        state = load_order(cfg.from_order, ctx, "sleb")
    else:
        state = run_greedy(ctx, cfg, layer_candidates(ctx.spec.n_layers, cfg.keep_ends), "sleb", ctx.ratio, None)
    plan, k = plan_from_order(ctx.spec, state["steps"], ctx.ratio, None, "sleb")
    ctx.record(steps_used=k)
    return plan
