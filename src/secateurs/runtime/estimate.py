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
from ..models import get_adapter
from .placement import device_key


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
@dataclass
class Held:
    """Something a method keeps for a while: its size, where it lives (``device``, or ``cpu`` whatever the
    device) and whether it may be dropped and recomputed (the greedy search's cached states)."""

    what: str
    nbytes: int
    where: str = "device"
    recomputable: bool = False
    spills: bool = True  # beyond the budget: to the next tier (else simply not kept)


def method_state(s: ModelSizes, method: str, rows: int, seqlen: int, options: dict | None = None,
                 onload: bool = False) -> list[Held]:
    """What a method keeps beyond the weights and one batch's working set (see the module docstring).
    ``options`` are the method's options (cache_mb, te_tokens, fitness_rows...)."""
    o = options or {}
    h = hidden_bytes(s, rows, seqlen)
    stats = Held("input statistics (float64)", s.n_layers * (s.n_heads * s.head_dim + s.intermediate) * 2 * 8)
    if method in ("blockpruner", "sleb"):
        batch = int(o.get("batch_size", 1))
        n_batches = -(-rows // batch)
        # cos and sin of the rotary embedding per batch (float32 at most); shared by all batches when onloaded
        rotary = (1 if onload else n_batches) * batch * seqlen * s.head_dim * 2 * 4
        return [Held("embeddings of the calibration rows and layer arguments", h + rotary),
                Held("output head reordered in chunks", s.vocab * s.hidden * s.itemsize),
                Held("current states at every block position", 2 * s.n_layers * h, recomputable=True),
                Held("other cached states (--cache-mb)", int(o.get("cache_mb", 1024)) << 20, recomputable=True,
                     spills=False)]
    if method == "wanda-sp":
        return [Held("hidden states of the calibration rows", h), stats]
    if method == "self-pruner":
        fit = hidden_bytes(s, min(int(o.get("fitness_rows") or 4), rows), seqlen)
        return [Held("hidden states of the calibration rows (final wanda-sp pass)", h), stats,
                Held("hidden states of the fitness rows", fit if onload else 0)]
    if method == "tell":
        held, assign = [stats], o.get("assign", "response")
        if assign == "response":
            held += [Held("embeddings of the calibration rows and layer arguments (the replay)", h),
                     Held("the base model's state entering the measured block", h)]
        if assign == "importance" or o.get("te"):
            tokens = min(int(o.get("te_tokens", 8192)), rows * (seqlen - 1))
            held.append(Held("residual streams at every block boundary (float32, CPU)",
                             (2 * s.n_layers + 1) * tokens * s.hidden * 4, where="cpu"))
        return held
    if method in ("flap", "shortgpt", "uniform-drop"):
        return [stats] if method == "flap" else []
    return []


@dataclass
class PeakEstimate:
    """Peak memory of a run, by place: the compute device (its name), ``cpu`` (below a GPU), ``disk`` (spilled
    files) and ``recomputed`` (cached states that found no room and are computed again)."""

    onload: bool
    weights: int
    working: int
    held: list
    per_place: dict

    def as_dict(self) -> dict:
        return asdict(self)


def estimate_peak(s: ModelSizes, method: str, rows: int, seqlen: int, batch_size: int, device: str = "cpu",
                  budget: int | None = None, options: dict | None = None, cpu_budget: int | None = None,
                  disk_budget: int | None = None) -> PeakEstimate:
    """Peak memory of ``prune --method METHOD`` with this calibration on ``device`` (``cpu``, ``cuda:0``).
    ``budget`` (bytes on the compute device): None = everything resident (the fast path); else layer by layer:
    the reserve (``reserve_bytes``), then what the method keeps within the rest of the budget, the remainder on
    the next tier (CPU memory below a GPU while ``cpu_budget`` allows: first the weights, which are else read
    from the checkpoint; then files while ``disk_budget`` allows), cached states that find no room anywhere
    recomputed; ``does not fit`` is what must be kept and found no room. As ``runtime.placement.Budget`` does."""
    dev = device_key(device)
    gpu = dev != "cpu"
    work = working_bytes(s, batch_size, seqlen)
    held = method_state(s, method, rows, seqlen, {"batch_size": batch_size, **(options or {})}, onload=budget is not None)
    on_cpu = sum(x.nbytes for x in held if x.where == "cpu")
    if budget is None:
        per = {dev: s.weights + work + sum(x.nbytes for x in held if x.where == "device")}
        if on_cpu:
            per["cpu"] = per.get("cpu", 0) + on_cpu
        return PeakEstimate(False, s.weights, work, held, per)
    room = max(0, budget - reserve_bytes(s, batch_size, seqlen))
    kept = sum(x.nbytes for x in held if x.where == "device" and not x.recomputable)
    cache = sum(x.nbytes for x in held if x.where == "device" and x.recomputable and x.spills)
    optional = sum(x.nbytes for x in held if x.where == "device" and not x.spills)
    on_dev = min(kept, room)
    spill = kept - on_dev
    cache_dev = min(cache, room - on_dev)
    cache_left = cache - cache_dev
    optional_dev = min(optional, (room - on_dev - cache_dev) // 2)  # the replay gives its state cache half the rest
    per = {dev: reserve_bytes(s, batch_size, seqlen) + on_dev + cache_dev + optional_dev}
    rest_kept, rest_cache = spill, cache_left
    if gpu:  # the weights wait in CPU memory while it has room (else they are read from the checkpoint on disk)
        cpu_free = cpu_budget if cpu_budget is not None else s.weights + spill + cache_left
        w_cpu = min(s.weights, cpu_free)
        cpu_free -= w_cpu
        k = min(rest_kept, cpu_free)
        c = min(rest_cache, cpu_free - k)
        rest_kept, rest_cache = rest_kept - k, rest_cache - c
        per["cpu"] = w_cpu + k + c + on_cpu
    else:
        per["cpu"] = per.pop(dev) + on_cpu
    disk_free = disk_budget if disk_budget is not None else rest_kept + rest_cache
    k = min(rest_kept, disk_free)
    c = min(rest_cache, disk_free - k)
    per["disk"] = k + c
    per["recomputed"] = rest_cache - c
    if rest_kept - k:
        per["does not fit"] = rest_kept - k
    return PeakEstimate(True, s.weights, work, held, per)


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
