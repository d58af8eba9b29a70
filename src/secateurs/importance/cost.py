"""What removing a unit saves in time: a short micro-benchmark on the target device, cached per device and model.

Four unit kinds: attention width (query heads, and the key/value heads whose groups empty), MLP width
(channels), a whole attention block and a whole MLP block. For each kind a pruned probe of the model is built
physically (``apply_plan`` on ``runtime.shared_copy``: the probe shares every tensor it does not slice with the
model, so it costs only the sliced tensors, never a second model) with that kind removed in about half of its
places:

- ``attn_width``: every layer keeps about half of its query heads (``select_heads``);
- ``mlp_width``: every layer keeps half of its MLP channels;
- ``attn_block`` / ``mlp_block``: the attention / MLP block of every odd-numbered layer is removed;

and its prefill time (batch 1, ``prompt_len`` random tokens; ``prefill_time``: wall time via
``secateurs.eval.bench.time_prefill``, or the process's CPU time on one thread, see there) is measured
alternately with the dense model's, one forward pass each, after a warm-up: at least ``reps`` pairs, more
until the median of the per-pair ratios pruned / dense is known to half a percent (``steady_pairs``, at most
4 x ``reps`` pairs). A kind's saving is a **fraction of the dense time**, 1 - that median: load that slows
both passes of a pair (a busier core, a shared cache, a lower clock) cancels in the ratio, where a difference
of milliseconds would carry it (under load, removing a whole attention block once looked worth 10.9 ms
per layer of SmolLM2 against 6.5 ms quiet, and the knapsack chose another plan). The fraction times the
median dense time, divided by the parameters removed, is **milliseconds saved per parameter removed**, per
kind; the plan depends on the fractions only (the budget is a fraction of the dense time too). Each kind's
spread and pair count, and the machine's load (``eval.load``), are kept with the costs (``steadiness``).

The cost model predicts a plan's latency as ``dense_ms - sum_kind ms_per_param[kind] * params_removed[kind]``.
It is linear in parameters at the measured prompt length (attention's share grows with the prompt). Noise can
make a measured coefficient negative or make a block look cheaper per parameter than the width of the same
kind; coefficients are floored at 0, and a block at the width coefficient of its kind (removing a block also
removes its norms, its residual add and its kernel launches), and ``adjusted`` lists what was floored.

Cache: ``cache_dir()/costs/<device>-<model-hash>.json``; the hash covers the model's sizes, dtype, prompt
length, repetitions, clock, the estimator and the torch thread count.
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..eval.bench import CLOCKS, prompt_ids, time_prefill, timed_threads, timing_threads
from ..eval.load import LoadWatch, busy_now
from ..models.base import BLOCK_KINDS, ModelSpec
from ..files import cache_dir
from ..runtime import input_device, model_dtype, shared_copy
from ..plan import UNIT_KINDS, PruningPlan, removed_params, select_heads
from ..files import atomic_write_text


@dataclass
class CostModel:
    device: str
    prompt_len: int
    dense_ms: float
    ms_per_param: dict  # kind -> milliseconds saved per parameter removed
    raw: dict = field(default_factory=dict)  # kind -> {"fraction_saved", "spread", "steady", "saved_ms", "params", "pairs"}
    adjusted: list = field(default_factory=list)
    clock: str = "wall"
    load: dict | None = None  # eval.load.LoadWatch.record() of the measurement

    def steadiness(self) -> dict:
        """Per kind: the fraction of the dense time saved, the robust spread of the per-pair fractions, the pairs
        timed and whether the median reached PRECISION; and the machine's load while measuring."""
        return {"kinds": {k: {"fraction_saved": r.get("fraction_saved"), "spread": r.get("spread"),
                              "pairs": len(r.get("pairs", [])), "steady": r.get("steady")} for k, r in self.raw.items()},
                "load": self.load}

    def saved_ms(self, spec: ModelSpec, plan: PruningPlan) -> float:
        total = 0.0
        for i, lp in enumerate(plan.layers):
            for kind, params in removed_params(spec, i, lp).items():
                total += self.ms_per_param[kind] * params
        return total

    def predict_ms(self, spec: ModelSpec, plan: PruningPlan) -> float:
        return max(self.dense_ms - self.saved_ms(spec, plan), 1e-9)

    def speedup(self, spec: ModelSpec, plan: PruningPlan) -> float:
        return self.dense_ms / self.predict_ms(spec, plan)

    def block_ms(self, spec: ModelSpec, layer: int, kind: str) -> float:
        """Milliseconds saved by removing one whole block."""
        return self.ms_per_param[f"{kind}_block"] * spec.block_params(layer, kind)


def probe_plan(spec: ModelSpec, kind: str) -> PruningPlan:
    """The pruned structure the micro-benchmark times for one unit kind (module docstring)."""
    plan = PruningPlan.dense(spec)
    for i, lp in enumerate(plan.layers):
        if kind == "attn_width":
            lp.heads = select_heads(range(spec.n_heads, 0, -1), max(1, spec.n_heads // 2), spec.n_kv)
        elif kind == "mlp_width":
            lp.channels = list(range(spec.intermediate // 2))
        elif kind == "attn_block" and i % 2 == 1:
            lp.attn = False
        elif kind == "mlp_block" and i % 2 == 1:
            lp.mlp = False
    return plan


def probe(model, plan: PruningPlan, spec: ModelSpec):
    """The model pruned by ``plan``, built at its pruned shapes beside it: the module structure is copied, the
    tensors are the model's own except those surgery slices (no whole-model copy)."""
    from ..surgery import apply_plan

    return apply_plan(shared_copy(model), plan, spec)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{platform.machine()}-{_cpu_model()}-{torch.get_num_threads()}t"
    return re.sub(r"[^A-Za-z0-9_.]+", "_", name).strip("_")[:80]


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def model_key(model, spec: ModelSpec, prompt_len: int, reps: int, clock: str = "wall") -> str:
    dtype = str(model_dtype(model))
    desc = json.dumps({"spec": spec.as_dict(), "total": spec.total_params, "vocab": model.config.vocab_size,
                       "dtype": dtype, "prompt_len": prompt_len, "reps": reps, "clock": clock,
                       "estimator": ["pair ratios", PRECISION, MAX_FACTOR],
                       "threads": torch.get_num_threads()}, sort_keys=True)
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


@torch.inference_mode()
def prefill_time(model, prompt_len: int, clock: str = "wall", seed: int = 0) -> float:
    """Milliseconds of one prefill pass. ``wall``: wall time (``time_prefill``, the latency a user sees on a
    machine of their own). ``cpu``: CPU time of this process for the same pass, run on one thread; on a shared
    CPU it measures the pass's work without the time other processes take from it (wall time under a load of
    10 on 2 cores swings by seconds). On a GPU only ``wall`` is meaningful and is used."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    device = input_device(model)
    ids = prompt_ids(model, prompt_len, seed)
    with timing_threads(device, clock):
        return time_prefill(model, ids, clock=clock)


def paired_latency(dense, pruned, prompt_len: int, reps: int, seed: int = 0, clock: str = "wall") -> list[list[float]]:
    """``reps`` pairs [dense_ms, pruned_ms], measured alternately after one warm-up pass of each."""
    prefill_time(dense, prompt_len, clock, seed)
    prefill_time(pruned, prompt_len, clock, seed)
    return [_pair(dense, pruned, prompt_len, seed, clock, r) for r in range(reps)]


def _pair(dense, pruned, prompt_len: int, seed: int, clock: str, r: int) -> list[float]:
    """[dense_ms, pruned_ms] of one pair; the first of the two alternates with ``r``."""
    first, second = (dense, pruned) if r % 2 == 0 else (pruned, dense)
    a = prefill_time(first, prompt_len, clock, seed)
    b = prefill_time(second, prompt_len, clock, seed)
    return [a, b] if r % 2 == 0 else [b, a]


# Repetitions: at least ``reps`` pairs, more until the median of the per-pair time ratios is known to PRECISION
# (its standard error, from the robust spread), at most MAX_FACTOR * reps pairs.
PRECISION = 0.005
MAX_FACTOR = 4


def robust_spread(xs: list[float]) -> float:
    """1.4826 x the median absolute deviation: the standard deviation of normal data, robust to outliers."""
    m = statistics.median(xs)
    return 1.4826 * statistics.median(abs(x - m) for x in xs)


def steady_pairs(dense, pruned, prompt_len: int, reps: int, seed: int = 0, clock: str = "wall",
                 watch: LoadWatch | None = None) -> dict:
    """Alternated pairs (``paired_latency``) until the ratio pruned / dense of a pair is steady (PRECISION).
    The ratio of the two passes of a pair cancels what load does to both (slower clocks, a shared cache); its
    median is the figure. Returns ``pairs``, ``ratio`` (median pruned / dense), ``spread`` (robust spread of
    the per-pair ratios) and ``steady`` (whether PRECISION was reached)."""
    pairs = paired_latency(dense, pruned, prompt_len, reps, seed, clock)

    def ratios():
        return [p / d for d, p in pairs]

    def steady():
        return 1.2533 * robust_spread(ratios()) / len(pairs) ** 0.5 <= PRECISION

    while not steady() and len(pairs) < MAX_FACTOR * reps:
        pairs.append(_pair(dense, pruned, prompt_len, seed, clock, len(pairs)))
        if watch is not None:
            watch.sample()
    return {"pairs": pairs, "ratio": statistics.median(ratios()), "spread": robust_spread(ratios()), "steady": steady()}


def measured_speedup(model, plan: PruningPlan, spec: ModelSpec, prompt_len: int = 256, reps: int = 5,
                     seed: int = 0, clock: str = "wall") -> dict:
    """Measured prefill speedup of ``plan`` on a pruned probe of the (dense) ``model`` (``probe``): the inverse of
    the median per-pair time ratio of alternated passes (``steady_pairs``); the medians of each side too."""
    pruned = probe(model, plan, spec)
    with LoadWatch(timed_threads(input_device(model), clock)) as watch:
        m = steady_pairs(model, pruned, prompt_len, reps, seed, clock, watch)
    del pruned
    pairs = m["pairs"]
    d, p = statistics.median(x for x, _ in pairs), statistics.median(y for _, y in pairs)
    return {"dense_ms": d, "pruned_ms": p, "speedup": 1.0 / m["ratio"], "spread": m["spread"], "pairs": len(pairs),
            "prompt_len": prompt_len, "reps": reps, "clock": clock, "loaded": watch.loaded}


def measure_costs(model, spec: ModelSpec, prompt_len: int = 256, reps: int = 5, seed: int = 0, log=None,
                  clock: str = "wall") -> CostModel:
    """Runs the micro-benchmark (module docstring) on the model's device. One pruned copy at a time."""
    device = input_device(model)
    raw, dense_times = {}, []
    with LoadWatch(timed_threads(device, clock)) as watch:
        for kind in UNIT_KINDS:
            plan = probe_plan(spec, kind)
            pruned = probe(model, plan, spec)
            m = steady_pairs(model, pruned, prompt_len, reps, seed, clock, watch)
            del pruned
            watch.sample()
            params = sum(removed_params(spec, i, lp).get(kind, 0) for i, lp in enumerate(plan.layers))
            dense_times += [d for d, _ in m["pairs"]]
            raw[kind] = {"fraction_saved": 1.0 - m["ratio"], "spread": m["spread"], "steady": m["steady"],
                         "params": params, "pairs": m["pairs"]}
            if log:
                log(f"tell: cost of {kind}: {100 * raw[kind]['fraction_saved']:.2f}% of the dense time saved "
                    f"(spread {100 * m['spread']:.2f}%, {len(m['pairs'])} pairs) for {params:,} params removed")
    dense_ms = statistics.median(dense_times)
    per, adjusted = {}, []
    for kind in UNIT_KINDS:
        raw[kind]["saved_ms"] = raw[kind]["fraction_saved"] * dense_ms
        c = raw[kind]["saved_ms"] / raw[kind]["params"]
        if c < 0:
            adjusted.append(f"{kind}: measured {c:.3g} ms/param floored at 0")
            c = 0.0
        per[kind] = c
    for kind in BLOCK_KINDS:
        if per[f"{kind}_block"] < per[f"{kind}_width"]:
            adjusted.append(f"{kind}_block: measured {per[f'{kind}_block']:.3g} ms/param below {kind}_width, floored at it")
            per[f"{kind}_block"] = per[f"{kind}_width"]
    return CostModel(device_name(device), prompt_len, dense_ms, per, raw, adjusted, clock, watch.record())

def _cache_path(model, spec: ModelSpec, prompt_len: int, reps: int, clock: str, suffix: str) -> Path:
    """The cache file of this device and model (``suffix``: ``.json`` for the costs, ``-speedups.json`` for the
    speedup checks), the device name's dots kept (a CPU model name such as ``2.20GHz`` has them)."""
    device = input_device(model)
    return cache_dir() / "costs" / f"{device_name(device)}-{model_key(model, spec, prompt_len, reps, clock)}{suffix}"


def _measure_again(load: dict | None, model, clock: str) -> bool:
    """A measurement taken on a busy machine is provisional: measured again once the machine is quiet."""
    return bool(load and load.get("loaded")) and busy_now(timed_threads(input_device(model), clock)) is False


def load_or_measure(model, spec: ModelSpec, prompt_len: int = 256, reps: int = 5, seed: int = 0,
                    refresh: bool = False, log=None, clock: str = "wall", measure: bool = True) -> tuple[CostModel | None, str]:
    """The cached cost model of this device and model, measured on first use (and again when the cached one was
    measured on a busy machine and this one is quiet now). Returns (model, cache path); with ``measure=False``
    (a model that runs layer by layer cannot be timed whole) the model is None when nothing is cached."""
    path = _cache_path(model, spec, prompt_len, reps, clock, ".json")
    if path.exists() and not refresh:
        try:
            cm = CostModel(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError):
            cm = None  # unreadable cache: measure again
        if cm is not None and not (measure and _measure_again(cm.load, model, clock)):
            return cm, str(path)
        if cm is not None and log:
            log("tell: the cached unit costs were measured on a busy machine; measuring again, it is quiet now")
    if not measure:
        return None, str(path)
    cm = measure_costs(model, spec, prompt_len, reps, seed, log, clock)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(asdict(cm), indent=1))
    return cm, str(path)


def checked_speedup(model, plan: PruningPlan, spec: ModelSpec, prompt_len: int = 256, reps: int = 5, seed: int = 0,
                    clock: str = "wall", refresh: bool = False) -> dict:
    """``measured_speedup`` of ``plan``, measured once per device and model like the unit costs (a table beside
    them, keyed by the plan; provisional when measured on a busy machine) and marked ``cached`` when read back:
    the same command on this device then checks its plans against the same figures, whatever the load."""
    path = _cache_path(model, spec, prompt_len, reps, clock, "-speedups.json")
    try:
        table = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        table = {}
    key = hashlib.sha256(json.dumps([seed, plan.to_dict()["layers"]], sort_keys=True).encode()).hexdigest()[:20]
    hit = table.get(key)
    if hit is not None and not refresh and not _measure_again({"loaded": hit.get("loaded")}, model, clock):
        return {**hit, "cached": True}
    m = measured_speedup(model, plan, spec, prompt_len, reps, seed, clock)
    table[key] = m
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(table, indent=1))
    return {**m, "cached": False}
