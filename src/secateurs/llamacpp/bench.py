"""Speed, memory and FLOPs of a GGUF file in llama.cpp, alone or side by side with another (``bench``); the
same keys as ``secateurs.eval.bench`` gives for PyTorch.

- The model and ``against`` are loaded with the same settings (threads, context, batch) and must have the same
  GGUF type; they run in turn, ``against`` first, ``warmup`` dropped rounds then ``reps`` timed ones (medians).
- Prompt: ``prompt_len`` random token ids (seeded), evaluated as one batch from an empty cache (tokens/s of that
  call). Generation: then ``decode_tokens`` greedy tokens one at a time with the cache (tokens/s, the argmax
  included).
- Timer: wall time (``perf_counter``) on llama.cpp's threads, whatever ``clock`` says (llama.cpp's threads are
  its own); the machine's load is sampled around the rounds (``eval.load``) and recorded under ``load``.
- Peak memory: in a fresh process per model, the growth of the peak resident set size (Linux ``VmHWM``) from
  just before loading to the end of one prompt + generation run: the weights llama.cpp maps from the file and
  touches, the KV cache and the compute buffers.
- FLOPs (the ideal speedup): counted by ``secateurs.eval.bench.count_flops`` from the kept sizes of every layer
  and its sliding window (``model.read_info``): projections and MLP 2 x in x out per token, attention 4 x head_dim
  x query heads per visible key, the output head for the last position of the prompt / every generated token.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..eval.bench import BenchSettings, count_flops, peak_memory_in_fresh_process, proc_status_kb, side_by_side
from ..eval.load import LoadWatch
from .binding import binding, default_threads
from .model import GGUFInfo, last_logits, open_model, read_info


def flops(info: GGUFInfo, prompt_len: int) -> tuple[int, int]:
    """(prefill FLOPs of ``prompt_len`` tokens, FLOPs of one generated token at context ``prompt_len``)."""
    per_token = sum(2 * info.hidden * 2 * (L["heads"] + L["kv_heads"]) * L["head_dim"] + 2 * 3 * info.hidden * L["channels"]
                    for L in info.layers)
    attention = [(L["heads"] * L["head_dim"], L["window"]) for L in info.layers if L["heads"]]
    return count_flops(per_token, 2 * info.hidden * info.n_vocab, attention, prompt_len)


@dataclass
class LlamaBenchSettings(BenchSettings):
    threads: int = 0  # 0 = default_threads()
    flash_attn: bool = False


def _prompt(n_vocab: int, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_vocab, n).tolist()


def _open_for_bench(path: str, s: LlamaBenchSettings):
    return open_model(path, n_ctx=s.prompt_len + s.decode_tokens + 8, threads=s.threads, n_batch=s.prompt_len,
                      flash_attn=s.flash_attn)


def time_round(llm, prompt: list[int], n_gen: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) of one round from an empty cache."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    nxt = int(np.argmax(last_logits(llm)))
    t2 = time.perf_counter()
    for _ in range(n_gen):
        llm.eval([nxt])
        nxt = int(np.argmax(last_logits(llm)))
    t3 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_gen / (t3 - t2)


def _peak_memory_here(path: str, s: LlamaBenchSettings) -> float:
    """Runs inside the fresh process: MB of peak RSS growth from before loading to after one round."""
    binding()
    before = proc_status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    info = read_info(path)
    llm = _open_for_bench(path, s)
    time_round(llm, _prompt(info.n_vocab, s.prompt_len, s.seed), s.decode_tokens)
    return max(0, proc_status_kb("VmHWM") - before) / 1024


def peak_memory(path: str, s: LlamaBenchSettings) -> float | None:
    return peak_memory_in_fresh_process(__name__, "--peak-memory", path, s)


def bench(path: str, against: str | None = None, s: LlamaBenchSettings | None = None, memory: bool = True,
          progress: bool = False, mixed_types: bool = False) -> dict:
    """Speed and memory of a GGUF file in llama.cpp, side by side with ``against`` (see the module docstring).
    Both files must have one tensor type, unless ``mixed_types`` (a pruned file against a dense one quantized
    harder, benchmarks/prune_or_quantize.py: the ideal speedup from FLOPs then ignores the types)."""
    s = s or LlamaBenchSettings()
    s.threads = s.threads or default_threads()
    paths = [against, path] if against else [path]
    infos = [read_info(p) for p in paths]
    if against and infos[0].file_type != infos[1].file_type and not mixed_types:
        raise UserError(f"compare files of the same GGUF type: {path} is {infos[1].type_name}, "
                        f"{against} is {infos[0].type_name} (export both with the same --type)")
    llms = [_open_for_bench(p, s) for p in paths]
    prompts = [_prompt(i.n_vocab, s.prompt_len, s.seed) for i in infos]
    pp, tg = [[] for _ in paths], [[] for _ in paths]
    with LoadWatch(threads=s.threads) as watch:
        for r in range(s.warmup + s.reps):
            for i, (llm, prompt) in enumerate(zip(llms, prompts)):
                a, b = time_round(llm, prompt, s.decode_tokens)
                if r >= s.warmup:
                    pp[i].append(a)
                    tg[i].append(b)
            watch.sample()
    del llms
    entries = []
    for p, info, a, b in zip(paths, infos, pp, tg):
        pf, df = flops(info, s.prompt_len)
        pmed, gmed = statistics.median(a), statistics.median(b)
        entries.append({"model": p, "engine": "llama.cpp", "arch": info.arch, "gguf_type": info.type_name,
                        "file_bytes": info.bytes, "params": info.params,
                        "prompt_tokens_per_s": pmed, "prefill_ms": 1000 * s.prompt_len / pmed,
                        "decode_tokens_per_s": gmed, "peak_memory_mb": peak_memory(p, s) if memory else None,
                        "prefill_flops": pf, "decode_flops_per_token": df,
                        "runs": {"prompt_tokens_per_s": a, "decode_tokens_per_s": b}})
    out = side_by_side(entries)
    out["settings"] = {**asdict(s), "engine": "llama.cpp", "batch_size": 1, "device": "cpu",
                       "order": "alternating, against first" if against else "single", "timer": "perf_counter",
                       "memory": None if not memory else "peak RSS growth (VmHWM) in a fresh process, load + one round"}
    out["load"] = watch.record()
    return out


if __name__ == "__main__":  # the fresh process of peak_memory
    if len(sys.argv) == 4 and sys.argv[1] == "--peak-memory":
        print(_peak_memory_here(sys.argv[2], LlamaBenchSettings(**json.loads(sys.argv[3]))))
    else:
        sys.exit("usage: python -m secateurs.llamacpp.bench --peak-memory FILE SETTINGS_JSON")
