"""tell: several unit kinds at once (whole blocks, heads, channels), how much in every block decided from what was
measured about the model (our design of Yang et al., ICML 2025, "Let LLM Tell What to Prune and How Much to
Prune"; see docs/tell.md).

Default: ``--assign response``: every block's options measured on the model itself, then chosen together
(docs/tell.md compares the assignments). ``--assign uniform`` instead: the same ratio in every block; inside a
block the lowest-FLAP heads / channels go with bias compensation, as many as the width methods' rate rule says
(``importance/width.py``); the ratio is set by bisection on the budget (``search/assign.py``): the parameter
ratio, or with ``--speedup`` the speedup predicted from the unit costs measured on this device
(``importance/cost.py``, cached).

``--assign response`` (the default):
1. Width scores of every head and channel (FLAP fluctuation, one calibration pass) and, with ``--speedup``, the
   unit costs.
2. Every block's options (keep; ``--levels`` of its heads or channels removed, the lowest-scoring first, with
   FLAP's bias compensation per ``--compensation``; removed whole), each measured: the calibration loss with that
   one block changed (``importance/response.py``, replayed from the dense model's state at the block).
3. One option per block, the least summed loss increase whose summed saving meets the budget (parameters for
   ``--ratio``, predicted prefill milliseconds for ``--speedup``): an exact multiple-choice knapsack; with
   ``--stages`` > 1, part of the choice is committed and the responses measured again on top of it
   (``search/allocate.py``); with ``--refine N``, a local search on the whole plan's loss follows.

``--assign importance``: per-block ratios from transfer entropy (``importance/interaction.py``,
``search/assign.py``), the same width rule inside a block.

``prune --engine vllm`` (``PruneContext.keep_heads``): every query head is kept in every assignment. The
attention blocks' options are keep and remove (response), or an attention block below ``--block-threshold``
is kept and its layer's MLP channels take its share (uniform, importance: ``layer_plan_at_rates(keep_heads)``);
the MLP blocks are narrowed as without it. The response cache holds each response under the block plan it
measured, so a run with and one without the engine share the options they have in common.

With ``--speedup``, the plan's prefill speedup is then measured on a pruned copy; if it is off by more than
``--speedup-tolerance``, the cost-model target is rescaled by target/measured and the plan chosen again
(``--speedup-rounds`` times at most). Every round is recorded. Work whose result the options do not use is
skipped: transfer entropy only for ``--assign importance`` (or ``--te``), unit costs only with ``--speedup``,
responses only for ``--assign response``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import UserError
from ..importance.activations import InputStats
from ..importance.cost import CostModel, checked_speedup, load_or_measure
from ..importance.interaction import block_importance, collect_streams
from ..importance.response import KLReplayer, PositionReplay, kl_cache_bytes, measure_responses, plan_loss
from ..importance.width import (collect_stats, head_scores, kept_channels_at, kept_heads_at, layer_compensation,
                                layer_plan_at_rates, output_projections, projection_scores)
from ..models import get_adapter
from ..models.base import BLOCK_KINDS, Block, ModelSpec, all_blocks
from ..files import cache_dir
from ..plan import WIDTH, LayerPlan, PruningPlan, RatioRule, added_params, removed_params, select_heads
from ..files import atomic_write_text
from ..runtime import onloader_of
from ..runtime.estimate import Held, hidden_bytes, input_stats
from ..runtime.passes import parameter_tensors
from ..search.allocate import Option, Problem, allocate, block_options
from ..search.assign import assign_ratios, load_weights
from ..search.greedy import Replayer
from . import MethodConfig, PruneContext, keeps_heads, register_method

ASSIGNMENTS = ("uniform", "response", "importance")
RESPONSE_LOSSES = ("auto", "nll", "kl")
KL_CACHE_LIMIT = 4 << 30  # bytes of the dense log-probabilities --response-loss kl may keep
KL_TOP_AUTO = 4096  # most probable tokens a position kl keeps where the whole vocabulary does not fit the limit
RESPONSE_RULE = RatioRule(unit="block options", text="at or above the target (--assign response: one whole option per block)")
THRESHOLD_RULE = RatioRule(unit="blocks", text="at or above the target (--block-threshold below 1: blocks assigned "
                                              "that much are removed whole)")
TELL_RULE = RatioRule(text="at or above the target with --assign response (the default: one whole option per block); "
                           f"within {WIDTH.tolerance} of it with uniform or importance")


@dataclass
class TellConfig(MethodConfig):
    needs_ratio = False  # --ratio or --speedup (check)
    rule = TELL_RULE
    parallel_when = "--assign response"
    query_heads = "optional"  # --engine vllm: attention blocks kept or removed (module docstring)

    speedup: float | None = field(default=None, metadata={"help": "target measured prefill speedup (> 1), instead of --ratio"})
    assign: str = field(default="response", metadata={"help": "how much in every block: from measured loss responses and an exact knapsack (response, the default and the best measured: one calibration replay per block option, 10-20 min for a 135M model on one CPU core, --dry-run counts them), the same ratio everywhere (uniform: FLAP-style, seconds), or from transfer entropy (importance); see docs/tell.md", "choices": list(ASSIGNMENTS)})
    levels: str = field(default="0.25,0.5,0.75", metadata={"help": "response: fractions of a block's heads / channels its width options remove (comma-separated, each in (0, 1))"})
    compensation: str = field(default="on", metadata={"help": "response: width options with FLAP's bias compensation (on), without (off), or both measured and the better kept", "choices": ["on", "off", "both"]})
    stages: int = field(default=1, metadata={"help": "response: measure, commit part of the knapsack's choice, measure again on top of it; this many times"})
    refine: int = field(default=0, metadata={"help": "response: evaluations of a local search on the whole plan's calibration loss, from the knapsack's choice (0: none)"})
    response_batch: int = field(default=0, metadata={"help": "response: calibration rows per replayed batch (0: as many as keep the float32 logits under 256 MB)"})
    te: bool = field(default=False, metadata={"help": "also estimate the transfer entropy when the assignment does not use it (recorded, shown by explain)"})
    temperature: float = field(default=1.0, metadata={"help": "importance: how strongly load follows (low) importance"})
    normalize: str = field(default="kind", metadata={"help": "importance: compare a block's importance with blocks of its own kind, or with all", "choices": ["kind", "global"]})
    block_threshold: float = field(default=1.0, metadata={"help": "importance / uniform: a block whose assigned ratio reaches this is removed whole (1.0: only blocks assigned everything)"})
    te_rank: int = field(default=32, metadata={"help": "principal components per variable in the transfer-entropy estimate"})
    te_noise: float = field(default=0.01, metadata={"help": "observation noise (relative variance) on the target stream"})
    te_target: str = field(default="final", metadata={"help": "stream the information must reach", "choices": ["final", "output"]})
    te_tokens: int = field(default=8192, metadata={"help": "calibration tokens used by the estimator (seeded subset)"})
    latency_len: int = field(default=256, metadata={"help": "prompt length of the cost micro-benchmark and latency checks"})
    latency_clock: str = field(default="cpu", metadata={"help": "timing of costs and speedup checks on a CPU: this process's CPU time on one thread (robust on a shared machine) or wall time; GPUs always use wall time", "choices": ["cpu", "wall"]})
    latency_reps: int = field(default=3, metadata={"help": "alternated dense/pruned pairs per timing, at least (more, up to 4x, until the median ratio is known to half a percent)"})
    speedup_rounds: int = field(default=2, metadata={"help": "re-assignments after a measured speedup misses the target"})
    speedup_tolerance: float = field(default=0.03, metadata={"help": "relative miss of the measured speedup that is accepted"})
    response_dtype: str = field(default="auto", metadata={"help": "response: precision of the measurement (auto = the working dtype, --dtype; another one measures on a copy of the model in it, not under --max-memory)", "choices": ["auto", "float32", "bfloat16"]})
    response_loss: str = field(default="auto", metadata={"help": "response: what a response measures on the calibration rows: the KL divergence of the changed model's next-token distributions from the dense model's (kl: keeps the dense log-probabilities in memory, rows x (seqlen - 1) x vocabulary x 4 bytes, at most 4 GiB, or only the most probable tokens of each position, as the kl-top option sets), the NLL of the observed next tokens (nll), or auto (the default): kl where those log-probabilities fit (the whole vocabulary, else its 4096 most probable tokens a position; the model whole in memory), nll otherwise, said at the start and recorded. kl gave the lower held-out perplexity in every comparison measured: at equal ratio 11-36%% under nll (SmolLM2 4 x 128, 4 x 256, 16 x 256; Gemma-3-270M and Qwen2.5-Coder-1.5B at 4 x 256), and at equal measured speed (1.15x / 1.3x / 1.5x) 3-19%% on SmolLM2 and 17-33%% on Gemma; its responses take 1-2.2x nll's time (more with a larger vocabulary). At the default calibration of 32 x 512 the whole vocabulary fits for SmolLM2 (3.2 GB); Gemma (262,144 tokens) and the 1.5B (151,936) keep the 4096 most probable tokens a position (0.54 GB), which on SmolLM2 chose the same plan as the whole vocabulary (so did 256) and on the 1.5B at 4 x 256 read 20.25 against 20.23; see docs/tell.md", "choices": list(RESPONSE_LOSSES)})
    kl_top: int = field(default=0, metadata={"help": "response, kl: keep only the K most probable next tokens of each dense distribution, the rest of its mass as one bucket (K x 8 bytes a position instead of 4 bytes a vocabulary token: the 1.5B's 32 x 512 in 134 MB at K = 1024); the responses are the KL of those coarsened distributions, a lower bound of the full KL; 0: the whole vocabulary"})
    refresh_costs: bool = field(default=False, metadata={"help": "measure the unit costs and the speedup checks again instead of using the ones cached for this device and model (measured once, again when they were measured on a busy machine and it is quiet now)"})

    @property
    def parallel(self) -> bool:
        """The response assignment fans its block responses out over the worker pool (``--workers``)."""
        return self.assign == "response"

    def loss_for(self, model, rows: int, seqlen: int) -> tuple[str, str]:
        """(the loss this run's responses measure, why): --response-loss as given, or with auto kl where the dense
        distributions of ``rows`` x ``seqlen`` fit ``KL_CACHE_LIMIT`` (whole, or their ``KL_TOP_AUTO`` most probable
        tokens: ``kl_top_for``) and the --max-memory budget beside the whole model, nll otherwise (and for a
        layer-by-layer model)."""
        if self.response_loss != "auto":
            return self.response_loss, "--response-loss " + self.response_loss
        if onloader_of(model) is not None:
            return "nll", "auto: a layer-by-layer model (--max-memory) cannot hold the dense log-probabilities kl needs"
        from ..runtime.placement import format_size

        vocab = get_adapter(model).lm_head().weight.shape[0]
        try:
            replace(self, response_loss="kl").check_calibration(model, rows, seqlen)
        except UserError:
            top = min(self.kl_top or KL_TOP_AUTO, vocab)
            kept = "" if top == vocab else (f", or {format_size(kl_cache_bytes(rows, seqlen, vocab, top))} of their "
                                            f"{top:,} most probable tokens")
            return "nll", (f"auto: kl would keep {format_size(kl_cache_bytes(rows, seqlen, vocab))} of dense "
                           f"log-probabilities ({rows} x {seqlen - 1} positions x {vocab:,} tokens){kept}, over its "
                           f"{format_size(KL_CACHE_LIMIT)} limit or the --max-memory budget")
        top = self.kl_top_for(vocab, rows, seqlen)
        if not top:
            return "kl", "auto: the dense log-probabilities of this calibration fit in memory"
        if self.kl_top:
            return "kl", "auto: the dense distributions' top tokens (--kl-top) fit in memory"
        return "kl", (f"auto: the dense distributions' {top:,} most probable tokens a position fit in memory (the "
                      f"whole vocabulary, {format_size(kl_cache_bytes(rows, seqlen, vocab))}, would not)")

    def kl_top_for(self, vocab: int, rows: int, seqlen: int) -> int | None:
        """The most probable tokens a position the kl responses keep of each dense distribution: 0 for the whole
        vocabulary; --kl-top if given (0 when it covers the vocabulary); otherwise the whole vocabulary where it
        fits ``KL_CACHE_LIMIT``, else ``KL_TOP_AUTO`` tokens where they fit, else None."""
        if self.kl_top:
            return self.kl_top if self.kl_top < vocab else 0
        if kl_cache_bytes(rows, seqlen, vocab) <= KL_CACHE_LIMIT:
            return 0
        return KL_TOP_AUTO if kl_cache_bytes(rows, seqlen, vocab, KL_TOP_AUTO) <= KL_CACHE_LIMIT else None

    def check_placement(self, onloaded: bool) -> None:
        """--speedup and --response-loss kl need the whole model in memory."""
        if onloaded and self.speedup is not None:
            raise UserError("tell --speedup times the whole model and its pruned probes, which a layer-by-layer model "
                            "(--max-memory) cannot hold; use --ratio, or drop --max-memory")
        if onloaded and self.response_loss == "kl":
            raise UserError("tell --response-loss kl keeps the dense model's next-token log-probabilities and reads "
                            "the whole output head per position, which a layer-by-layer model (--max-memory) cannot "
                            "hold; use --response-loss nll, or drop --max-memory")

    def check_calibration(self, model, rows: int, seqlen: int) -> None:
        """--response-loss kl: the dense log-probabilities of the calibration rows fit ``KL_CACHE_LIMIT`` and,
        under --max-memory, the compute device's budget beside the whole model."""
        if self.response_loss != "kl":
            return
        from ..runtime.estimate import model_sizes, working_bytes
        from ..runtime.placement import device_key, format_size

        vocab = get_adapter(model).lm_head().weight.shape[0]
        top = self.kl_top_for(vocab, rows, seqlen)
        top = KL_TOP_AUTO if top is None else top  # None: not even KL_TOP_AUTO tokens fit (refused below)
        need = kl_cache_bytes(rows, seqlen, vocab, top)
        if need > KL_CACHE_LIMIT:
            kept = f"their {min(top, vocab):,} most probable tokens a position" if top else "the whole vocabulary"
            raise UserError(f"--response-loss kl keeps the dense distributions of {rows} x {seqlen - 1} positions "
                            f"(over a vocabulary of {vocab:,}; {kept}), {format_size(need)}, more than its limit of "
                            f"{format_size(KL_CACHE_LIMIT)}; use fewer rows (--nsamples) or shorter ones (--seqlen), "
                            "fewer tokens a position (--kl-top), or --response-loss nll")
        param = next(model.parameters())
        budget = ((getattr(model, "secateurs_placement", None) or {}).get("max_memory") or {}).get(device_key(param.device))
        if budget is not None and onloader_of(model) is None:  # layer by layer: check_placement
            sizes = model_sizes(model, param.dtype)
            if sizes.weights + working_bytes(sizes, self.pass_rows(), seqlen) + need > budget:
                raise UserError(f"--response-loss kl keeps {format_size(need)} of dense log-probabilities beside the "
                                f"model ({format_size(sizes.weights)} of weights), more than the --max-memory budget of "
                                f"{format_size(budget)} on {param.device}; use --response-loss nll, fewer rows "
                                "(--nsamples), or a larger budget")

    def level_list(self) -> list[float]:
        try:
            levels = sorted({float(x) for x in self.levels.split(",") if x.strip()})
        except ValueError:
            levels = []
        if not levels or not all(0.0 < x < 1.0 for x in levels):
            raise UserError(f"--levels must be comma-separated fractions strictly between 0 and 1 (got {self.levels!r})")
        return levels

    def options(self, keep_heads: bool = False) -> dict:
        """Every block kind's options for --assign response (``search.allocate.block_options``; ``keep_heads``:
        --engine vllm)."""
        return block_options(self.level_list(), self.compensation, keep_heads)

    def evaluations(self, spec, ratio, rows, engine=None) -> tuple[int, int, str]:
        """What the run will measure (``runtime.estimate``): with --assign response one calibration replay per block
        option and stage (an upper bound: options cached from an earlier run are not measured again), plus the
        --refine evaluations; otherwise one calibration pass."""
        if self.assign != "response":
            return 1, rows, "one calibration pass" + (" (and the transfer-entropy estimate)" if self.uses_te else "")
        per_kind = {kind: len(opts) - 1 for kind, opts in self.options(keeps_heads(engine)).items()}  # keep: none
        per_stage = spec.n_layers * sum(per_kind.values())
        # a response replays from its block to the end: half a calibration pass on average
        n = 1 + -(-self.stages * per_stage // 2) + self.refine + (self.response_loss != "nll")
        blocks = ", ".join(f"{spec.n_layers} {kind} blocks x {k} option(s)" for kind, k in per_kind.items())
        return n, rows, (f"{self.stages} stage(s) of {per_stage} block options ({blocks}), each replayed from its "
                         f"block on, counted as half a pass; {self.refine} refine evaluations; "
                         + ("one pass for the dense log-probabilities (--response-loss kl, or auto where kl "
                            "is chosen); " if self.response_loss != "nll" else "")
                         + "cached responses are not measured again (an upper bound)")

    def cached_work(self, model, calib, seed: int, engine=None, model_ref=None) -> str | None:
        """How many of the first stage's responses (on the dense model) the response cache holds for this model,
        calibration and option set; later stages and --refine depend on what is measured."""
        if self.assign != "response":
            return None
        ctx = PruneContext.build(model, calib, seed=seed, workdir=".", progress=False, engine=engine)
        path, state = dense_response_state(ctx, self)
        held = {tuple(v) for v in state.get("labels", {}).values()}
        options = self.options(ctx.keep_heads)
        wanted = [(b.pos, o.level, o.compensate) for b in all_blocks(ctx.spec.n_layers) for o in options[b.kind][1:]]
        new = sum(w not in held for w in wanted) + (state.get("base_loss") is None)
        return (f"tell: at most {new} of the first stage's {len(wanted) + 1} responses are new, the rest are in the "
                f"response cache ({path.parent}; options that give the same structure are measured once); "
                + ("later stages and --refine measure on top of what is chosen, not counted here"
                   if self.stages > 1 or self.refine else "nothing is measured after it"))

    def ratio_rule(self) -> RatioRule:
        """How this run meets --ratio: the knapsack takes one whole option per block (keep, a width level,
        remove), so response lands at or above the target, by less than the options' granularity; uniform and
        importance bisect a continuous ratio and land within the width tolerance, or, where --block-threshold
        removes whole blocks, at or above the target."""
        if self.assign == "response":
            return RESPONSE_RULE
        return THRESHOLD_RULE if self.block_threshold < 1.0 else WIDTH

    @property
    def uses_te(self) -> bool:
        return self.assign == "importance" or self.te

    def held(self, sizes, rows, seqlen, onload):
        h = hidden_bytes(sizes, rows, seqlen)
        held = [input_stats(sizes)]
        if self.assign == "response":
            held += [Held("embeddings of the calibration rows and layer arguments (the replay)", h),
                     Held("the base model's state entering the measured block", h)]
            top = self.kl_top_for(sizes.vocab, rows, seqlen)
            if top is not None and (self.response_loss == "kl" or (self.response_loss == "auto" and not onload)):
                held.append(Held("the dense model's next-token log-probabilities (--response-loss kl, float32)",
                                 kl_cache_bytes(rows, seqlen, sizes.vocab, top)))
        if self.uses_te:
            tokens = min(self.te_tokens, rows * (seqlen - 1))
            held.append(Held("residual streams at every block boundary (float32, CPU)",
                             (2 * sizes.n_layers + 1) * tokens * sizes.hidden * 4, where="cpu"))
        return held

    def check(self, ratio) -> None:
        """Exactly one budget, and every option in range."""
        super().check(ratio)
        if (ratio is None) == (self.speedup is None):
            raise UserError("tell needs exactly one budget: --ratio R (0 < R < 1) or --speedup S (S > 1)")
        if self.speedup is not None and not self.speedup > 1.0:
            raise UserError(f"--speedup must be greater than 1 (got {self.speedup})")
        if self.assign not in ASSIGNMENTS:
            raise UserError(f"--assign must be one of {', '.join(ASSIGNMENTS)} (got {self.assign!r})")
        if self.response_loss not in RESPONSE_LOSSES:
            raise UserError(f"--response-loss must be one of {', '.join(RESPONSE_LOSSES)} (got {self.response_loss!r})")
        if self.response_loss == "kl" and self.assign != "response":
            raise UserError(f"--response-loss {self.response_loss} applies to --assign response (the measured "
                            f"responses); --assign {self.assign} measures none")
        if self.kl_top < 0 or (self.kl_top and self.response_loss == "nll"):
            raise UserError(f"--kl-top must be 0 (the whole vocabulary) or a number of tokens, with --response-loss kl "
                            f"or auto (got {self.kl_top} with --response-loss {self.response_loss})")
        self.level_list()
        if self.stages < 1 or self.response_batch < 0 or self.refine < 0:
            raise UserError("--stages must be >= 1, --response-batch and --refine >= 0")
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
    attn, mlp = projection_scores(ctx.model, ctx.adapter, stats, "flap")
    heads = [head_scores(a, ctx.spec.head_dim).tolist() for a in attn]
    return WidthScores(heads, [m.tolist() for m in mlp], stats)


def _bias(ctx: PruneContext, ws: WidthScores, layer: int, kind: str, kept) -> list | None:
    """FLAP's compensation bias of the kept units (the layer's weights read where the runtime keeps them)."""
    heads, channels = (kept, None) if kind == "attn" else (None, kept)
    return layer_compensation(ctx.model, ctx.adapter, ctx.spec, ws.stats, layer, heads, channels)[kind == "mlp"]


def build_plan(ctx: PruneContext, ratios: list[float], ws: WidthScores, compensate: bool) -> PruningPlan:
    """The plan of per-block ratios (in ``all_blocks`` order): 1.0 removes the block; otherwise the best-scoring
    heads / channels are kept, as many as the rate rule says (``layer_plan_at_rates``, importance/width.py; with
    ``ctx.keep_heads`` every head, the channels taking the layer's budget). ``compensate=False`` puts zero
    placeholders where compensation biases go (same parameter count, no computation)."""
    spec = ctx.spec
    plan = PruningPlan.dense(spec, "tell")
    zeros = [0.0] * spec.hidden
    for i in range(spec.n_layers):
        r_attn, r_mlp = (ratios[Block(i, k).pos] for k in BLOCK_KINDS)
        lp = plan.layers[i] = layer_plan_at_rates(spec, r_attn if r_attn < 1.0 else None,
                                                  r_mlp if r_mlp < 1.0 else None, ws.heads[i], ws.channels[i],
                                                  ctx.keep_heads)
        if lp.heads is not None:
            lp.attn_bias = _bias(ctx, ws, i, "attn", lp.heads) if compensate else zeros
        if lp.channels is not None:
            lp.mlp_bias = _bias(ctx, ws, i, "mlp", lp.channels) if compensate else zeros
    return plan


def model_key(ctx: PruneContext, **extra) -> str:
    """Identifies the model (name, configuration and a checksum of its weights), the calibration rows and
    ``extra`` settings: the key of tell's caches."""
    h = hashlib.sha256()
    h.update(json.dumps({"name": getattr(ctx.model.config, "_name_or_path", ""), "spec": ctx.spec.as_dict(),
                         "seed": ctx.seed, **extra}, sort_keys=True).encode())
    h.update(ctx.calib.cpu().numpy().tobytes())
    with torch.no_grad():
        for t in parameter_tensors(ctx.model, every=16):
            h.update(f"{float(t.double().sum()):.12e}".encode())
    return h.hexdigest()[:20]


def calibration_key(ctx: PruneContext, cfg: TellConfig) -> str:
    """Identifies a transfer-entropy calibration result: the model, the calibration rows and the estimator settings."""
    return model_key(ctx, rank=cfg.te_rank, noise=cfg.te_noise, target=cfg.te_target, tokens=cfg.te_tokens)


def calibrate(ctx: PruneContext, cfg: TellConfig) -> tuple[list[float] | None, InputStats]:
    """FLAP input statistics and, when the options use it (``cfg.uses_te``), block importance from the same
    forward passes. With importance: kept in the run's workdir (resume) and in ``cache_dir()/tell/<key>.pt``
    (other ratios / budgets on the same model and calibration reuse it; the key is ``calibration_key``)."""
    if not cfg.uses_te:
        return None, collect_stats(ctx.model, ctx.adapter, ctx.calib)
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
    """What tell measures once per model and calibration: width scores, and what the options use of importance
    (transfer entropy) and unit costs (None when unused)."""

    importance: list | None
    ws: WidthScores
    costs: CostModel | None
    cost_path: str | None


def prepare(ctx: PruneContext, cfg: TellConfig) -> Prepared:
    log = print if ctx.progress else (lambda *a: None)
    importance, stats = calibrate(ctx, cfg)
    costs, cost_path = None, None
    if cfg.speedup is not None:
        costs, cost_path = load_or_measure(ctx.model, ctx.spec, cfg.latency_len, cfg.latency_reps, ctx.seed,
                                           refresh=cfg.refresh_costs, log=log, clock=cfg.latency_clock)
    return Prepared(importance, width_scores(ctx, stats), costs, cost_path)


def weights_for(spec: ModelSpec, importance: list | None, cfg: TellConfig) -> list[float]:
    if cfg.assign == "uniform":
        return [1.0] * len(all_blocks(spec.n_layers))
    groups = [b.kind for b in all_blocks(spec.n_layers)] if cfg.normalize == "kind" else None
    return load_weights(importance, cfg.assign, cfg.temperature, groups)


# --- the response assignment ---------------------------------------------------------------------------------
def option_plan(ctx: PruneContext, ws: WidthScores, layer: int, kind: str, o: Option) -> LayerPlan:
    """The layer plan with block ``kind`` set to option ``o`` (the other block dense): width by the rate rule
    (``kept_heads_at`` / ``kept_channels_at``), the best FLAP scores kept."""
    spec = ctx.spec
    if o.level >= 1.0:
        return LayerPlan(**{kind: False})
    if o.level <= 0.0:
        return LayerPlan()
    if kind == "attn":
        heads = select_heads(ws.heads[layer], kept_heads_at(spec, o.level), spec.n_kv)
        if len(heads) == spec.n_heads:
            return LayerPlan()
        return LayerPlan(heads=heads, attn_bias=_bias(ctx, ws, layer, kind, heads) if o.compensate else None)
    n_keep = kept_channels_at(spec, o.level)
    if n_keep >= spec.intermediate:
        return LayerPlan()
    channels = sorted(torch.as_tensor(ws.channels[layer]).argsort(descending=True)[:n_keep].tolist())
    return LayerPlan(channels=channels, mlp_bias=_bias(ctx, ws, layer, kind, channels) if o.compensate else None)


def block_params_saved(spec: ModelSpec, layer: int, kind: str, lp: LayerPlan) -> dict:
    """Parameters block ``kind`` of ``lp`` removes, by unit kind, net of a compensation bias it adds."""
    out = {k: v for k, v in removed_params(spec, layer, lp).items() if k.startswith(kind)}
    part = LayerPlan(**{("mlp" if kind == "attn" else "attn"): False, kind: getattr(lp, kind),
                        f"{kind}_bias": getattr(lp, f"{kind}_bias")})
    added = added_params(spec, part)
    if added:
        key = f"{kind}_width"
        out[key] = out.get(key, 0) - added
    return out


def saving_fn(spec: ModelSpec, costs: CostModel | None):
    """Saving of a block plan: predicted milliseconds (cost model) or millions of parameters."""
    if costs is None:
        return lambda layer, kind, lp: sum(block_params_saved(spec, layer, kind, lp).values()) / 1e6
    return lambda layer, kind, lp: sum(costs.ms_per_param[k] * v for k, v in block_params_saved(spec, layer, kind, lp).items())


def response_replayer(model, calib: torch.Tensor, rows: int, dtype: str, loss: str = "nll",
                      own: bool = False, top: int = 0) -> Replayer:
    """The replay the responses are measured on: ``model`` in ``dtype`` (``--response-dtype``: when it works in
    another, a copy, or with ``own`` the model itself converted, as a pool worker does with its replica),
    ``rows`` calibration rows per batch, the loss head in one piece; its loss the summed NLL, or with ``loss``
    kl the summed KL divergence from the dense model (``KLReplayer``; ``top``: --kl-top)."""
    if str(next(model.parameters()).dtype).removeprefix("torch.") != dtype:
        import copy

        model = (model if own else copy.deepcopy(model)).to(getattr(torch, dtype))
    adapter = get_adapter(model)
    if loss == "kl":
        return KLReplayer(model, adapter, calib, rows, adapter.spec(), top=top)
    return Replayer(model, adapter, calib, rows, head_chunk=0)


def _replica_responses(model, calib: torch.Tensor, rows: int, dtype: str, loss: str = "nll",
                       top: int = 0) -> PositionReplay:
    """A pool worker's side of the responses (``runtime.pool``: built on the worker's replica of the model, which
    belongs to this search: converted to ``dtype`` in place, not copied, so a worker holds one model)."""
    with torch.inference_mode():
        return PositionReplay(response_replayer(model, calib, rows, dtype, loss, own=True, top=top),
                              get_adapter(model).spec())


def _rows_per_batch(cfg: TellConfig, ctx: PruneContext) -> int:
    if cfg.response_batch:
        return cfg.response_batch
    vocab = ctx.adapter.lm_head().weight.shape[0]
    return max(1, min(ctx.calib.shape[0], (64 << 20) // (ctx.calib.shape[1] * vocab)))


def dense_response_state(ctx: PruneContext, cfg: TellConfig | None = None) -> tuple[Path, dict]:
    """(the shared cache file of the responses measured on the dense model for this model and calibration, what
    it holds: ``{"base_loss", "losses", "labels"}``, ``{}`` when nothing is cached)."""
    path = ResponseStore(ctx, cfg or TellConfig(response_loss="nll")).paths(PruningPlan.dense(ctx.spec))[1]
    try:
        return path, json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        return path, {}


def dense_responses(ctx: PruneContext) -> dict[tuple[int, str], list[tuple[float, bool, float]]] | None:
    """What tell's response cache measured on the dense model for this model and calibration (``--calib``,
    ``--nsamples``, ``--seqlen``, ``--seed`` and dtype as a tell run with the default options, the NLL
    responses: ``--response-loss nll``, or auto where it chose nll; kl responses are not read here): per block
    ``(layer, kind)`` its options ``(level, compensate, loss increase per predicted token in nats)`` (rows x
    (seqlen - 1), as the knapsack's ``dloss``), level 1 = the block removed. None when the cache holds none."""
    _, state = dense_response_state(ctx)
    base = state.get("base_loss")
    if base is None or not state.get("labels"):
        return None
    tokens = Replayer.count_tokens(ctx.calib)  # the positions the losses sum over, as the knapsack's dloss
    out: dict = {}
    for key, (pos, level, compensate) in state["labels"].items():
        if key in state.get("losses", {}):
            b = Block.at(pos)
            out.setdefault((b.layer, b.kind), []).append((float(level), bool(compensate),
                                                          (state["losses"][key] - base) / tokens))
    return {k: sorted(v) for k, v in sorted(out.items())} or None


class ResponseStore:
    """Measured responses, one file per base plan with one loss per variant (block position and layer plan), in
    the run's workdir (resume) and in ``cache_dir()/tell/responses-<key>.json``: other budgets, stages and option
    sets on the same model and calibration reuse every response already measured.

    With a worker pool (``--workers``) the blocks' responses and the whole-plan losses run on the workers, one
    block position per call (``PositionReplay``), each worker on its own replica; a loss is bitwise the one this
    process computes, and the files are written with sorted keys, so a run gives the same responses and the
    same files with any number of workers."""

    def __init__(self, ctx: PruneContext, cfg: TellConfig):
        self.ctx, self.cfg = ctx, cfg
        working = str(next(ctx.model.parameters()).dtype).removeprefix("torch.")  # --dtype
        self.dtype = working if cfg.response_dtype == "auto" else cfg.response_dtype
        if self.dtype != working and onloader_of(ctx.model) is not None:
            raise UserError(f"--response-dtype {self.dtype} needs a copy of the model, which a layer-by-layer model "
                            f"(--max-memory) cannot hold; use --dtype {self.dtype} instead")
        self.loss, self.loss_why = cfg.loss_for(ctx.model, *ctx.calib.shape)  # --response-loss (auto: chosen)
        # the loss in the key (kl only: the nll key is the one of the caches from before --response-loss)
        self.top = (cfg.kl_top_for(ctx.adapter.lm_head().weight.shape[0], *ctx.calib.shape) or 0
                    if self.loss == "kl" else 0)  # tokens kept a position (--kl-top; 0: all)
        loss = {} if self.loss == "nll" else {"loss": self.loss, **({"kl_top": self.top} if self.top else {})}
        self.model_key = model_key(ctx, what="responses", dtype=self.dtype, **loss)
        self._replayer = None
        self._workers = None
        self.evaluations = 0  # losses the allocation used (responses, base and whole-plan losses)
        self.measured = 0  # of which measured in this run (the rest came from a cache)

    def replayer(self) -> Replayer:
        if self._replayer is None:
            self._replayer = response_replayer(self.ctx.model, self.ctx.calib, _rows_per_batch(self.cfg, self.ctx),
                                               self.dtype, self.loss, top=self.top)
        return self._replayer

    def workers(self):
        """The pool's workers set up for the responses (started on first use), or None without a pool."""
        if self._workers is None and self.ctx.pool is not None:
            self._workers = self.ctx.pool.start(_replica_responses, self.ctx.calib, _rows_per_batch(self.cfg, self.ctx),
                                                self.dtype, self.loss, self.top, progress=self.ctx.progress)
        return self._workers

    def plan_loss(self, plan: PruningPlan) -> float:
        workers = self.workers()
        return workers.call("plan_loss", plan) if workers is not None else plan_loss(self.replayer(), self.ctx.spec, plan)

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()
            self._workers = None
        if self._replayer is not None:
            self._replayer.close()
            self._replayer = None

    @staticmethod
    def _digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]

    def paths(self, base: PruningPlan) -> list:
        key = self._digest([self.model_key, base.to_dict()["layers"]])
        return [self.ctx.workdir / f"tell_responses_{key}.json", cache_dir() / "tell" / f"responses-{key}.json"]

    def __call__(self, base: PruningPlan, variants: dict, stage: int, labels: dict | None = None):
        """(base loss, {pos: [loss of each variant]}), measuring what no file holds. ``labels``: the option of
        every variant, (level, compensate), kept with its loss (``prune --dry-run`` counts the cached ones)."""
        paths = self.paths(base)
        state = {"base_loss": None, "losses": {}, "labels": {}}
        for path in paths:
            if path.exists():
                state = json.loads(path.read_text())
                break

        def save():  # sorted: the same file whatever order the workers' results came in
            for path in paths:
                atomic_write_text(path, json.dumps(state, sort_keys=True))

        vkeys = {pos: [self._digest([pos, vars(lp)]) for lp in lps] for pos, lps in variants.items()}
        self.evaluations += 1 + sum(len(v) for v in variants.values())
        if state["base_loss"] is None:
            state["base_loss"] = self.plan_loss(base)
            self.measured += 1
            save()
        todo = {pos: [lp for lp, k in zip(lps, vkeys[pos]) if k not in state["losses"]] for pos, lps in variants.items()}
        todo = {pos: lps for pos, lps in todo.items() if lps}
        if todo:
            self.measured += sum(len(v) for v in todo.values())

            label_of = {k: lb for pos, ks in vkeys.items() for k, lb in zip(ks, (labels or {}).get(pos, []))}

            def on_block(pos, losses):
                for lp, loss in zip(todo[pos], losses):
                    k = self._digest([pos, vars(lp)])
                    state["losses"][k] = loss
                    if k in label_of:
                        state.setdefault("labels", {})[k] = [pos, *label_of[k]]
                save()
            desc = f"tell: responses, stage {stage + 1}"
            workers = self.workers()
            if workers is None:
                measure_responses(self.replayer(), self.ctx.spec, base, todo, self.ctx.progress, on_block=on_block,
                                  desc=desc)
            else:  # ascending positions: each worker advances its base states through the positions it is given
                workers.map(sorted(todo), "responses", lambda pos: (base, pos, todo[pos]),
                            on_result=lambda pos, w, losses: on_block(pos, losses), progress=self.ctx.progress,
                            desc=f"{desc} ({len(workers.alive)} workers)")
        return state["base_loss"], {pos: [state["losses"][k] for k in ks] for pos, ks in vkeys.items()}


def response_plan(ctx: PruneContext, cfg: TellConfig, prep: Prepared, store: ResponseStore, goal: float) -> tuple:
    """(plan, allocation record) for a ratio budget (``goal`` = ratio) or a predicted-speedup goal."""
    spec, costs = ctx.spec, prep.costs
    log = print if ctx.progress else (lambda *a: None)
    need = goal * spec.total_params / 1e6 if costs is None else costs.dense_ms * (1.0 - 1.0 / goal)
    problem = Problem(spec, lambda layer, kind, o: option_plan(ctx, prep.ws, layer, kind, o), saving_fn(spec, costs),
                      need, cfg.options(ctx.keep_heads), store, ctx.calib.shape[0] * (ctx.calib.shape[1] - 1),
                      joint=lambda plan: store(plan, {}, -1)[0])
    out = allocate(problem, cfg.stages, log, cfg.refine)
    return out["plan"], {"choice": {Block.at(p).name: o.label(Block.at(p).kind) for p, o in out["choice"].items()},
                         "stages": out["stages"], "refine": out["refine"], "saving_unit": "Mparams" if costs is None else "ms",
                         "response_loss": store.loss, "response_loss_why": store.loss_why, "response_kl_top": store.top}


def assign_plan(ctx: PruneContext, cfg: TellConfig, prep: Prepared) -> tuple[PruningPlan, list | None, list | None, list, dict | None]:
    """(plan, per-block ratios, load weights, speedup rounds, allocation record) for the budget in ``ctx.ratio`` /
    ``cfg.speedup``; ratios and weights are None for the response assignment, the record None for the others."""
    spec, costs = ctx.spec, prep.costs
    log = print if ctx.progress else (lambda *a: None)
    store = ResponseStore(ctx, cfg) if cfg.assign == "response" else None
    if store is not None:
        top = f" over each dense distribution's {store.top} most probable tokens" if store.top else ""
        log(f"tell: the responses measure {store.loss}{top} ({store.loss_why})")
    weights = None if store else weights_for(spec, prep.importance, cfg)

    def structural(ratios):
        return build_plan(ctx, ratios, prep.ws, compensate=False)

    def choose(goal, what):
        if store is not None:
            plan, record = response_plan(ctx, cfg, prep, store, goal)
            return plan, None, record
        budget = (lambda r: structural(r).ratio(spec)) if what == "ratio" else (lambda r: costs.speedup(spec, structural(r)))
        ratios = assign_ratios(weights, budget, goal, cfg.block_threshold, what)
        return build_plan(ctx, ratios, prep.ws, compensate=True), ratios, None

    rounds = []
    try:
        if ctx.ratio is not None:
            plan, ratios, record = choose(ctx.ratio, "ratio")
        else:
            goal = cfg.speedup
            for rnd in range(cfg.speedup_rounds + 1):
                plan, ratios, record = choose(goal, "predicted speedup")
                m = checked_speedup(ctx.model, plan, spec, cfg.latency_len, cfg.latency_reps, ctx.seed, cfg.latency_clock,
                                    refresh=cfg.refresh_costs)
                rounds.append({"cost_model_goal": goal, "predicted": costs.speedup(spec, plan), **m})
                log(f"tell: round {rnd}: cost-model goal {goal:.3f}, predicted {rounds[-1]['predicted']:.3f}, "
                    f"measured {m['speedup']:.3f} (target {cfg.speedup})")
                if abs(m["speedup"] / cfg.speedup - 1) <= cfg.speedup_tolerance:
                    break
                goal = max(1.0 + 1e-6, goal * cfg.speedup / m["speedup"])
    finally:
        if store is not None:
            store.close()
    if record is not None:
        record["evaluations"] = store.evaluations
        record["evaluations_measured"] = store.measured
        ctx.count_ppl(store.measured)
    plan.method = "tell"
    plan.validate(spec)
    return plan, ratios, weights, rounds, record


SUMMARY = ("multi-unit pruning; default: one option per block (keep, narrow heads or channels, remove) by an exact "
           "knapsack over measured loss responses, budget --ratio or --speedup (measured unit costs); --assign uniform: "
           "the same ratio in every block (FLAP-style); --assign importance: transfer-entropy ratios")


@register_method("tell", SUMMARY, TellConfig)
def tell(ctx: PruneContext, cfg: TellConfig) -> PruningPlan:
    spec = ctx.spec
    prep = prepare(ctx, cfg)
    plan, ratios, weights, rounds, record = assign_plan(ctx, cfg, prep)
    costs, importance = prep.costs, prep.importance
    kept = plan.kept_fraction(spec)
    last = record["stages"][-1]["blocks"] if record else {}
    blocks = []
    for b, (i, kind) in enumerate(all_blocks(spec.n_layers)):
        removed = 1.0 - kept[i][kind]
        gone = not getattr(plan.layers[i], kind)
        row = {
            "block": Block(i, kind).name, "layer": i, "kind": kind, "params": spec.block_params(i, kind),
            "importance": importance[b] if importance else None,
            "cost_ms_whole": costs.block_ms(spec, i, kind) if costs else None,
            "units_removed": removed,
            "action": "removed" if gone else ("narrowed" if removed > 0 else "kept"),
        }
        if ratios is not None:
            row.update(load_weight=weights[b], ratio_assigned=ratios[b])
        if record is not None:
            name = Block(i, kind).name
            row.update(option=record["choice"][name], options=last[name]["options"], why=last[name].get("why"),
                       response_whole=_whole_response(record, name))
        blocks.append(row)
    ctx.record(
        assign=cfg.assign,
        blocks=blocks,
        budget={"ratio": ctx.ratio, "speedup": cfg.speedup},
        predicted_speedup=costs.speedup(spec, plan) if costs else None,
        speedup_rounds=rounds,
        cost_model=None if costs is None else {
            "path": prep.cost_path, "device": costs.device, "prompt_len": costs.prompt_len, "clock": costs.clock,
            "dense_ms": costs.dense_ms, "ms_per_param": costs.ms_per_param, "adjusted": costs.adjusted,
            "steadiness": costs.steadiness()},
        allocation=None if record is None else {k: v for k, v in record.items() if k != "choice"},
    )
    return plan


def _whole_response(record: dict, name: str) -> float | None:
    """The block's loss increase (nats/token) when removed whole, as first measured (on the dense model)."""
    for o in record["stages"][0]["blocks"][name]["options"]:
        if o["option"] == "remove":
            return o["dloss"]
    return None
