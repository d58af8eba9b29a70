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
alternately with the dense model's, one forward pass each, ``reps`` times after a warm-up. The
saving is the median of the paired differences (robust to other load on the machine drifting), divided by
the parameters removed: **milliseconds saved per parameter removed**, per kind.

The cost model predicts a plan's latency as ``dense_ms - sum_kind ms_per_param[kind] * params_removed[kind]``.
It is linear in parameters at the measured prompt length (attention's share grows with the prompt). Noise can
make a measured coefficient negative or make a block look cheaper per parameter than the width of the same
kind; coefficients are floored at 0, and a block at the width coefficient of its kind (removing a block also
removes its norms, its residual add and its kernel launches), and ``adjusted`` lists what was floored.

Cache: ``cache_dir()/costs/<device>-<model-hash>.json``; the hash covers the model's sizes, dtype, prompt
length, repetitions, clock and the torch thread count.
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
import statistics
from dataclasses import asdict, dataclass, field

import torch

from ..eval.bench import CLOCKS, prompt_ids, time_prefill, timing_threads
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
    raw: dict = field(default_factory=dict)  # kind -> {"saved_ms", "params", "pairs"}
    adjusted: list = field(default_factory=list)
    clock: str = "wall"

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
    pairs = []
    for r in range(reps):
        first, second = (dense, pruned) if r % 2 == 0 else (pruned, dense)
        a = prefill_time(first, prompt_len, clock, seed)
        b = prefill_time(second, prompt_len, clock, seed)
        pairs.append([a, b] if r % 2 == 0 else [b, a])
    return pairs


def measured_speedup(model, plan: PruningPlan, spec: ModelSpec, prompt_len: int = 256, reps: int = 5,
                     seed: int = 0, clock: str = "wall") -> dict:
    """Measured prefill speedup of ``plan`` on a pruned probe of the (dense) ``model`` (``probe``): median dense
    time over median pruned time of alternated passes."""
    pruned = probe(model, plan, spec)
    pairs = paired_latency(model, pruned, prompt_len, reps, seed, clock)
    del pruned
    d, p = statistics.median(x for x, _ in pairs), statistics.median(y for _, y in pairs)
    return {"dense_ms": d, "pruned_ms": p, "speedup": d / p, "prompt_len": prompt_len, "reps": reps, "clock": clock}


def measure_costs(model, spec: ModelSpec, prompt_len: int = 256, reps: int = 5, seed: int = 0, log=None,
                  clock: str = "wall") -> CostModel:
    """Runs the micro-benchmark (module docstring) on the model's device. One pruned copy at a time."""
    device = input_device(model)
    raw, dense_times = {}, []
    for kind in UNIT_KINDS:
        plan = probe_plan(spec, kind)
        pruned = probe(model, plan, spec)
        pairs = paired_latency(model, pruned, prompt_len, reps, seed, clock)
        del pruned
        params = sum(removed_params(spec, i, lp).get(kind, 0) for i, lp in enumerate(plan.layers))
        saved = statistics.median(d - p for d, p in pairs)
        dense_times += [d for d, _ in pairs]
        raw[kind] = {"saved_ms": saved, "params": params, "pairs": pairs}
        if log:
            log(f"tell: cost of {kind}: {saved:.2f} ms saved for {params:,} params removed")
    per, adjusted = {}, []
    for kind in UNIT_KINDS:
        c = raw[kind]["saved_ms"] / raw[kind]["params"]
        if c < 0:
            adjusted.append(f"{kind}: measured {c:.3g} ms/param floored at 0")
            c = 0.0
        per[kind] = c
    for kind in BLOCK_KINDS:
        if per[f"{kind}_block"] < per[f"{kind}_width"]:
            adjusted.append(f"{kind}_block: measured {per[f'{kind}_block']:.3g} ms/param below {kind}_width, floored at it")
            per[f"{kind}_block"] = per[f"{kind}_width"]
    return CostModel(device_name(device), prompt_len, statistics.median(dense_times), per, raw, adjusted, clock)


def load_or_measure(model, spec: ModelSpec, prompt_len: int = 256, reps: int = 5, seed: int = 0,
                    refresh: bool = False, log=None, clock: str = "wall", measure: bool = True) -> tuple[CostModel | None, str]:
    """The cached cost model of this device and model, measured on first use. Returns (model, cache path);
    with ``measure=False`` (a model that runs layer by layer cannot be timed whole) the model is None when
    nothing is cached."""
    device = input_device(model)
    path = cache_dir() / "costs" / f"{device_name(device)}-{model_key(model, spec, prompt_len, reps, clock)}.json"
    if path.exists() and not refresh:
        try:
            return CostModel(**json.loads(path.read_text())), str(path)
        except (json.JSONDecodeError, TypeError):
            pass  # unreadable cache: measure again
    if not measure:
        return None, str(path)
    cm = measure_costs(model, spec, prompt_len, reps, seed, log, clock)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(asdict(cm), indent=1))
    return cm, str(path)
