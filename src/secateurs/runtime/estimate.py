"""Memory a run needs, from sizes alone (a model on the meta device: no weights), and the time a search will
take (one evaluation timed, times the number of evaluations). The same code answers ``prune``'s estimates
(printed before the search; ``--dry-run`` prints only them), the smallest ``--max-memory`` that works, and the
benchmark of predicted memory for large models (``benchmarks/predicted_memory.py``).

What is counted (bytes, working dtype unless said):
- weights: every parameter once (a tied embedding and head count once), split into decoder layers, the input
  embedding, the output head and the rest (norms), which an onloaded model keeps resident;
- the working set of one batch: its hidden states in and out of a layer, plus the largest of what a layer's
  attention (queries, keys and values repeated to every head, float32 scores and probabilities), its MLP (gate,
  up and their product) or one block of the output head (``HEAD_BLOCK`` vocabulary rows: float32 logits and
  the temporaries of a log-sum-exp) needs at once;
- what a method keeps between layers or steps (``method_state``): hidden states of every calibration row,
  input statistics, the greedy search's cached states, the reordered copy of the output head, ...

The smallest budget for layer-by-layer work (``min_budget``) is the resident rest plus the largest streamed
unit (a decoder layer, or one head block) plus one batch's working set (``reserve_bytes``), plus one batch's
hidden states kept between layers.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .head import HEAD_BLOCK


@dataclass
class ModelSizes:
    n_layers: int
    hidden: int
    vocab: int
    n_heads: int
    n_kv: int
    head_dim: int
    intermediate: int
    itemsize: int  # bytes per weight in the working dtype
    layer_bytes: list[int] = field(default_factory=list)
    embed_bytes: int = 0
    head_bytes: int = 0  # 0 when the head is the (tied) embedding
    other_bytes: int = 0  # resident parts: final norm, ...

    @property
    def weights(self) -> int:
        return sum(self.layer_bytes) + self.embed_bytes + self.head_bytes + self.other_bytes

    @property
    def head_block_bytes(self) -> int:
        return min(HEAD_BLOCK, self.vocab) * self.hidden * self.itemsize

    @property
    def unit_bytes(self) -> int:
        """The largest piece streamed at once: a decoder layer or one block of the output head."""
        return max(max(self.layer_bytes, default=0), self.head_block_bytes)


def model_sizes(model, dtype: torch.dtype | None = None) -> ModelSizes:
    """Sizes of a model (real, onloaded or on the meta device) in ``dtype`` (default: its parameters' dtype)."""
    from ..models import get_adapter

    ad = get_adapter(model)
    c = model.config
    first = next(model.parameters())
    item = torch.empty((), dtype=dtype or first.dtype).element_size()
    layers = ad.layers()
    seen, in_layers = set(), 0
    layer_bytes = []
    for layer in layers:
        n = 0
        for p in layer.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        layer_bytes.append(n * item)
        in_layers += n
    emb = model.get_input_embeddings().weight
    head = ad.lm_head().weight
    seen_all = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen_all.values())
    embed_n = emb.numel()
    head_n = 0 if head is emb else head.numel()
    return ModelSizes(
        n_layers=len(layers), hidden=c.hidden_size, vocab=emb.shape[0], n_heads=c.num_attention_heads,
        n_kv=c.num_key_value_heads, head_dim=ad.head_dim(), intermediate=c.intermediate_size, itemsize=item,
        layer_bytes=layer_bytes, embed_bytes=embed_n * item, head_bytes=head_n * item,
        other_bytes=(total - in_layers - embed_n - head_n) * item)


def working_bytes(s: ModelSizes, batch: int, seqlen: int) -> int:
    """Transient memory of one batch (``batch`` rows of ``seqlen`` tokens) through the largest step."""
    t = batch * seqlen
    states = 2 * t * s.hidden * s.itemsize
    attn = (t * s.n_heads * s.head_dim * 3 * s.itemsize  # q, and k/v repeated to every query head
            + 2 * batch * s.n_heads * seqlen * seqlen * 4  # float32 scores and probabilities (worst case)
            + batch * seqlen * seqlen)  # a materialized boolean mask
    mlp = 3 * t * s.intermediate * s.itemsize
    head = 3 * t * min(HEAD_BLOCK, s.vocab) * 4 + s.head_block_bytes
    return states + max(attn, mlp, head)


def reserve_bytes(s: ModelSizes, batch: int, seqlen: int) -> int:
    """What layer-by-layer work sets aside: resident parts + one streamed unit + one batch's working set."""
    return s.other_bytes + s.unit_bytes + working_bytes(s, batch, seqlen)


def min_budget(s: ModelSizes, batch: int, seqlen: int) -> int:
    """The smallest device budget for layer-by-layer work: the reserve plus one batch's hidden states kept
    between layers (the other batches' states may go to files)."""
    return reserve_bytes(s, batch, seqlen) + hidden_bytes(s, batch, seqlen)


def hidden_bytes(s: ModelSizes, rows: int, seqlen: int) -> int:
    """Hidden states of ``rows`` calibration rows at one point of the model."""
    return rows * seqlen * s.hidden * s.itemsize


# --- what each method keeps ----------------------------------------------------------------------------------
def method_state(s: ModelSizes, method: str, rows: int, seqlen: int, options: dict | None = None) -> dict:
    """Bytes a method keeps beyond the weights and one batch's working set, by kind (see the module docstring).
    ``options`` are the method's options (cache_mb, te_tokens, fitness_rows...)."""
    o = options or {}
    h = hidden_bytes(s, rows, seqlen)
    stats = s.n_layers * (s.n_heads * s.head_dim + s.intermediate) * 2 * 8  # float64 sums and sums of squares
    if method in ("blockpruner", "sleb"):
        n_pos = 2 * s.n_layers
        rotary = rows * seqlen * s.head_dim * 2 * 4  # cos and sin per calibration row (float32 at most)
        return {"embeddings of the calibration rows": h + rotary,
                "reordered output head (chunk copies)": s.vocab * s.hidden * s.itemsize,
                "current states at every block position (pinned)": n_pos * h,
                "other cached states (--cache-mb)": int(o.get("cache_mb", 1024)) << 20}
    if method in ("wanda-sp", "self-pruner"):
        return {"hidden states of the calibration rows (in and out of a layer)": 2 * h, "input statistics": stats}
    if method == "tell":
        tokens = min(int(o.get("te_tokens", 8192)), rows * (seqlen - 1))
        return {"residual streams at every block boundary (float32)": (2 * s.n_layers + 1) * tokens * s.hidden * 4,
                "input statistics": stats}
    if method == "flap":
        return {"input statistics": stats}
    if method == "shortgpt":
        return {}
    return {}


@dataclass
class PeakEstimate:
    """Peak memory of a run, per place (``device``: where it computes; ``cpu`` below a GPU; ``disk``: spilled)."""

    onload: bool
    weights_resident: int
    working: int
    state: dict
    per_place: dict

    def as_dict(self) -> dict:
        return asdict(self)


def estimate_peak(s: ModelSizes, method: str, rows: int, seqlen: int, batch_size: int, device_type: str = "cpu",
                  budget: int | None = None, options: dict | None = None) -> PeakEstimate:
    """Peak memory of ``prune --method METHOD`` with this calibration. ``budget`` (bytes on the compute device):
    None = everything resident (today's fast path); else layer-by-layer, the method's state kept within the
    budget and the rest on the next tier (CPU memory under a GPU, else disk; the greedy search recomputes
    cached states it has no room for instead)."""
    work = working_bytes(s, batch_size, seqlen)
    state = method_state(s, method, rows, seqlen, options)
    kept = sum(state.values())
    if budget is None:
        # perplexity before and after: one batch at a time (batch-major), no states kept between batches
        return PeakEstimate(False, s.weights, work, state, {"device": s.weights + work + kept})
    floor = min_budget(s, batch_size, seqlen)
    room = max(0, budget - floor)
    if method in ("blockpruner", "sleb"):
        # the cache of other states is bounded by the room; pinned states beyond it spill, then are recomputed
        state = dict(state)
        state["other cached states (--cache-mb)"] = min(state["other cached states (--cache-mb)"], room // 2)
        kept = sum(state.values())
    on_device = floor + min(kept, room)
    below = max(0, kept - room)
    per = {"device": on_device, ("cpu" if device_type == "cuda" else "disk"): below}
    if device_type == "cuda":
        per["cpu"] = per.get("cpu", 0) + s.weights  # the weights wait in CPU memory (or are read from disk)
    return PeakEstimate(True, s.other_bytes + s.unit_bytes, work, state, per)


# --- time ------------------------------------------------------------------------------------------------------
def evaluations(method_cfg, spec, ratio: float | None, rows: int) -> tuple[int, int, str]:
    """(number of evaluations, calibration rows per evaluation, what is counted) that a method will run: its
    config's ``evaluations`` when it has one, else one pass over the calibration rows."""
    fn = getattr(method_cfg, "evaluations", None)
    if fn is not None:
        return fn(spec, ratio, rows)
    return 1, rows, "one calibration pass"


def greedy_evaluations(n_candidates: int, steps: int) -> int:
    """Candidate evaluations of a greedy search of ``steps`` steps over ``n_candidates`` candidates (the exact
    search; the fast search abandons most of them early), plus the dense model's."""
    steps = min(steps, n_candidates)
    return 1 + sum(n_candidates - k for k in range(steps))


def steps_for_ratio(spec, ratio: float, sizes_of_candidates: list[int]) -> int:
    """An upper bound on the greedy steps to reach ``ratio``: removing the smallest candidates first."""
    need = ratio * spec.total_params
    got, k = 0, 0
    for n in sorted(sizes_of_candidates):
        if got >= need:
            break
        got += n
        k += 1
    return max(k, 1)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
