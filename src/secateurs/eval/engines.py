"""Which engine runs a model for ``secateurs eval`` and ``secateurs bench``, chosen once from the input, or
by ``--engine``.

- ``llama.cpp``: a ``.gguf`` file (secateurs.llamacpp);
- ``torch``: anything else (an embedded name, a Hugging Face id or folder, a pruned secateurs folder), and a
  ``.gguf`` file with ``--engine pytorch`` (its conversion to safetensors, secateurs.sources.gguf), so both
  sides of the same file can be measured.

Both give the commands the same things: an opened model with ``rows(set, seqlen, n)`` and
``perplexity(rows, ...)``, and ``bench(ref, against, ...)`` returning the same keys (prefill, decode, memory,
FLOPs, speedups). A new engine is one ``register_engine`` call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..defaults import ENGINE_CHOICES
from ..errors import UserError
from ..sources.gguf import is_gguf as _is_gguf

CHOICES = ENGINE_CHOICES  # --engine values: engine names


@dataclass(frozen=True)
class Engine:
    name: str
    accepts: Callable[[str], bool]
    open: Callable  # (ref, seqlen, device, threads, progress, dtype, max_memory, ...) -> handle with rows / perplexity / settings
    bench: Callable  # (ref, against, settings: dict, device, threads, memory, progress, flash_attn, dtype) -> dict


_ENGINES: list[Engine] = []


def register_engine(engine: Engine) -> Engine:
    _ENGINES.append(engine)
    return engine


def engine_for(ref: str, choice: str | None = None) -> Engine:
    """The engine ``choice`` names (``--engine``: pytorch or llamacpp; it must accept ``ref``), else the first
    registered engine that accepts ``ref`` (torch accepts everything, so it comes last)."""
    if choice is None:
        return next(e for e in _ENGINES if e.accepts(ref))
    if choice not in CHOICES:
        raise UserError(f"unknown engine {choice!r}; accepted: {', '.join(CHOICES)}")
    e = next(e for e in _ENGINES if e.name == CHOICES[choice])
    if not e.accepts(ref):
        raise UserError(f"{ref} cannot run in {e.name}: llama.cpp runs .gguf files (export a model with "
                        "`secateurs export`); PyTorch runs every model, .gguf files included")
    return e


def same_engine(ref: str, against: str | None, choice: str | None = None) -> Engine:
    e = engine_for(ref, choice)
    if against is not None and engine_for(against, choice) is not e:
        raise UserError(f"{ref} runs in {e.name} and {against} in {engine_for(against).name}: compare two models of the "
                        f"same kind (two .gguf files for llama.cpp, two models or folders for PyTorch; --engine pytorch "
                        f"runs .gguf files in PyTorch)")
    return e


# --- llama.cpp ------------------------------------------------------------------------------------------------
def _llamacpp_placement(device, dtype="auto", max_memory=None) -> None:
    if device not in (None, "cpu"):
        raise UserError(f"GGUF files run in llama.cpp on the CPU here (got --device {device})")
    if dtype not in (None, "auto"):
        raise UserError(f"a GGUF file runs in the types it was written in (got --dtype {dtype}; accepted: auto); "
                        "choose them at export (--export-type)")
    if max_memory is not None:
        raise UserError("--max-memory applies to PyTorch models (layer by layer); llama.cpp memory-maps a GGUF file itself")


def _open_llamacpp(ref, seqlen, device=None, threads=None, progress=True, dtype="auto", max_memory=None,
                   spill_dir=None, workload=None):
    from ..llamacpp.perplexity import Handle

    _llamacpp_placement(device, dtype, max_memory)
    return Handle(ref, seqlen, threads)


def _bench_llamacpp(ref, against, s: dict, device=None, threads=None, memory=True, progress=False, flash_attn=False,
                    dtype="auto"):
    from ..llamacpp.bench import LlamaBenchSettings, bench

    _llamacpp_placement(device, dtype)
    settings = LlamaBenchSettings(**s, threads=threads or 0, flash_attn=flash_attn)
    return bench(ref, against, settings, memory=memory, progress=progress)


register_engine(Engine("llama.cpp", _is_gguf, _open_llamacpp, _bench_llamacpp))


# --- PyTorch (transformers) ---------------------------------------------------------------------------------------
class TorchHandle:
    engine = "torch"
    supports_tasks = True

    def __init__(self, ref, device="cpu", progress=True, dtype="auto", max_memory=None, spill_dir=None, workload=None):
        from ..sources import load_model

        self.device = device
        self.model, self.tokenizer = load_model(ref, device=device, dtype=dtype, progress=progress, max_memory=max_memory,
                                                spill_dir=spill_dir, workload=workload)

    def rows(self, name, seqlen, max_rows):
        from ..data import eval_rows

        return eval_rows(self.tokenizer, self.model, name, seqlen, max_rows)

    def perplexity(self, rows, batch_size=4, progress=False, desc="perplexity"):
        from .perplexity import perplexity

        return perplexity(self.model, rows, batch_size=batch_size, progress=progress, desc=desc)

    def settings(self) -> dict:
        from ..runtime import model_dtype

        return {"engine": self.engine, "device": self.device, "dtype": str(model_dtype(self.model)).replace("torch.", ""),
                "placement": getattr(self.model, "secateurs_placement", None)}


def _open_torch(ref, seqlen=None, device="cpu", threads=None, progress=True, dtype="auto", max_memory=None,
                spill_dir=None, workload=None):
    return TorchHandle(ref, device or "cpu", progress, dtype, max_memory, spill_dir, workload)


def _bench_torch(ref, against, s: dict, device="cpu", threads=None, memory=True, progress=False, flash_attn=False,
                 dtype="auto"):
    from .bench import BenchSettings, bench

    if threads or flash_attn:
        raise UserError("--threads and --flash-attn apply to .gguf files (llama.cpp); PyTorch follows OMP_NUM_THREADS")
    return bench(ref, against, BenchSettings(**s), device=device or "cpu", memory=memory, progress=progress, dtype=dtype)


register_engine(Engine("torch", lambda ref: True, _open_torch, _bench_torch))
