"""blockpruner: BlockPruner (Zhong et al., 2024). Greedy removal of attention and MLP blocks by calibration
perplexity, re-scored after every removal; the whole removal order is saved (``order.json``), so a plan for
any other ratio comes from it without searching again (``--from-order``). Engine: ``search.greedy``, run by
``search.depth``."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..plan import PruningPlan, RatioRule
from ..search.depth import SearchOptions, run_greedy
from ..search.greedy import ORDER_FORMAT, block_candidates, plan_from_order, reach
from . import PruneContext, register_method


@dataclass
class BlockPrunerConfig(SearchOptions):
    blocks: str = field(default="mix", metadata={"help": "candidate blocks: attention and MLP (mix), or only one kind", "choices": ["mix", "attn", "mlp"]})
    steps: int | None = field(default=None, metadata={"help": "search this many removals (the plan: the first K, or the --ratio prefix)"})
    from_order: str | None = field(default=None, metadata={"help": "take the plan from a saved order.json instead of searching"})


def load_order(path: str, ctx: PruneContext) -> dict:
    try:
        state = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"cannot read order file {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise UserError(f"order file {path} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(state, dict) or state.get("format") != ORDER_FORMAT or not isinstance(state.get("steps"), list):
        raise UserError(f"{path} is not a secateurs removal order (expected \"format\": \"{ORDER_FORMAT}\" and steps)")
    if state.get("dims") != ctx.spec.as_dict():
        raise UserError(f"order file {path} was searched on another model (dims {state.get('dims')}), not {ctx.spec.as_dict()}")
    return state


@register_method("blockpruner", "BlockPruner: greedy removal of attention/MLP blocks by calibration perplexity (saves the whole order)",
                 BlockPrunerConfig, needs_ratio=False, ratio_rule=RatioRule("blocks"), parallel=True,
                 reach=lambda spec, cfg: None if cfg.from_order else reach(spec, block_candidates(spec.n_layers, cfg.blocks)))
def blockpruner(ctx: PruneContext, cfg: BlockPrunerConfig) -> PruningPlan:
    if cfg.steps is not None and cfg.steps < 1:
        raise UserError(f"--steps must be >= 1 (got {cfg.steps})")
    if cfg.from_order:
        if ctx.ratio is None and cfg.steps is None:
            raise UserError("--from-order needs --ratio R or --steps K to choose the prefix of the order")
        state = load_order(cfg.from_order, ctx)
        ctx.record(order_file=str(cfg.from_order), searched=False)
    else:
        if ctx.ratio is None and cfg.steps is None:
            raise UserError("blockpruner needs --ratio R (0 < R < 1) or --steps K")
        cands = block_candidates(ctx.spec.n_layers, cfg.blocks)
        state = run_greedy(ctx, cfg, cands, "blockpruner", None if cfg.steps else ctx.ratio, cfg.steps)
    plan, k = plan_from_order(ctx.spec, state["steps"], ctx.ratio, cfg.steps, "blockpruner")
    ctx.record(steps_used=k)
    return plan
