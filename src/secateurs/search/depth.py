"""What the greedy block searches (blockpruner, sleb) share on top of ``search.greedy``: their options and the
run of a search inside a prune job (resumable from ``order.json`` in the run folder), in this process or on
the job's worker pool (``--workers``: each worker builds its own ``Replayer`` from its replica of the model
with ``replayer_for``, as this process would)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import UserError
from ..models import get_adapter
from .greedy import ORDER_FORMAT, CandidateScorer, PooledSteps, Replayer, SearchSettings, greedy_search

from ..methods import MethodConfig
from ..runtime.estimate import Held, hidden_bytes

if TYPE_CHECKING:
    from ..methods import PruneContext

ORDER_FILE = "order.json"


@dataclass
class SearchOptions(MethodConfig):
    """Options shared by the greedy searches (blockpruner, sleb)."""

    searches = True
    parallel = True
    query_heads = "kept"

    exact_reference: bool = field(default=False, metadata={"help": "run the straightforward search (every candidate through the whole model): slow, same result"})
    batch_size: int = field(default=1, metadata={"help": "calibration rows per forward pass; smaller batches let bad candidates be abandoned earlier"})
    cache_mb: int = field(default=1024, metadata={"help": "memory for cached hidden states of the fast search, MiB"})
    from_order: str | None = field(default=None, metadata={"help": "take the plan from a saved order.json (same method, model and calibration) instead of searching"})

    def check(self, ratio) -> None:
        super().check(ratio)
        if self.batch_size < 1 or self.cache_mb < 0:
            raise UserError("--batch-size must be >= 1 and --cache-mb >= 0")

    def pass_rows(self) -> int:
        return self.batch_size

    def held(self, sizes, rows, seqlen, onload):
        h = hidden_bytes(sizes, rows, seqlen)
        n_batches = -(-rows // self.batch_size)
        # cos and sin of the rotary embedding per batch (float32 at most); shared by all batches when onloaded
        rotary = (1 if onload else n_batches) * self.batch_size * seqlen * sizes.head_dim * 2 * 4
        return [Held("embeddings of the calibration rows and layer arguments", h + rotary),
                Held("output head reordered in chunks", sizes.vocab * sizes.hidden * sizes.itemsize),
                Held("current states at every block position", 2 * sizes.n_layers * h, recomputable=True),
                Held("other cached states (--cache-mb)", self.cache_mb << 20, recomputable=True, spills=False)]


def replayer_for(model, calib: torch.Tensor, cfg: SearchOptions) -> Replayer:
    """The search's replayer of ``model`` on the calibration rows, in the model's working dtype (``--dtype``),
    wherever the runtime placed it; ``close()`` it after the search."""
    return Replayer(model, get_adapter(model), calib, cfg.batch_size)


def _replica_scorer(model, calib: torch.Tensor, cfg: SearchOptions, s: SearchSettings) -> CandidateScorer:
    """A pool worker's side of the search (``runtime.pool``: built on the worker's replica of the model)."""
    with torch.inference_mode():
        return CandidateScorer(replayer_for(model, calib, cfg), s)


def run_greedy(ctx: PruneContext, cfg: SearchOptions, candidates, method: str, target_ratio, max_steps) -> dict:
    """Runs (or resumes) the greedy search in ``ctx.workdir/order.json``; records counts in result.json."""
    s = SearchSettings(candidates, target_ratio, max_steps, cfg.exact_reference, cfg.cache_mb)
    path = ctx.workdir / ORDER_FILE
    if ctx.pool is not None:
        with ctx.pool.start(_replica_scorer, ctx.calib, cfg, s, progress=ctx.progress) as workers:
            steps = PooledSteps(workers, Replayer.count_tokens(ctx.calib), s)
            state = greedy_search(steps, ctx.spec, s, path, method, ctx.progress)
    else:
        with torch.inference_mode():
            replayer = replayer_for(ctx.model, ctx.calib, cfg)
            try:
                state = greedy_search(replayer, ctx.spec, s, path, method, ctx.progress)
            finally:
                replayer.close()
    steps = state["steps"]
    full = sum(st["evaluations_full"] for st in steps)
    abandoned = sum(st["evaluations_abandoned"] for st in steps)
    ctx.count_ppl(full + abandoned)
    ctx.record(search="exact" if cfg.exact_reference else "fast", evaluations_full=full,
               evaluations_abandoned=abandoned, blocks_run=sum(st["blocks_run"] for st in steps),
               order_file=ORDER_FILE, calib_ppl_dense=state["dense"]["ppl"],
               order=[{k: st[k] for k in ("removed", "ppl", "ratio")} for st in steps])
    return state


def load_order(path: str, ctx: PruneContext, method: str) -> dict:
    """A removal order saved by a search of ``method`` on this model (``--from-order``)."""
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
    if state.get("method") not in (method, "", None):
        raise UserError(f"order file {path} is the order of {state['method']}, not of {method}")
    ctx.record(order_file=str(path), searched=False)
    return state
