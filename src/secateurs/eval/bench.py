"""Speed and memory of a model (dense or pruned), alone or side by side with another one.

What is measured (batch 1, random prompt tokens drawn with ``seed``, no gradients):
- **prefill**: wall time of one forward pass over a prompt of ``prompt_len`` tokens, no KV cache, logits for
  every position (what ``model(input_ids)`` does).
- **decode**: after an untimed prefill of the same prompt (with cache), ``decode_tokens`` greedy steps, one
  token at a time with the KV cache; throughput = tokens / time of those steps.
- Timer (``clock``): on a CPU by default (``cpu``) the CPU time of this process with torch on one thread, the
  work of a pass, which holds up when other processes share the machine (the wall time of the same pair of models
  under load swung by tens of percent, so a pruned model measured slower than the dense one); ``wall``:
  ``time.perf_counter`` with torch's threads, the latency a user sees on a machine of their own. CUDA events on
  a GPU (synchronised), whatever the clock.
- Load: the runnable processes are sampled before, between the rounds and after (``eval.load``); a timing
  done on a loaded machine says so (``load`` in the result, a note where a figure is printed).
- Models are run in turn (``against``, ``model``, ``against``, ``model``, ...): ``warmup`` rounds that are
  dropped, then ``reps`` rounds; each figure is the median over the rounds. Speedup = against / model for
  prefill time, model / against for decode throughput: above 1 means ``model`` is faster.
- **peak memory**: bytes of the weights (parameters and buffers) plus the peak extra memory of one prefill
  followed by the decode steps (activations, KV cache, allocator slack). On CUDA the extra is the growth of
  ``torch.cuda.max_memory_allocated``; on CPU it is the growth of the process's peak resident set size
  (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) over a second run, measured in a fresh Python
  process per model so that the other model cannot hide in it; the first run touches every weight page
  (weights may be mapped from the file lazily) and freed memory is returned (``malloc_trim``) before the
  peak is reset. Elsewhere (no ``/proc``) it is not measured.
- **FLOPs** (the ideal speedup): matrix-multiply FLOPs counted from the module shapes as they are: every
  ``nn.Linear`` (projections, MLP) 2 x in x out per token, the ``lm_head`` for the last position only (as the
  timed prefill computes it), and attention scores and values
  4 x head_dim x kept query heads per (query, visible key) pair, causal, within the sliding window where a
  layer has one. Norms, activations and the embedding lookup are not counted. Ideal speedup = FLOPs of
  ``against`` / FLOPs of ``model``, for the prefill and for one decode step at context ``prompt_len``.
"""
from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..runtime import input_device, model_dtype
from ..models.base import get_adapter, unique_param_count
from .load import LoadWatch

CLOCKS = ("cpu", "wall")


@dataclass
class BenchSettings:
    prompt_len: int = 512
    decode_tokens: int = 128
    warmup: int = 2
    reps: int = 5
    seed: int = 0
    clock: str = "cpu"  # on a CPU: this process's CPU time on one thread, or wall time (module docstring)

    def validate(self) -> None:
        if self.prompt_len < 2 or self.decode_tokens < 1 or self.reps < 1 or self.warmup < 0:
            raise UserError("bench needs --prompt-len >= 2, --decode-tokens >= 1, --reps >= 1 and --warmup >= 0")
        if self.clock not in CLOCKS:
            raise UserError(f"--clock must be one of {', '.join(CLOCKS)} (got {self.clock!r})")


def _device(model) -> torch.device:
    return input_device(model)


def _dtype(model) -> torch.dtype:
    return model_dtype(model)


def prompt_ids(model, prompt_len: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(_device(model))


class _Timer:
    """Milliseconds of a block: CUDA events on a GPU, perf_counter on CPU, or with ``clock="cpu"`` on a CPU the
    process's CPU time (``time.process_time``)."""

    def __init__(self, device: torch.device, clock: str = "wall"):
        self.cuda = device.type == "cuda"
        self.clock = time.process_time if clock == "cpu" else time.perf_counter

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            self.start.record()
        else:
            self.t0 = self.clock()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (self.clock() - self.t0) * 1000


@contextmanager
def timing_threads(device: torch.device, clock: str):
    """Torch on one thread while a CPU is timed by the ``cpu`` clock (its CPU time is then the pass's work, not
    the sum over threads spinning for one another); the thread count is restored after."""
    if clock != "cpu" or device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def timed_threads(device: torch.device, clock: str) -> int:
    """The threads a timing by ``clock`` runs on (``timing_threads``): what it needs of the machine's cores."""
    return 1 if clock == "cpu" and device.type == "cpu" else torch.get_num_threads()


def timer_name(device: torch.device, clock: str) -> str:
    if device.type == "cuda":
        return "cuda events"
    return "process_time, 1 thread" if clock == "cpu" else "perf_counter"


@torch.inference_mode()
def time_prefill(model, ids: torch.Tensor, clock: str = "wall") -> float:
    """Milliseconds of one forward pass over ``ids`` without cache, computing the logits of the last position
    only (as a generation prefill does: on Gemma's 262k vocabulary, logits for every position would dominate).
    ``clock``: see ``_Timer``."""
    with _Timer(ids.device, clock) as t:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return t.ms


@torch.inference_mode()
def time_decode(model, ids: torch.Tensor, n_tokens: int, clock: str = "wall") -> float:
    """Tokens per second of ``n_tokens`` greedy steps with the KV cache, after an untimed prefill of ``ids``
    (``clock``: see ``_Timer``)."""
    import inspect

    # transformers 5 renamed past_key_values to cache (the old name still works, with a warning)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True)
    past, nxt = getattr(out, name), out.logits[:, -1:].argmax(-1)
    with _Timer(ids.device, clock) as t:
        for _ in range(n_tokens):
            out = model(input_ids=nxt, use_cache=True, **{name: past})
            past, nxt = getattr(out, name), out.logits[:, -1:].argmax(-1)
    return n_tokens / (t.ms / 1000)


def prefill_ms(model, prompt_len: int = 512, reps: int = 5, warmup: int = 2, seed: int = 0) -> float:
    """Median prefill latency of one model (batch 1, random prompt), after ``warmup`` dropped passes."""
    ids = prompt_ids(model, prompt_len, seed)
    times = [time_prefill(model, ids) for _ in range(warmup + reps)]
    return statistics.median(times[warmup:])


def time_models(models: list, s: BenchSettings, watch: LoadWatch | None = None) -> list[dict]:
    """Prefill ms and decode tokens/s of each model, run in turn round after round; medians over ``reps``.
    ``watch`` samples the machine's load before, after and between the rounds."""
    prompts = [prompt_ids(m, s.prompt_len, s.seed) for m in models]
    pre, dec = [[] for _ in models], [[] for _ in models]
    watch = watch or LoadWatch()
    with watch, timing_threads(_device(models[0]), s.clock):
        for r in range(s.warmup + s.reps):
            for i, (m, ids) in enumerate(zip(models, prompts)):
                p, d = time_prefill(m, ids, s.clock), time_decode(m, ids, s.decode_tokens, s.clock)
                if r >= s.warmup:
                    pre[i].append(p)
                    dec[i].append(d)
            if r < s.warmup + s.reps - 1:
                watch.sample()
    return [{"prefill_ms": statistics.median(p), "decode_tokens_per_s": statistics.median(d),
             "prefill_ms_runs": p, "decode_tokens_per_s_runs": d} for p, d in zip(pre, dec)]


# --- FLOPs ------------------------------------------------------------------------------------------------
def _attention_layers(model) -> list[tuple[int, int | None]]:
    """(kept query heads x head_dim, sliding window or None) of every layer that still has attention."""
    adapter = get_adapter(model)
    out = []
    for layer in adapter.layers():
        attn = adapter.block(layer, "attn")
        if attn is not None:  # width = kept query heads x head_dim; the window is the one its forward uses
            out.append((getattr(attn, adapter.q).out_features, getattr(attn, "sliding_window", None) or None))
    return out


def _head_flops(model) -> int:
    head = model.get_output_embeddings()
    return 2 * head.in_features * head.out_features


def _linear_flops_per_token(model, with_head: bool = True) -> int:
    head = model.get_output_embeddings()
    seen, total = set() if with_head else {id(head.weight)}, 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += 2 * m.in_features * m.out_features
    return total


def _visible_keys(pos: int, window: int | None) -> int:
    """Keys seen by the query at position ``pos`` (0-based), causal, within the window."""
    return pos + 1 if window is None else min(pos + 1, window)


def count_flops(per_token: int, head: int, attention: list[tuple[int, int | None]], prompt_len: int) -> tuple[int, int]:
    """(prefill FLOPs of ``prompt_len`` tokens, FLOPs of one decode step at context ``prompt_len``) from the sizes
    (the one count of the PyTorch and llama.cpp benches; see the module docstring): ``per_token``, the layers'
    matmul FLOPs per token; ``head``, the output head's for one position; ``attention``, (query width, sliding
    window or None) of every layer that has attention."""
    prefill, decode = prompt_len * per_token + head, per_token + head
    for width, window in attention:
        prefill += 4 * width * sum(_visible_keys(i, window) for i in range(prompt_len))
        decode += 4 * width * _visible_keys(prompt_len, window)
    return prefill, decode


def model_flops(model, prompt_len: int) -> tuple[int, int]:
    """``count_flops`` of a PyTorch model, from its module shapes as they are."""
    return count_flops(_linear_flops_per_token(model, with_head=False), _head_flops(model), _attention_layers(model),
                       prompt_len)


def prefill_flops(model, prompt_len: int) -> int:
    """Matmul FLOPs of a prefill of ``prompt_len`` tokens (see the module docstring)."""
    return model_flops(model, prompt_len)[0]


def decode_flops(model, context: int) -> int:
    """Matmul FLOPs of one decode step after ``context`` tokens."""
    return model_flops(model, context)[1]


# --- memory -----------------------------------------------------------------------------------------------
def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _workload(model, s: BenchSettings) -> None:
    ids = prompt_ids(model, s.prompt_len, s.seed)
    time_prefill(model, ids)
    time_decode(model, ids, s.decode_tokens)


def peak_memory_cuda(model, s: BenchSettings) -> float:
    """MB: weights + growth of max_memory_allocated over one prefill and the decode steps."""
    dev = _device(model)
    gc.collect()
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    _workload(model, s)
    torch.cuda.synchronize(dev)
    extra = torch.cuda.max_memory_allocated(dev) - before
    return (weight_bytes(model) + extra) / 2**20


def proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _peak_memory_cpu_here(ref: str, s: BenchSettings, dtype=None) -> float:
    """Runs inside the fresh process: load, reset the peak RSS, run the workload, read the peak back."""
    from ..sources import load_model

    model, _ = load_model(ref, device="cpu", dtype=dtype, progress=False)
    _workload(model, s)  # a first run touches every weight page (safetensors may map the file lazily)
    gc.collect()
    try:  # hand memory freed while loading back to the system, so the workload cannot hide in it
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = proc_status_kb("VmRSS")
    _workload(model, s)
    extra = max(0, proc_status_kb("VmHWM") - before) * 1024
    return (weight_bytes(model) + extra) / 2**20


def peak_memory_in_fresh_process(module: str, flag: str, ref: str, s, *extra: str) -> float | None:
    """Runs ``python -m MODULE FLAG REF SETTINGS_JSON [EXTRA...]`` and returns the number it prints last (MB);
    None where /proc is missing (no peak-RSS reset)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    cmd = [sys.executable, "-m", module, flag, ref, json.dumps(asdict(s)), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"peak-memory process failed: {r.stderr.strip()[-500:]}")
    return float(r.stdout.strip().splitlines()[-1])


def peak_memory_cpu(ref: str, s: BenchSettings, dtype=None) -> float | None:
    """MB (see the module docstring), measured in a fresh Python process; None where /proc is missing."""
    return peak_memory_in_fresh_process("secateurs.eval.bench", "--peak-memory-cpu", ref, s, str(dtype or "auto"))


# --- the whole benchmark -----------------------------------------------------------------------------------
def side_by_side(entries: list[dict]) -> dict:
    """The measured model's entry (the last); with two entries, the first (``against``) goes under "against"
    and the measured and ideal (FLOP ratio) speedups are added: above 1 means the measured model is faster."""
    out = entries[-1]
    if len(entries) == 2:
        a = entries[0]
        out["against"] = a
        out["speedup"] = {"prefill": a["prefill_ms"] / out["prefill_ms"],
                          "decode": out["decode_tokens_per_s"] / a["decode_tokens_per_s"]}
        out["ideal_speedup"] = {"prefill": a["prefill_flops"] / out["prefill_flops"],
                                "decode": a["decode_flops_per_token"] / out["decode_flops_per_token"]}
    return out


def bench(ref: str, against: str | None = None, s: BenchSettings | None = None, device: str = "cpu",
          memory: bool = True, progress: bool = False, dtype=None) -> dict:
    """Benchmark ``ref`` (and ``against`` in the same process, alternating); the dictionary of ``--json``."""
    from ..sources import load_model

    s = s or BenchSettings()
    s.validate()
    refs = [against, ref] if against else [ref]  # the reference runs first in every round
    models = [load_model(r, device=device, dtype=dtype, progress=progress)[0] for r in refs]
    dev = _device(models[-1])
    watch = LoadWatch(threads=timed_threads(dev, s.clock))
    timings = time_models(models, s, watch)
    entries = []
    for r, m, t in zip(refs, models, timings):
        if not memory:
            mem = None
        elif _device(m).type == "cuda":
            mem = peak_memory_cuda(m, s)
        else:
            mem = peak_memory_cpu(r, s, dtype)
        entries.append({"model": r, "prefill_ms": t["prefill_ms"], "decode_tokens_per_s": t["decode_tokens_per_s"],
                        "peak_memory_mb": mem, "params": unique_param_count(m),
                        **dict(zip(("prefill_flops", "decode_flops_per_token"), model_flops(m, s.prompt_len))),
                        "runs": {"prefill_ms": t["prefill_ms_runs"], "decode_tokens_per_s": t["decode_tokens_per_s_runs"]}})
    out = side_by_side(entries)
    out["settings"] = {**asdict(s), "batch_size": 1, "device": str(dev), "dtype": str(_dtype(models[-1])),
                       "threads": watch.threads, "order": "alternating, against first" if against else "single",
                       "timer": timer_name(dev, s.clock),
                       "memory": None if not memory else ("cuda max_memory_allocated" if dev.type == "cuda"
                                                          else "weights + peak RSS growth in a fresh process")}
    out["load"] = watch.record()
    return out


if __name__ == "__main__":  # the fresh process of peak_memory_cpu
    if len(sys.argv) == 5 and sys.argv[1] == "--peak-memory-cpu":
        torch.manual_seed(0)
        print(_peak_memory_cpu_here(sys.argv[2], BenchSettings(**json.loads(sys.argv[3])), sys.argv[4]))
    else:
        sys.exit("usage: python -m secateurs.eval.bench --peak-memory-cpu REF SETTINGS_JSON DTYPE")
