"""tell: multi-unit pruning with per-block ratios from the model's own interactions (our design of Yang et al.,
ICML 2025, "Let LLM Tell What to Prune and How Much to Prune"; see docs/tell.md).

1. Importance of every block (attention and MLP of every layer): transfer entropy from the block's contribution
   to the final residual stream given the block's input (``importance/interaction.py``), on calibration data.
2. Cost of every unit kind (heads, channels, whole attention / MLP blocks) measured on this device
   (``importance/cost.py``, cached).
3. Per-block ratios (``search/assign.py``): the least informative blocks take the most load; the budget is the
   parameter ratio (``--ratio``) or the predicted prefill speedup (``--speedup``); a block whose ratio reaches
   ``--block-threshold`` is removed whole.
4. Inside a kept block: the lowest-FLAP heads / channels go, as many as the rate rule of the width methods
   says (``importance/width.py``), with FLAP's bias compensation.
5. With ``--speedup``, the plan's prefill speedup is then measured on a pruned copy; if it is off by more than
   ``--speedup-tolerance``, the cost-model target is rescaled by target/measured and the ratios assigned again
   (``--speedup-rounds`` times at most). Every round is recorded.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..importance.activations import InputStats
from ..importance.cost import CostModel, load_or_measure, measured_speedup
from ..importance.interaction import block_importance, collect_streams
from ..importance.width import (compensation_bias, flap_column_scores, head_scores, layer_plan_at_rates,
                                output_projections)
from ..models.base import BLOCK_KINDS, Block, ModelSpec, all_blocks, head_indices
from ..models.loading import cache_dir
from ..plan import PruningPlan, check_ratio
from ..search.assign import assign_ratios, load_weights
from . import PruneContext, register_method


@dataclass
class TellConfig:
    speedup: float | None = field(default=None, metadata={"help": "target measured prefill speedup (> 1), instead of --ratio"})
    assign: str = field(default="uniform", metadata={"help": "per-block ratios from importance, or uniform (won on SmolLM2, see docs/tell.md)", "choices": ["importance", "uniform"]})
    temperature: float = field(default=1.0, metadata={"help": "how strongly load follows (low) importance"})
    normalize: str = field(default="kind", metadata={"help": "compare a block's importance with blocks of its own kind, or with all", "choices": ["kind", "global"]})
    block_threshold: float = field(default=1.0, metadata={"help": "a block whose assigned ratio reaches this is removed whole (1.0: only blocks assigned everything)"})
    te_rank: int = field(default=32, metadata={"help": "principal components per variable in the transfer-entropy estimate"})
    te_noise: float = field(default=0.01, metadata={"help": "observation noise (relative variance) on the target stream"})
    te_target: str = field(default="final", metadata={"help": "stream the information must reach", "choices": ["final", "output"]})
    te_tokens: int = field(default=8192, metadata={"help": "calibration tokens used by the estimator (seeded subset)"})
    latency_len: int = field(default=256, metadata={"help": "prompt length of the cost micro-benchmark and latency checks"})
    latency_clock: str = field(default="cpu", metadata={"help": "timing of costs and speedup checks on a CPU: this process's CPU time on one thread (robust on a shared machine) or wall time; GPUs always use wall time", "choices": ["cpu", "wall"]})
    latency_reps: int = field(default=3, metadata={"help": "alternated dense/pruned passes per timing"})
    speedup_rounds: int = field(default=2, metadata={"help": "re-assignments after a measured speedup misses the target"})
    speedup_tolerance: float = field(default=0.03, metadata={"help": "relative miss of the measured speedup that is accepted"})
    refresh_costs: bool = field(default=False, metadata={"help": "measure the unit costs again instead of using the cache"})

    def check_budget(self, ratio) -> None:
        """Exactly one budget, and every option in range (called by the pipeline before any work)."""
        if (ratio is None) == (self.speedup is None):
            raise UserError("tell needs exactly one budget: --ratio R (0 < R < 1) or --speedup S (S > 1)")
        if self.speedup is not None and not self.speedup > 1.0:
            raise UserError(f"--speedup must be greater than 1 (got {self.speedup})")
        if ratio is not None:
            check_ratio(ratio)
        if not 0.0 < self.block_threshold <= 1.0:
            raise UserError(f"--block-threshold must be in (0, 1] (got {self.block_threshold})")
        if min(self.te_rank, self.te_tokens, self.latency_reps) < 1 or self.latency_len < 2 or self.speedup_rounds < 0:
            raise UserError("--te-rank, --te-tokens and --latency-reps must be >= 1, --latency-len >= 2, "
                            "--speedup-rounds >= 0")
        if not self.te_noise > 0 or self.temperature < 0 or not self.speedup_tolerance >= 0:
            raise UserError("--te-noise must be > 0, --temperature and --speedup-tolerance >= 0")


@dataclass
class WidthScores:
    heads: list  # per layer: FLAP score of every query head
    channels: list  # per layer: FLAP score of every MLP channel
    stats: InputStats


def width_scores(ctx: PruneContext, stats: InputStats) -> WidthScores:
    ad, spec = ctx.adapter, ctx.spec
    heads, channels = [], []
    for i, layer in enumerate(ad.layers()):
        o, down = ad.proj(layer, ad.o), ad.proj(layer, ad.down)
        heads.append(head_scores(flap_column_scores(o.weight, stats.var(f"attn.{i}")), spec.head_dim).tolist())
        channels.append(flap_column_scores(down.weight, stats.var(f"mlp.{i}")).tolist())
    return WidthScores(heads, channels, stats)


def build_plan(ctx: PruneContext, ratios: list[float], ws: WidthScores, compensate: bool) -> PruningPlan:
    """The plan of per-block ratios (in ``all_blocks`` order): 1.0 removes the block; otherwise the best-scoring
    heads / channels are kept, as many as the rate rule says (``layer_plan_at_rates``, importance/width.py).
    ``compensate=False`` puts zero placeholders where compensation biases go (same parameter count, no
    computation)."""
    spec, ad = ctx.spec, ctx.adapter
    plan = PruningPlan.dense(spec, "tell")
    zeros = [0.0] * spec.hidden
    layers = ad.layers()
    for i in range(spec.n_layers):
        r_attn, r_mlp = (ratios[Block(i, k).pos] for k in BLOCK_KINDS)
        lp = plan.layers[i] = layer_plan_at_rates(spec, r_attn if r_attn < 1.0 else None,
                                                  r_mlp if r_mlp < 1.0 else None, ws.heads[i], ws.channels[i])
        if lp.heads is not None:
            lp.attn_bias = zeros if not compensate else compensation_bias(
                ad.proj(layers[i], ad.o).weight, ws.stats.mean(f"attn.{i}"), head_indices(lp.heads, spec.head_dim))
        if lp.channels is not None:
            lp.mlp_bias = zeros if not compensate else compensation_bias(
                ad.proj(layers[i], ad.down).weight, ws.stats.mean(f"mlp.{i}"), lp.channels)
    return plan


def calibration_key(ctx: PruneContext, cfg: TellConfig) -> str:
    """Identifies a calibration result: the model (name, configuration and a checksum of its weights), the
    calibration rows and the estimator settings."""
    h = hashlib.sha256()
    h.update(json.dumps({"name": getattr(ctx.model.config, "_name_or_path", ""), "spec": ctx.spec.as_dict(),
                         "rank": cfg.te_rank, "noise": cfg.te_noise, "target": cfg.te_target,
                         "tokens": cfg.te_tokens, "seed": ctx.seed}, sort_keys=True).encode())
    h.update(ctx.calib.cpu().numpy().tobytes())
    with torch.no_grad():
        for p in list(ctx.model.parameters())[:: max(1, len(list(ctx.model.parameters())) // 16)]:
            h.update(f"{float(p.double().sum()):.12e}".encode())
    return h.hexdigest()[:20]


def calibrate(ctx: PruneContext, cfg: TellConfig) -> tuple[list[float], InputStats]:
    """Block importance and FLAP input statistics from the same forward passes. Kept in the run's workdir
    (resume) and in ``cache_dir()/tell/<key>.pt`` (other ratios / budgets on the same model and calibration
    reuse it; the key is ``calibration_key``)."""
    path = ctx.workdir / "tell_calibration.pt"
    shared = cache_dir() / "tell" / f"{calibration_key(ctx, cfg)}.pt"
    for src in (path, shared):
        if src.exists():
            saved = torch.load(src, weights_only=False)
            st = InputStats({})
            st.stats = saved["stats"]
            return saved["importance"], st
    with InputStats(output_projections(ctx.adapter)) as st:
        streams = collect_streams(ctx.model, ctx.adapter, ctx.calib, max_tokens=cfg.te_tokens, seed=ctx.seed,
                                  progress=ctx.progress)
    importance = block_importance(streams, cfg.te_rank, cfg.te_noise, cfg.te_target)
    del streams
    shared.parent.mkdir(parents=True, exist_ok=True)
    for dst in (path, shared):
        tmp = dst.with_name(dst.name + ".tmp")
        torch.save({"importance": importance, "stats": st.stats}, tmp)
        tmp.replace(dst)
    return importance, st


@dataclass
class Prepared:
    """What tell measures once per model and calibration: importance, width scores, unit costs."""

    importance: list
    ws: WidthScores
    costs: CostModel
    cost_path: str


def prepare(ctx: PruneContext, cfg: TellConfig) -> Prepared:
    log = print if ctx.progress else (lambda *a: None)
    importance, stats = calibrate(ctx, cfg)
    costs, cost_path = load_or_measure(ctx.model, ctx.spec, cfg.latency_len, cfg.latency_reps, ctx.seed,
                                       refresh=cfg.refresh_costs, log=log, clock=cfg.latency_clock)
    return Prepared(importance, width_scores(ctx, stats), costs, cost_path)


def weights_for(spec: ModelSpec, importance: list, cfg: TellConfig) -> list[float]:
    groups = [b.kind for b in all_blocks(spec.n_layers)] if cfg.normalize == "kind" else None
    return load_weights(importance, cfg.assign, cfg.temperature, groups)


def assign_plan(ctx: PruneContext, cfg: TellConfig, prep: Prepared) -> tuple[PruningPlan, list, list, list]:
    """(plan, per-block ratios, load weights, speedup rounds) for the budget in ``ctx.ratio`` / ``cfg.speedup``."""
    spec, costs = ctx.spec, prep.costs
    log = print if ctx.progress else (lambda *a: None)
    weights = weights_for(spec, prep.importance, cfg)

    def structural(ratios):
        return build_plan(ctx, ratios, prep.ws, compensate=False)

    rounds = []
    if ctx.ratio is not None:
        ratios = assign_ratios(weights, lambda r: structural(r).ratio(spec), ctx.ratio, cfg.block_threshold, "ratio")
    else:
        goal = cfg.speedup
        for rnd in range(cfg.speedup_rounds + 1):
            ratios = assign_ratios(weights, lambda r: costs.speedup(spec, structural(r)), goal, cfg.block_threshold,
                                   "predicted speedup")
            plan = structural(ratios)
            m = measured_speedup(ctx.model, plan, spec, cfg.latency_len, cfg.latency_reps, ctx.seed, cfg.latency_clock)
            rounds.append({"cost_model_goal": goal, "predicted": costs.speedup(spec, plan), **m})
            log(f"tell: round {rnd}: cost-model goal {goal:.3f}, predicted {rounds[-1]['predicted']:.3f}, "
                f"measured {m['speedup']:.3f} (target {cfg.speedup})")
            if abs(m["speedup"] / cfg.speedup - 1) <= cfg.speedup_tolerance:
                break
            goal = max(1.0 + 1e-6, goal * cfg.speedup / m["speedup"])
    plan = build_plan(ctx, ratios, prep.ws, compensate=True)
    plan.validate(spec)
    return plan, ratios, weights, rounds


@register_method("tell", "multi-unit pruning: per-block ratios from transfer entropy and measured unit costs; "
                 "whole blocks or FLAP width with bias compensation (--ratio or --speedup)", TellConfig, needs_ratio=False)
def tell(ctx: PruneContext, cfg: TellConfig) -> PruningPlan:
    cfg.check_budget(ctx.ratio)
    spec = ctx.spec
    prep = prepare(ctx, cfg)
    plan, ratios, weights, rounds = assign_plan(ctx, cfg, prep)
    costs, importance = prep.costs, prep.importance
    kept = plan.kept_fraction(spec)
    blocks = []
    for b, ((i, kind), r) in enumerate(zip(all_blocks(spec.n_layers), ratios)):
        removed = 1.0 - kept[i][kind]
        blocks.append({
            "block": Block(i, kind).name, "layer": i, "kind": kind, "params": spec.block_params(i, kind),
            "importance": importance[b], "load_weight": weights[b],
            "cost_ms_whole": costs.block_ms(spec, i, kind),
            "ratio_assigned": r, "units_removed": removed,
            "action": "removed" if r >= 1.0 else ("narrowed" if removed > 0 else "kept"),
        })
    ctx.record(
        blocks=blocks,
        budget={"ratio": ctx.ratio, "speedup": cfg.speedup},
        predicted_speedup=costs.speedup(spec, plan),
        speedup_rounds=rounds,
        cost_model={"path": prep.cost_path, "device": costs.device, "prompt_len": costs.prompt_len, "clock": costs.clock,
                    "dense_ms": costs.dense_ms, "ms_per_param": costs.ms_per_param, "adjusted": costs.adjusted},
    )
    return plan
