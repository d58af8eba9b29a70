"""blockpruner: BlockPruner (Zhong et al., 2024). Greedy removal of attention and MLP blocks by calibration
perplexity, re-scored after every removal; the whole removal order is saved (``order.json``), so a plan for
any other ratio comes from it without searching again (``--from-order``). Engine: ``search.greedy``, run by
``search.depth``."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from ..plan import PruningPlan, RatioRule
from ..models.base import Block
from ..runtime.estimate import greedy_evaluations, steps_for_ratio
from ..search.depth import SearchOptions, load_order, run_greedy
from ..search.greedy import block_candidates, plan_from_order, reach
from . import PruneContext, register_method


@dataclass
class BlockPrunerConfig(SearchOptions):
    needs_ratio = False  # --ratio or --steps (check)
    rule = RatioRule("blocks")

    blocks: str = field(default="mix", metadata={"help": "candidate blocks: attention and MLP (mix), or only one kind", "choices": ["mix", "attn", "mlp"]})
    steps: int | None = field(default=None, metadata={"help": "search this many removals (the plan: the first K, or the --ratio prefix)"})

    def check(self, ratio) -> None:
        super().check(ratio)
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps must be >= 1 (got {self.steps})")
        if ratio is None and self.steps is None:
            raise UserError("--from-order needs --ratio R or --steps K to choose the prefix of the order" if self.from_order
                            else "blockpruner needs --ratio R (0 < R < 1) or --steps K")

    def reach(self, spec):
        return None if self.from_order else reach(spec, block_candidates(spec.n_layers, self.blocks))

    def evaluations(self, spec, ratio, rows, engine=None) -> tuple[int, int, str]:
        """What the search will run (``runtime.estimate``): candidate evaluations over all calibration rows."""
        if self.from_order or (self.steps is None and ratio is None):
            return 0, rows, "no search" + (": the plan comes from --from-order" if self.from_order else "")
        cands = block_candidates(spec.n_layers, self.blocks)
        steps = self.steps or steps_for_ratio(spec, ratio, [spec.block_params(*Block.at(c[0])) for c in cands])
        return greedy_evaluations(len(cands), steps), rows, (
            f"{steps} greedy steps over {len(cands)} blocks, every candidate evaluated in full (the fast search "
            "abandons most of them early: an upper bound)")


@register_method("blockpruner", "BlockPruner: greedy removal of attention/MLP blocks by calibration perplexity (saves the whole order)",
                 BlockPrunerConfig)
def blockpruner(ctx: PruneContext, cfg: BlockPrunerConfig) -> PruningPlan:
    if cfg.from_order:
        state = load_order(cfg.from_order, ctx, "blockpruner")
    else:
        cands = block_candidates(ctx.spec.n_layers, cfg.blocks)
        state = run_greedy(ctx, cfg, cands, "blockpruner", None if cfg.steps else ctx.ratio, cfg.steps)
    plan, k = plan_from_order(ctx.spec, state["steps"], ctx.ratio, cfg.steps, "blockpruner")
    ctx.record(steps_used=k)
    return plan
