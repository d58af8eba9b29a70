"""self-pruner: an LLM-driven evolutionary search of per-layer pruning rates (Huang et al., arXiv 2502.14413),
applied by wanda-sp.

- Search space: one rate per layer in ``[--rate-min, --rate-max]`` on a grid of ``--rate-step``; the mean is
  the rate that gives the target ratio (``mean_rate_for_ratio``).
- Fitness: calibration perplexity (the first ``--fitness-rows`` calibration rows; by default 4, or all of them
  when there are fewer) of the model pruned at those
  rates by wanda-sp. Cheap by design: the Wanda-sp scores are computed once, in one calibration pass over the
  dense model (one-shot scores, not the layer-by-layer re-calibration), and a candidate is evaluated by
  masking the dense model (``MaskedPlan``: removed columns of o_proj/down_proj zeroed in place and restored
  afterwards); no copy of the model. The fitness cache is keyed by the rate vector. With ``--workers``, each
  generation's new vectors are scored on the worker pool, every worker masking its own replica.
- Loop and log: ``secateurs.search.evolution`` (``search.jsonl`` in the run folder; resumable).
- Operators: ``--proposer auto|classic|local|openai`` (``secateurs.search.proposers``; ``auto``, the default, is
  chosen by ``choose_proposer``: the model proposing for itself where that won, classic elsewhere). ``local`` runs a GGUF chat
  model in llama.cpp with grammar-constrained answers (``proposer_gguf``): ``--proposer-model``, a GGUF file or
  an embedded model's name (its offline GGUF, fetched on first use), or by default the model being pruned
  proposing for itself: an embedded model's offline GGUF, or else the model converted once to q8_0 by the GGUF
  export and cached under ``$SECATEURS_CACHE/proposers/`` (keyed by a fingerprint of its weights and tokenizer).
  A local proposer must be a chat model and fit the memory left beside the model being pruned (its file plus
  its KV cache, ``check_proposer_memory``): else the run stops before the search.
- What the LLM is asked and shown: ``--llm-task vectors|edits``, ``--llm-start llm|uniform`` and the screen of
  ``search.screen``, with tell's measured per-block responses when its cache holds them for this model and
  calibration (``methods.tell.dense_responses``).
- The final plan is built by the full sequential wanda-sp at the best rates found.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..eval.perplexity import perplexity
from ..models import get_adapter
from ..importance.sequential import sequential_plan
from ..importance.width import (MaskedPlan, collect_stats, head_scores, layer_plan_at_rate, mean_rate_for_ratio,
                                projection_scores, width_reach)
from ..runtime import onloader_of
from ..runtime.estimate import Held, hidden_bytes, input_stats
from ..search.evolution import EvolutionConfig, SearchSpace, evolve
from ..search.proposers import EndpointDown, make_proposer
from ..plan import PruningPlan
from . import MethodConfig, PruneContext, register_method


FITNESS_ROWS = 4  # the fitness rows when --fitness-rows is not given (at most the calibration rows)
# --proposer auto: a chat model of at least this many parameters proposes for itself, asked for edits of a parent
# from the uniform first population (the 1.5B pruning itself beat the classic operators at equal evaluations;
# SmolLM2-135M proposing, for itself or by the 1.5B, did not where the model stayed usable: docs/width.md)
SELF_PROPOSER_MIN_PARAMS = 10**9
AUTO_FORMULATION = ("edits", "uniform")  # --llm-task / --llm-start of a proposer chosen by auto
LLM_FORMULATION = ("vectors", "llm")  # ... of --proposer local / openai (the paper's: whole vectors, its own start)


@dataclass
class SelfPrunerConfig(MethodConfig):
    searches = True
    parallel = True

    proposer: str = field(default="auto", metadata={
        "help": "who performs the evolutionary operators: classic (numeric genetic operators), local (a GGUF model "
                "in llama.cpp, answers constrained by a grammar), openai (an OpenAI-compatible endpoint), auto (openai "
                "with --endpoint, local with --proposer-model; else local when the model being pruned is a chat model "
                f"of at least {SELF_PROPOSER_MIN_PARAMS / 1e9:g}B parameters, proposing for itself with --llm-task "
                f"{AUTO_FORMULATION[0]} --llm-start {AUTO_FORMULATION[1]}, where that beat the classic operators; "
                "classic otherwise: docs/width.md)",
        "choices": ["auto", "classic", "local", "openai"]})
    population: int = field(default=30, metadata={"help": "population size"})
    generations: int = field(default=20, metadata={"help": "generations after the initial population"})
    crossover: int = field(default=10, metadata={"help": "crossover children per generation"})
    mutation: int = field(default=10, metadata={"help": "mutation children per generation"})
    rate_min: float = field(default=0.0, metadata={"help": "lowest per-layer rate"})
    rate_max: float = field(default=0.9, metadata={"help": "highest per-layer rate"})
    rate_step: float = field(default=0.01, metadata={"help": "grid of the per-layer rates"})
    fitness_rows: int | None = field(default=None, metadata={
        "help": f"calibration rows of the fitness perplexity (default {FITNESS_ROWS}, or every calibration row when "
                "--nsamples gives fewer). Each row is one forward pass per evaluation; on qwen2.5-coder-1.5b (one "
                "thread, 256 tokens) a row took 14 s, and the order of 5 candidates agreed with 16 rows' order at "
                "Kendall tau 0.6 / 0.8 / 1.0 with 1 / 2 / 4 rows (docs/width.md)"})
    proposer_model: str | None = field(default=None, metadata={
        "aliases": ["--llm-model"],
        "help": "local: a GGUF chat model file (default: the model being pruned, its offline GGUF or its cached "
                "q8_0 conversion); openai: the model id (default $SECATEURS_LLM_MODEL, else the endpoint's first)"})
    endpoint: str | None = field(default=None, metadata={
        "aliases": ["--llm-base-url"],
        "help": "openai: endpoint base URL, e.g. http://127.0.0.1:8000/v1 (default $OPENAI_BASE_URL; key from $OPENAI_API_KEY)"})
    endpoint_timeout: float = field(default=120.0, metadata={"help": "openai: seconds to wait for one answer"})
    endpoint_wait: float = field(default=600.0, metadata={
        "help": "openai: how long to keep retrying an endpoint that does not answer before the search stops "
                "(resumable: run the same command again)"})
    llm_task: str | None = field(default=None, metadata={
        "help": "what the LLM is asked for: vectors (a whole rate vector per child) or edits (2 to 8 layer: new-rate "
                "changes to the child's parent, the uniform plan for the first population); default "
                f"{AUTO_FORMULATION[0]} when auto chose the model itself, else {LLM_FORMULATION[0]}",
        "choices": ["vectors", "edits"]})
    llm_start: str | None = field(default=None, metadata={
        "help": "who writes the first population: llm, or uniform (the classic perturbations of the uniform rates; "
                f"the LLM takes over from the first generation); default {AUTO_FORMULATION[1]} when auto chose the "
                f"model itself, else {LLM_FORMULATION[1]}", "choices": ["llm", "uniform"]})
    llm_retries: int = field(default=2, metadata={"help": "retries of an unusable LLM answer before the classical operator fills in"})
    llm_temperature: float = field(default=0.7, metadata={"help": "LLM sampling temperature (seeded)"})
    llm_max_tokens: int = field(default=1024, metadata={"help": "upper bound of tokens per LLM answer"})
    batch_size: int = field(default=4, metadata={"help": "calibration rows per forward pass"})

    def check(self, ratio) -> None:
        super().check(ratio)
        for name in ("population", "fitness_rows", "batch_size", "llm_max_tokens", "endpoint_timeout"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        for name in ("generations", "crossover", "mutation", "llm_retries", "endpoint_wait"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be 0 or more (got {getattr(self, name)})")
        if self.endpoint and self.proposer not in ("openai", "auto"):
            raise UserError(f"--endpoint applies to --proposer openai (the proposer is {self.proposer})")
        if self.proposer_model and self.proposer == "classic":
            raise UserError("--proposer-model applies to --proposer local or openai (the proposer is classic)")
        if self.proposer == "classic" and (self.llm_task or self.llm_start):
            raise UserError("--llm-task and --llm-start apply to --proposer local or openai (the proposer is classic)")
        if self.proposer in ("local", "auto") and self.proposer_model and not self.endpoint:
            proposer_file(self.proposer_model)

    def check_loaded(self, model, model_ref):
        """A local proposer that is an embedded model's or the given file fits the memory left beside the model."""
        from ..sources import EMBEDDED

        cfg, _ = choose_proposer(self, model, model_ref)
        if cfg.proposer == "local" and (cfg.proposer_model or model_ref in EMBEDDED):
            name = cfg.proposer_model or model_ref
            check_proposer_memory(proposer_file(name), model)

    def reach(self, spec):
        return width_reach(spec, self.rate_max)

    def pass_rows(self) -> int:
        return self.batch_size

    def held(self, sizes, rows, seqlen, onload):
        fit = hidden_bytes(sizes, min(self.fitness_rows or FITNESS_ROWS, rows), seqlen)
        return [Held("hidden states of the calibration rows (final wanda-sp pass)", hidden_bytes(sizes, rows, seqlen)),
                input_stats(sizes), Held("hidden states of the fitness rows", fit if onload else 0)]

    def evaluations(self, spec, ratio, rows, engine=None) -> tuple[int, int, str]:
        """What the search will run (``runtime.estimate``): fitness evaluations on --fitness-rows rows."""
        n = max(0, self.population) + max(0, self.generations) * max(0, self.crossover + self.mutation)
        return n, min(self.fitness_rows or FITNESS_ROWS, rows), (f"at most {n} fitness evaluations (population {self.population}, "
                                                 f"{self.generations} generations of {self.crossover + self.mutation} "
                                                 "children; repeated vectors are not evaluated again)")

    def cached_work(self, model, calib, seed: int, engine=None, model_ref=None) -> str | None:
        """For ``prune --dry-run``: the LLM proposer's answers beside the fitness evaluations: how many, one timed
        here (local: a mutation prompt showing the first population, from an empty KV cache), and its memory."""
        cfg, _ = choose_proposer(self, model, model_ref)
        if cfg.proposer == "classic":
            return None
        n = llm_answers(cfg)
        if cfg.proposer == "openai":
            return f"self-pruner: about {n} LLM answers from the endpoint beside the evaluations (not timed by --dry-run)"
        from ..runtime.estimate import format_duration
        from ..runtime.placement import format_size
        from ..sources import EMBEDDED

        if not cfg.proposer_model and model_ref not in EMBEDDED:
            return (f"self-pruner: about {n} LLM answers beside the evaluations; the model is converted to a q8_0 "
                    "GGUF to propose for itself first (not timed by --dry-run)")
        ctx = PruneContext.build(model, calib, seed=seed, workdir=".", progress=False, model_ref=model_ref)
        gguf, _ = proposer_gguf(cfg, ctx, None)
        mem = check_proposer_memory(gguf, model)
        seconds = time_one_answer(cfg, gguf, ctx)
        left = "" if mem["left_bytes"] is None else f", {format_size(mem['left_bytes'])} left beside the model"
        return (f"self-pruner: about {n} LLM answers beside the evaluations; one took {seconds:.1f} s here ({gguf.name}, "
                f"--llm-task {cfg.llm_task}; later prompts show more history but reuse the KV cache's common start): "
                f"about {format_duration(n * seconds)} of LLM time; the proposer needs {format_size(mem['proposer_bytes'])}"
                f"{left}")


def choose_proposer(cfg: SelfPrunerConfig, model, model_ref: str | None, tokenizer=None,
                    known: bool = False) -> tuple[SelfPrunerConfig, str]:
    """(the config with its proposer and LLM formulation decided, why): ``--proposer auto`` becomes openai with
    --endpoint, local with --proposer-model, else local when the model being pruned has at least
    SELF_PROPOSER_MIN_PARAMS parameters and can propose for itself (an embedded model, or a tokenizer with a chat
    template; ``known``: the tokenizer is the model's, None meaning it has none), classic otherwise. Decided by
    the model and the options alone, never by the machine."""
    import dataclasses

    from ..models.base import unique_param_count
    from ..sources import EMBEDDED

    proposer, why = cfg.proposer, f"--proposer {cfg.proposer}"
    formulation = LLM_FORMULATION
    if proposer == "auto":
        n = unique_param_count(model)
        size = f"{n / 1e9:.2f}B parameters"
        chat = model_ref in EMBEDDED or not known or getattr(tokenizer, "chat_template", None) is not None
        if cfg.endpoint:
            proposer, why = "openai", "auto: --endpoint given"
        elif cfg.proposer_model:
            proposer, why = "local", "auto: --proposer-model given"
        elif n < SELF_PROPOSER_MIN_PARAMS:
            proposer, why = "classic", (f"auto: {size}, under {SELF_PROPOSER_MIN_PARAMS / 1e9:g}B, where the classic "
                                        "operators found the better plans (docs/width.md)")
        elif not chat:
            proposer, why = "classic", f"auto: {size}, but not a chat model (no chat template) to propose for itself"
        else:
            proposer, why = "local", (f"auto: {size}, a chat model proposing for itself (where it beat the classic "
                                      "operators at equal evaluations: docs/width.md)")
            formulation = AUTO_FORMULATION
    if proposer == "classic":
        if cfg.llm_task or cfg.llm_start:  # an explicit classic is refused in check()
            raise UserError(f"--llm-task and --llm-start apply to an LLM proposer, and --proposer auto chose classic "
                            f"({why.removeprefix('auto: ')}); pass --proposer local to have the model propose")
        return dataclasses.replace(cfg, proposer=proposer), why
    return dataclasses.replace(cfg, proposer=proposer, llm_task=cfg.llm_task or formulation[0],
                               llm_start=cfg.llm_start or formulation[1]), why


def time_one_answer(cfg: SelfPrunerConfig, gguf: Path, ctx: PruneContext) -> float:
    """Seconds of one mutation answer of the local proposer, its prompt showing a first population (classic
    vectors, placeholder fitness): what ``--dry-run`` multiplies by the answers."""
    import random

    from ..search.evolution import Individual
    from ..search.proposers import ClassicProposer

    spec = ctx.spec
    space = SearchSpace(spec.n_layers, min(0.2, cfg.rate_max / 2), cfg.rate_min, cfg.rate_max, cfg.rate_step)
    rng = random.Random(0)
    shown = [space.uniform()] + [p.rates for p in ClassicProposer().initial(space, min(cfg.population, 8) - 1, rng)]
    population = [Individual(r, 100.0 + i) for i, r in enumerate(shown)]
    proposer = make_proposer("local", gguf=gguf, retries=0, temperature=cfg.llm_temperature,
                             max_tokens=cfg.llm_max_tokens, task=cfg.llm_task, responses=responses_for(cfg, ctx, None))
    try:
        return proposer.mutate(space, population, 0, rng).seconds
    finally:
        proposer.close()


def fingerprint(model, tokenizer) -> str:
    """A key of the weights and tokenizer (names, shapes, dtypes and a strided sample of every tensor)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    h.update(f"{len(tokenizer)}:{getattr(tokenizer, 'chat_template', None)}".encode())
    return h.hexdigest()[:20]


def proposer_file(name: str, progress: bool = False) -> Path:
    """The GGUF file of ``--proposer-model`` (an embedded model's name: its offline GGUF, fetched on first use;
    else a file), checked to be a chat model (``llamacpp.chat.check_chat_file``)."""
    from ..llamacpp.chat import check_chat_file
    from ..sources import EMBEDDED, embedded_gguf

    if name in EMBEDDED:
        return embedded_gguf(name, progress=progress)
    p = Path(name).expanduser()
    if p.suffix.lower() != ".gguf" or not p.is_file():
        raise UserError(f"--proposer-model for --proposer local is a GGUF chat model file or one of {sorted(EMBEDDED)} "
                        f"(got {name!r})")
    check_chat_file(p)
    return p


def proposer_gguf(cfg: SelfPrunerConfig, ctx: PruneContext, log) -> tuple[Path, str]:
    """(GGUF file, how it was chosen) of the local proposer: ``--proposer-model``, else the model itself."""
    from ..sources import EMBEDDED, embedded_gguf
    from ..files import cache_dir

    if cfg.proposer_model:
        kind = "the offline GGUF of " if cfg.proposer_model in EMBEDDED else ""
        return proposer_file(cfg.proposer_model, log is not None), f"{kind}{cfg.proposer_model} (--proposer-model)"
    if ctx.model_ref in EMBEDDED:
        return embedded_gguf(ctx.model_ref), f"the offline GGUF of {ctx.model_ref} (the model being pruned)"
    if ctx.tokenizer is None:
        raise UserError("the model being pruned has no tokenizer to propose with; pass --proposer-model FILE.gguf")
    if getattr(ctx.tokenizer, "chat_template", None) is None:
        raise UserError(f"{ctx.model_ref} is not a chat model (its tokenizer has no chat template), so it cannot "
                        "propose for itself; pass --proposer-model (a chat model's GGUF or an embedded name such as "
                        "qwen2.5-coder-1.5b) or --proposer classic")
    from ..export.gguf import export_gguf

    path = cache_dir() / "proposers" / f"{fingerprint(ctx.model, ctx.tokenizer)}.q8_0.gguf"
    if not path.exists():
        if log:
            log(f"self-pruner: converting {ctx.model_ref} to GGUF (q8_0) to propose for itself, once: {path}")
        try:
            export_gguf(ctx.model, ctx.tokenizer, path, "q8_0", meta={"name": f"{ctx.model_ref} (secateurs proposer)"})
        except UserError as e:
            raise UserError(f"the model being pruned cannot propose for itself ({e}); pass --proposer-model "
                            "FILE.gguf or --proposer classic") from e
    return path, f"{ctx.model_ref} (the model being pruned) converted to q8_0"


def check_proposer_memory(gguf: Path, model) -> dict:
    """The local proposer's memory (its file and KV cache, ``llamacpp.chat.chat_model_bytes``) against what is
    left beside the model being pruned: the system's available memory, less what the model's ``--max-memory``
    budget may still take when it runs layer by layer. A proposer that does not fit is a UserError, before the
    search; what was compared is returned (recorded)."""
    from ..llamacpp.chat import N_CTX, chat_model_bytes, check_chat_file
    from ..runtime.placement import available_memory, format_size

    check_chat_file(gguf)
    need = chat_model_bytes(gguf)
    left = available_memory()
    ol = onloader_of(model)
    if left is not None and ol is not None:
        left -= ol.budget.free("device" if ol.budget.cpu_bytes == 0 else "cpu")
    out = {"proposer_bytes": need, "left_bytes": left}
    if left is not None and need > left:
        raise UserError(f"the proposer {gguf} needs about {format_size(need)} (its file and a KV cache of {N_CTX} "
                        f"tokens) and {format_size(max(left, 0))} of memory is left beside the model being pruned"
                        f"{' and its --max-memory budget' if ol is not None else ''}; use a smaller proposer (a q4_k_m "
                        "GGUF, a smaller model), --proposer openai with the model served elsewhere, or --proposer classic")
    return out


def llm_answers(cfg: SelfPrunerConfig) -> int:
    """The requests an LLM proposer answers in a full search (rate vectors and selections; retries not counted)."""
    first = cfg.population - 1 if cfg.llm_start == "llm" else 0
    return first + cfg.generations * (1 + cfg.crossover + cfg.mutation)


def responses_for(cfg: SelfPrunerConfig, ctx: PruneContext, log) -> dict | None:
    """tell's measured per-block responses for this model and calibration, shown to an LLM proposer."""
    if cfg.proposer == "classic":
        return None
    from .tell import dense_responses

    found = dense_responses(ctx)
    if found and log:
        log(f"self-pruner: the LLM is shown tell's measured responses of {len(found)} blocks (tell's response cache "
            "for this model and calibration)")
    return found


class MaskedFitness:
    """Perplexity of the dense model masked as wanda-sp at the given rates would prune it (one-shot scores).
    Built in this process, or on each pool worker from its own replica of the model (``--workers``)."""

    def __init__(self, model, scores: tuple[list, list], rows: torch.Tensor, batch_size: int):
        self.model, self.adapter = model, get_adapter(model)
        self.spec = self.adapter.spec()
        self.heads, self.channels = scores
        self.rows, self.batch_size = rows, batch_size
        self.ol = onloader_of(model)
        if self.ol is not None:  # every fitness evaluation runs all layers: keep as many as the budget allows
            self.ol.pin_layers(range(self.spec.n_layers), self.ol.budget.free() // 2)

    def close(self) -> None:
        """Gives back the layers pinned in an onloaded model's budget."""
        if self.ol is not None:
            self.ol.unpin_all()

    @staticmethod
    def scores(ctx: PruneContext, batch_size: int) -> tuple[list, list]:
        """Per-layer head and channel scores from one calibration pass over the dense model (resident or layer
        by layer)."""
        stats = collect_stats(ctx.model, ctx.adapter, ctx.calib, batch_size)
        attn, mlp = projection_scores(ctx.model, ctx.adapter, stats, "wanda")
        return [head_scores(a, ctx.spec.head_dim).cpu() for a in attn], [m.cpu() for m in mlp]

    def plans(self, rates) -> dict:
        return {i: layer_plan_at_rate(self.spec, r, self.heads[i], self.channels[i]) for i, r in enumerate(rates)}

    def __call__(self, rates) -> float:
        with MaskedPlan(self.adapter, self.spec, self.plans(rates)):
            return perplexity(self.model, self.rows, self.batch_size).ppl


def fitness_rows(cfg: SelfPrunerConfig, ctx: PruneContext, log) -> int:
    """``--fitness-rows``, or when not given the default within the calibration rows (said in one line when the
    calibration is the smaller)."""
    if cfg.fitness_rows is not None:
        return cfg.fitness_rows
    n = ctx.calib.shape[0]
    if n < FITNESS_ROWS and log:
        log(f"self-pruner: fitness on all {n} calibration row(s) (--nsamples {n}; the default is {FITNESS_ROWS}; "
            "--fitness-rows to change)")
    return min(FITNESS_ROWS, n)
@register_method("self-pruner", "evolutionary search of per-layer wanda-sp rates, operators performed classically "
                 "or by an LLM (a local GGUF model, by default the model itself when it is a chat model of 1B "
                 "parameters or more; an OpenAI-compatible endpoint)",
                 SelfPrunerConfig)
def self_pruner(ctx: PruneContext, cfg: SelfPrunerConfig) -> PruningPlan:
    if cfg.fitness_rows is not None and cfg.fitness_rows > ctx.calib.shape[0]:
        raise UserError(f"--fitness-rows {cfg.fitness_rows} exceeds the {ctx.calib.shape[0]} calibration rows (--nsamples)")
    spec = ctx.spec
    space = SearchSpace(spec.n_layers, mean_rate_for_ratio(spec, ctx.ratio), cfg.rate_min, cfg.rate_max, cfg.rate_step)
    log = print if ctx.progress else None
    cfg, why = choose_proposer(cfg, ctx.model, ctx.model_ref, ctx.tokenizer, known=True)
    if log and why.startswith("auto"):
        log(f"self-pruner: proposer {cfg.proposer}" + (f" (--llm-task {cfg.llm_task} --llm-start {cfg.llm_start})"
                                                       if cfg.proposer != "classic" else "") + f": {why}")
    ctx.record(proposer=cfg.proposer, proposer_chosen=why, llm_task=cfg.llm_task, llm_start=cfg.llm_start)
    gguf, source = proposer_gguf(cfg, ctx, log) if cfg.proposer == "local" else (None, "")
    memory = check_proposer_memory(gguf, ctx.model) if gguf is not None else None
    proposer = make_proposer(cfg.proposer, gguf=gguf, gguf_source=source, endpoint=cfg.endpoint,
                             model=cfg.proposer_model, retries=cfg.llm_retries, temperature=cfg.llm_temperature,
                             max_tokens=cfg.llm_max_tokens, timeout=cfg.endpoint_timeout, wait=cfg.endpoint_wait,
                             task=cfg.llm_task, start=cfg.llm_start, responses=responses_for(cfg, ctx, log))
    scores = MaskedFitness.scores(ctx, cfg.batch_size)
    n_fit = fitness_rows(cfg, ctx, log)
    rows = ctx.calib[:n_fit].clone()
    evo = EvolutionConfig(cfg.population, cfg.generations, cfg.crossover, cfg.mutation, ctx.seed)
    path = ctx.workdir / "search.jsonl"
    fitness = None
    try:
        if ctx.pool is None:
            fitness = MaskedFitness(ctx.model, scores, rows, cfg.batch_size)
            result = evolve(space, fitness, proposer, evo, path, log=log)
        else:  # each generation's new vectors on the pool, every worker masking its own replica
            with ctx.pool.start(MaskedFitness, scores, rows, cfg.batch_size, progress=ctx.progress) as workers:
                def on_pool(vectors):
                    return workers.map(vectors, "__call__", lambda v: (v,), progress=ctx.progress,
                                       desc=f"fitness ({len(workers.alive)} workers)")
                result = evolve(space, None, proposer, evo, path, log=log, fitness_batch=on_pool)
    except EndpointDown as e:
        done = len(path.read_text().splitlines()) if path.exists() else 0
        raise UserError(f"{e}. The search so far is kept ({done} generation(s) in {path}): run the same command "
                        "again to resume once the endpoint answers") from e
    finally:
        proposer.close()
        if fitness is not None:
            fitness.close()
    ctx.count_ppl(result.new_evaluations)
    plan = sequential_plan(ctx, result.best.rates, cfg.batch_size, "self-pruner")
    ctx.record(fitness_rows=n_fit, rates=result.best.rates, mean_rate=space.mean, best_fitness=result.best.fitness,
               uniform_fitness=result.uniform.fitness, fitness_evaluations=result.evaluations,
               fitness_evaluations_this_run=result.new_evaluations, search_wall_s=result.wall_s,
               search=result.stats, kept=plan.kept_fraction(spec), proposer_memory=memory)
    return plan
