"""self-pruner: an LLM-driven evolutionary search of per-layer pruning rates (Huang et al., arXiv 2502.14413),
applied by wanda-sp.

- Search space: one rate per layer in ``[--rate-min, --rate-max]`` on a grid of ``--rate-step``; the mean is
  the rate that gives the target ratio (``mean_rate_for_ratio``).
- Fitness: calibration perplexity (first ``--fitness-rows`` calibration rows) of the model pruned at those
  rates by wanda-sp. Cheap by design: the Wanda-sp scores are computed once, in one calibration pass over the
  dense model (one-shot scores, not the layer-by-layer re-calibration), and a candidate is evaluated by
  masking the dense model (``MaskedPlan``: removed columns of o_proj/down_proj zeroed in place and restored
  afterwards); no copy of the model. The fitness cache is keyed by the rate vector. With ``--workers``, each
  generation's new vectors are scored on the worker pool, every worker masking its own replica.
- Loop and log: ``secateurs.search.evolution`` (``search.jsonl`` in the run folder; resumable).
- Operators: ``--proposer local|openai|classic`` (``secateurs.search.proposers``).
- The final plan is built by the full sequential wanda-sp at the best rates found.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..eval.perplexity import perplexity
from ..models import get_adapter
from ..importance.sequential import sequential_plan
from ..importance.width import (MaskedPlan, collect_stats, head_scores, layer_plan_at_rate, mean_rate_for_ratio,
                                output_projections, wanda_column_scores, width_reach)
from ..search.evolution import EvolutionConfig, SearchSpace, evolve
from ..search.proposers import make_proposer
from ..plan import PruningPlan
from . import PruneContext, register_method


@dataclass
class SelfPrunerConfig:
    proposer: str = field(default="local", metadata={
        "help": "who performs the evolutionary operators", "choices": ["openai", "local", "classic"]})
    population: int = field(default=30, metadata={"help": "population size"})
    generations: int = field(default=20, metadata={"help": "generations after the initial population"})
    crossover: int = field(default=10, metadata={"help": "crossover children per generation"})
    mutation: int = field(default=10, metadata={"help": "mutation children per generation"})
    rate_min: float = field(default=0.0, metadata={"help": "lowest per-layer rate"})
    rate_max: float = field(default=0.9, metadata={"help": "highest per-layer rate"})
    rate_step: float = field(default=0.01, metadata={"help": "grid of the per-layer rates"})
    fitness_rows: int = field(default=4, metadata={"help": "calibration rows of the fitness perplexity"})
    llm_model: str | None = field(default=None, metadata={
        "help": "local: model name or folder (default smollm2-135m); openai: model id (default $SECATEURS_LLM_MODEL)"})
    llm_base_url: str | None = field(default=None, metadata={
        "help": "openai: endpoint base URL, e.g. http://127.0.0.1:8000/v1 (default $OPENAI_BASE_URL; key from $OPENAI_API_KEY)"})
    llm_retries: int = field(default=2, metadata={"help": "retries of an unusable LLM answer before the classical operator fills in"})
    llm_temperature: float = field(default=0.7, metadata={"help": "LLM sampling temperature (seeded)"})
    llm_max_tokens: int = field(default=400, metadata={"help": "upper bound of tokens per LLM answer"})
    batch_size: int = field(default=4, metadata={"help": "calibration rows per forward pass"})


class MaskedFitness:
    """Perplexity of the dense model masked as wanda-sp at the given rates would prune it (one-shot scores).
    Built in this process, or on each pool worker from its own replica of the model (``--workers``)."""

    def __init__(self, model, scores: tuple[list, list], rows: torch.Tensor, batch_size: int):
        self.model, self.adapter = model, get_adapter(model)
        self.spec = self.adapter.spec()
        self.heads, self.channels = scores
        self.rows, self.batch_size = rows, batch_size

    @staticmethod
    def scores(ctx: PruneContext, batch_size: int) -> tuple[list, list]:
        """Per-layer head and channel scores from one calibration pass over the dense model."""
        stats = collect_stats(ctx.model, ctx.adapter, ctx.calib, batch_size)
        projs = output_projections(ctx.adapter)
        heads, channels = [], []
        for i in range(ctx.spec.n_layers):
            o, down = projs[f"attn.{i}"], projs[f"mlp.{i}"]
            heads.append(head_scores(wanda_column_scores(o.weight, stats.l2(f"attn.{i}")), ctx.spec.head_dim).cpu())
            channels.append(wanda_column_scores(down.weight, stats.l2(f"mlp.{i}")).cpu())
        return heads, channels

    def plans(self, rates) -> dict:
        return {i: layer_plan_at_rate(self.spec, r, self.heads[i], self.channels[i]) for i, r in enumerate(rates)}

    def __call__(self, rates) -> float:
        with MaskedPlan(self.adapter, self.spec, self.plans(rates)):
            return perplexity(self.model, self.rows, self.batch_size).ppl


def check(cfg: SelfPrunerConfig, ctx: PruneContext) -> None:
    for name in ("population", "fitness_rows", "batch_size", "llm_max_tokens"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    for name in ("generations", "crossover", "mutation", "llm_retries"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more (got {getattr(cfg, name)})")
    if cfg.fitness_rows > ctx.calib.shape[0]:
        raise UserError(f"--fitness-rows {cfg.fitness_rows} exceeds the {ctx.calib.shape[0]} calibration rows (--nsamples)")


@register_method("self-pruner", "evolutionary search of per-layer wanda-sp rates, operators performed by an LLM "
                 "(openai endpoint, local model) or classically", SelfPrunerConfig, parallel=True,
                 reach=lambda spec, cfg: width_reach(spec, cfg.rate_max))
def self_pruner(ctx: PruneContext, cfg: SelfPrunerConfig) -> PruningPlan:
    check(cfg, ctx)
    spec = ctx.spec
    space = SearchSpace(spec.n_layers, mean_rate_for_ratio(spec, ctx.ratio), cfg.rate_min, cfg.rate_max, cfg.rate_step)
    proposer = make_proposer(cfg.proposer, llm_model=cfg.llm_model, llm_base_url=cfg.llm_base_url,
                             retries=cfg.llm_retries, temperature=cfg.llm_temperature, max_tokens=cfg.llm_max_tokens,
                             device=str(next(ctx.model.parameters()).device))
    scores = MaskedFitness.scores(ctx, cfg.batch_size)
    rows = ctx.calib[: cfg.fitness_rows].clone()
    evo = EvolutionConfig(cfg.population, cfg.generations, cfg.crossover, cfg.mutation, ctx.seed)
    log = print if ctx.progress else None
    path = ctx.workdir / "search.jsonl"
    if ctx.pool is None:
        result = evolve(space, MaskedFitness(ctx.model, scores, rows, cfg.batch_size), proposer, evo, path, log=log)
    else:  # each generation's new vectors on the pool, every worker masking its own replica
        with ctx.pool.start(MaskedFitness, scores, rows, cfg.batch_size, progress=ctx.progress) as workers:
            def on_pool(vectors):
                return workers.map(vectors, "__call__", lambda v: (v,), progress=ctx.progress,
                                   desc=f"fitness ({len(workers.alive)} workers)")
            result = evolve(space, None, proposer, evo, path, log=log, fitness_batch=on_pool)
    ctx.count_ppl(result.new_evaluations)
    plan = sequential_plan(ctx, result.best.rates, cfg.batch_size, "self-pruner")
    ctx.record(rates=result.best.rates, mean_rate=space.mean, best_fitness=result.best.fitness,
               uniform_fitness=result.uniform.fitness, fitness_evaluations=result.evaluations,
               fitness_evaluations_this_run=result.new_evaluations, search_wall_s=result.wall_s,
               search=result.stats, kept=plan.kept_fraction(spec))
    return plan
