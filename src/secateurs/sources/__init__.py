"""Where models come from: loading by name, above the runtime and the export code it uses.

A name is an embedded offline model (``embedded``), a Hugging Face id, a local model folder, a pruned
secateurs folder, or a ``.gguf`` file (``gguf``: converted once into a cached safetensors folder).
``models/`` holds only the architecture adapters."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .embedded import DEFAULT_MODEL, EMBEDDED, embedded_folder, embedded_gguf, embedded_name_of
from .gguf import gguf_folder, is_gguf


def resolve(name_or_path: str, progress: bool = True, convert_dtype: str | None = None) -> str:
    """Turns an embedded name or a ``.gguf`` file into its cached safetensors folder (converted on first use,
    stored in ``convert_dtype``: ``sources.gguf.storage_dtype``); other names pass through unchanged."""
    if name_or_path in EMBEDDED:
        return str(embedded_folder(name_or_path, progress=progress, dtype=convert_dtype))
    if is_gguf(name_or_path) and Path(name_or_path).expanduser().is_file():
        embedded = embedded_name_of(name_or_path)  # an embedded model's own file: its folder
        if embedded is not None:
            return str(embedded_folder(embedded, progress=progress, dtype=convert_dtype))
        return str(gguf_folder(name_or_path, dtype=convert_dtype, progress=progress))
    return name_or_path


def load_model(name_or_path: str, dtype=None, device: str = "cpu", trust_remote_code: bool = False, progress=True,
               max_memory=None, spill_dir=None, workload=None, convert_dtype=None):
    """Returns (model, tokenizer) for an embedded name, a hub id, a local folder, a pruned secateurs folder or
    a ``.gguf`` file (``convert_dtype``: how a GGUF is stored when converted, ``sources.gguf``).

    ``dtype``: ``auto`` (None) or a dtype name (``runtime.precision``); ``max_memory``: the dict of
    ``runtime.placement.parse_max_memory``; ``spill_dir``: where states beyond the budget go; ``workload``:
    (rows per batch, tokens per row) of the calibration passes to come, for the memory check
    (``runtime.loading``)."""
    from transformers import AutoConfig, AutoTokenizer

    from ..export.checkpoint import load_pruned
    from ..runtime.loading import place

    log = print if progress else None
    p = Path(name_or_path)
    if p.is_dir() and (p / "plan.json").exists() and (p / "secateurs.json").exists():
        return load_pruned(p, dtype=dtype, device=device, max_memory=max_memory, spill_dir=spill_dir,
                           workload=workload, log=log)
    if name_or_path not in EMBEDDED and p.exists() and not p.is_dir() and not is_gguf(name_or_path):
        raise UserError(f"model path {name_or_path!r} is a file; give a model folder, a .gguf file, a hub id or one of "
                        f"{sorted(EMBEDDED)}")
    if name_or_path not in EMBEDDED and not p.exists() and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1):
        raise UserError(
            f"unknown model {name_or_path!r}: give one of {sorted(EMBEDDED)}, a local model folder, a .gguf file, or a "
            "Hugging Face id (owner/name)"
        )
    folder = resolve(name_or_path, progress=progress, convert_dtype=convert_dtype)
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = place(folder, config, dtype, device, max_memory, spill_dir, workload, trust_remote_code, log)
    except OSError as e:
        raise UserError(f"could not load model {name_or_path!r}: {str(e).splitlines()[0]}") from e
    return model, tok


def replica_loader(name_or_path: str, **kw):
    """The model alone, loaded as ``load_model`` loads it for the main process, for a worker of the pool (use
    with ``functools.partial``). Under a memory budget the worker spills to a folder of its own, removed with
    its replica."""
    import shutil
    import tempfile
    import weakref

    spill = tempfile.mkdtemp(prefix="secateurs-worker-spill-") if kw.get("max_memory") is not None else None
    model = load_model(name_or_path, progress=False, spill_dir=Path(spill) if spill else None, **kw)[0]
    if spill is not None:
        weakref.finalize(model, shutil.rmtree, spill, True)
    return model


__all__ = ["DEFAULT_MODEL", "EMBEDDED", "embedded_folder", "embedded_gguf", "gguf_folder", "is_gguf", "load_model",
           "replica_loader", "resolve"]
