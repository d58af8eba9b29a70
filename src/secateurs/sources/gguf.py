"""Any GGUF file as a model: converted once, streamed, into a safetensors folder in the cache.

The conversion reads one tensor at a time from the file (``os.pread``, nothing mapped), dequantizes it with
the ``gguf`` package (llama.cpp's own, ``gguf.quants.dequantize``) a block of rows at a time into one float32
tensor, applies transformers' per-tensor fix-ups (``TENSOR_PROCESSORS``: llama's q/k rows back from
llama.cpp's rope order, Gemma's norms stored as ``1 + w``), and writes it into the current shard
(``runtime.st_io.StreamWriter``) in the storage dtype. Peak memory is about the largest tensor in float32,
never the model. The weights are bitwise the ones transformers' whole-model loader gives in float32: the
same dequantization and the same fix-ups, and the tensor names come from transformers' own map
(``get_gguf_hf_weights_map`` on a model built on the meta device, which holds no weights).

Configuration, tokenizer and chat template come from the file's metadata through transformers
(``AutoConfig`` / ``AutoTokenizer`` with ``gguf_file``: metadata only). Architectures: the GGUF
``general.architecture`` values ``llama`` (Llama and Mistral files), ``qwen2``, ``qwen3`` and ``gemma3``.

A file's folder is ``cache_dir()/models/gguf-<first 16 hex digits of its sha256>`` (``-bfloat16`` appended
when stored in bfloat16); the hash of a path is remembered by size and modification time
(``cache_dir()/gguf/hashes.json``) so a large file is hashed once. The folder is written as
``.NAME.partial-PID`` and renamed into place when complete: an interrupted conversion leaves nothing that
looks finished, and the next conversion removes the partial folders of processes that are gone.

Storage dtype (``--convert-dtype``, or ``$SECATEURS_CONVERT_DTYPE``): ``auto`` stores float32 (the
dequantized values exactly) when the model's float32 size is under ``FLOAT32_LIMIT``, else bfloat16 (half the
disk, values rounded); ``float32`` or ``bfloat16`` choose.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write_text, cache_dir

ARCHS = ("llama", "qwen2", "qwen3", "gemma3")  # general.architecture; Mistral files say llama
CONVERT_DTYPES = ("auto", "float32", "bfloat16")
ENV = "SECATEURS_CONVERT_DTYPE"
FLOAT32_LIMIT = 8 * 2**30  # float32 size above which auto stores bfloat16
SHARD_BYTES = 2 * 2**30  # a shard holds tensors up to this many bytes (one larger tensor gets a shard alone)
BLOCK_ELEMENTS = 16 * 2**20  # values dequantized (and written) per step within a tensor


def is_gguf(ref) -> bool:
    return str(ref).lower().endswith(".gguf")


def check_convert_dtype(choice: str | None) -> str:
    choice = choice or os.environ.get(ENV) or "auto"
    if choice not in CONVERT_DTYPES:
        raise UserError(f"unknown GGUF storage dtype {choice!r} (--convert-dtype / ${ENV}); accepted: {', '.join(CONVERT_DTYPES)}")
    return choice


def set_convert_dtype(choice: str | None) -> None:
    """What ``--convert-dtype`` sets for this process and the workers it starts (they inherit the environment)."""
    if choice:
        os.environ[ENV] = check_convert_dtype(choice)


def storage_dtype(float32_bytes: int, choice: str | None = None) -> str:
    choice = check_convert_dtype(choice)
    if choice != "auto":
        return choice
    return "float32" if float32_bytes <= FLOAT32_LIMIT else "bfloat16"


def folder_name(stem: str, dtype: str) -> str:
    """The cache folder of a model stored in ``dtype``: float32 keeps the plain name."""
    return stem if dtype == "float32" else f"{stem}-{dtype}"


# --- reading the file ----------------------------------------------------------------------------------------
class GGUFFile:
    """A GGUF file opened and checked: readable, complete, of a supported architecture, with a tokenizer."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        try:
            self.reader = GGUFReader(self.path)
        except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as e:
            why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise UserError(f"{self.path} is not a complete, readable GGUF file (truncated or corrupt: {why})") from e
        f = self.reader.fields
        self.arch = f["general.architecture"].contents() if "general.architecture" in f else None
        if self.arch not in ARCHS:
            raise UserError(f"{self.path}: GGUF architecture {self.arch!r} is not supported; accepted: GGUF files of "
                            f"llama (and Mistral), qwen2, qwen3 and gemma3")
        if "tokenizer.ggml.model" not in f or "tokenizer.ggml.tokens" not in f:
            raise UserError(f"{self.path} has no tokenizer (no tokenizer.ggml.model / tokens metadata); secateurs needs "
                            "the file's own tokenizer: give a GGUF written with its vocabulary")
        size = self.path.stat().st_size
        self.tensors = self.reader.tensors
        for t in self.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size or t.data.nbytes != int(t.n_bytes):
                raise UserError(f"{self.path} is truncated: tensor {t.name} ends at byte {end:,}, the file has {size:,}")

    def float32_bytes(self) -> int:
        return 4 * sum(int(t.n_elements) for t in self.tensors)

    def read_rows(self, t, fd: int, start: int, stop: int):
        """Rows ``start:stop`` of tensor ``t``'s stored data (the layout ``GGUFReader`` gives ``t.data``)."""
        import numpy as np

        data = t.data.reshape(-1, t.data.shape[-1]) if t.data.ndim > 1 else t.data.reshape(1, -1)
        row = data.shape[1] * data.dtype.itemsize
        raw = np.empty((stop - start) * row, dtype=np.uint8)
        view, got, offset = memoryview(raw), 0, int(t.data_offset) + start * row
        while got < len(raw):
            k = os.preadv(fd, [view[got:]], offset + got)
            if k <= 0:
                raise UserError(f"{self.path} is truncated (tensor {t.name})")
            got += k
        return raw.view(data.dtype).reshape(stop - start, data.shape[1])


def dequantized(g: GGUFFile, t, fd: int):
    """Tensor ``t`` as a float32 numpy array in transformers' layout, dequantized a block of rows at a time
    into one array (the rows of a quantized tensor are independent: the values are those of one call)."""
    import numpy as np
    from gguf import dequantize

    shape = tuple(int(s) for s in reversed(t.shape))  # ggml lists the fastest dimension first
    out = np.empty(shape, dtype=np.float32)
    flat = out.reshape(-1, shape[-1]) if len(shape) > 1 else out.reshape(1, -1)
    rows = flat.shape[0]
    step = max(1, BLOCK_ELEMENTS // max(1, flat.shape[1]))
    for a in range(0, rows, step):
        b = min(rows, a + step)
        flat[a:b] = dequantize(g.read_rows(t, fd, a, b), t.tensor_type).reshape(b - a, -1)
    return out


# --- the content hash -----------------------------------------------------------------------------------------
def _hashes_file() -> Path:
    return cache_dir() / "gguf" / "hashes.json"


def content_hash(path: Path, progress: bool = True) -> str:
    """sha256 of the file, remembered by (path, size, mtime) once its folder exists (``remember_hash``)."""
    st = path.stat()
    key = str(path.resolve())
    try:
        known = json.loads(_hashes_file().read_text()).get(key)
    except (OSError, ValueError):
        known = None
    if known and known["size"] == st.st_size and known["mtime_ns"] == st.st_mtime_ns:
        return known["sha256"]
    from ..progress import progress_bar

    h = hashlib.sha256()
    with open(path, "rb") as f, progress_bar(total=st.st_size, desc=f"hashing {path.name}", unit="B", unit_scale=True,
                                             enabled=progress and st.st_size > 2**30) as bar:
        for block in iter(lambda: f.read(8 * 2**20), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def remember_hash(path: Path, sha: str) -> None:
    st = path.stat()
    f = _hashes_file()
    try:
        known = json.loads(f.read_text())
    except (OSError, ValueError):
        known = {}
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    if known.get(str(path.resolve())) == entry:
        return
    known[str(path.resolve())] = entry
    atomic_write_text(f, json.dumps(known, indent=1))


# --- the conversion -------------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(target: Path) -> None:
    for p in target.parent.glob(f".{target.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _plan_shards(entries: list[tuple], itemsize: int) -> list[list[tuple]]:
    shards, size = [[]], 0
    for e in entries:
        n = itemsize * math.prod(e[2])
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def _tensor_plan(g: GGUFFile, config):
    """(transformers' per-tensor processor, [(GGUF tensor, transformers name, shape)]) for the file, the names
    from transformers' own map on a model built on the meta device; a tensor missing or of another shape
    than the metadata describe is a UserError."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(skeleton).__name__]  # as save_pretrained records it (vLLM and llama.cpp's converter read it)
    processor = TENSOR_PROCESSORS.get(g.arch, TensorProcessor)(config=config.to_dict())
    names = get_gguf_hf_weights_map(skeleton, processor)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    entries = [(t, names[t.name], tuple(int(s) for s in reversed(t.shape))) for t in g.tensors if t.name in names]
    wrong = [(hf, shape, shapes[hf]) for _, hf, shape in entries if shapes.get(hf, shape) != shape]
    if wrong:
        raise UserError(f"{g.path}: tensor {wrong[0][0]} has shape {wrong[0][1]} but its metadata describe "
                        f"{wrong[0][2]} ({len(wrong)} such tensors); the file's metadata do not match its tensors")
    wanted = {k for k in shapes if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(wanted - {e[1] for e in entries})
    if missing:
        raise UserError(f"{g.path} lacks {len(missing)} tensor(s) of its {config.model_type} model, e.g. "
                        f"{missing[0]} (GGUF {[k for k, v in names.items() if v == missing[0]][:1]})")
    return processor, entries


def _write_weights(g: GGUFFile, processor, entries, staging: Path, dt, progress: bool) -> None:
    """The weights as safetensors shards (``model.safetensors`` when one), one tensor dequantized at a time and
    written in blocks of rows, with an index when sharded."""
    import torch

    from ..progress import progress_bar
    from ..runtime.st_io import StreamWriter

    itemsize = torch.empty((), dtype=dt).element_size()
    shards = _plan_shards(entries, itemsize)
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = sum(itemsize * math.prod(e[2]) for e in entries)
    fd = os.open(g.path, os.O_RDONLY)
    try:
        with progress_bar(total=total, desc=f"converting {g.path.name}", unit="B", unit_scale=True,
                          enabled=progress) as bar:
            for file, shard in zip(files, shards):
                w = StreamWriter(staging / file, [(hf, dt, shape) for _, hf, shape in shard], {"format": "pt"})
                try:
                    for t, hf, shape in shard:
                        x = torch.from_numpy(processor.process(weights=dequantized(g, t, fd), name=t.name).weights)
                        if tuple(x.shape) != shape:
                            raise UserError(f"{g.path}: tensor {t.name} has shape {tuple(x.shape)}, expected {shape}")
                        rows = x.reshape(-1, shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
                        step = max(1, BLOCK_ELEMENTS // rows.shape[1])
                        for a in range(0, rows.shape[0], step):
                            w.write(hf, rows[a:a + step].to(dt))
                        bar.update(itemsize * x.numel())
                        del x, rows
                    w.close()
                except BaseException:
                    w.abort()
                    raise
    finally:
        os.close(fd)
    if len(files) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {hf: f for f, shard in zip(files, shards) for _, hf, _ in shard}}
        atomic_write_text(staging / "model.safetensors.index.json", json.dumps(index, indent=2))


def convert(g: GGUFFile, target: Path, dtype: str, progress: bool = True) -> Path:
    """Writes the safetensors folder ``target`` (config, generation config, tokenizer, weights in ``dtype``)
    from the checked file ``g``, streamed, and publishes it atomically."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    start = time.time()
    try:
        try:
            config = AutoConfig.from_pretrained(str(g.path.parent), gguf_file=g.path.name)
            tokenizer = AutoTokenizer.from_pretrained(str(g.path.parent), gguf_file=g.path.name)
        except (ValueError, KeyError, OSError, TypeError) as e:
            raise UserError(f"{g.path}: transformers cannot read its configuration or tokenizer: "
                            f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from e
        key_length = g.reader.fields.get(f"{g.arch}.attention.key_length")
        if key_length is not None and getattr(config, "head_dim", None) not in (None, int(key_length.contents())):
            config.head_dim = int(key_length.contents())  # transformers reads no head size for qwen3 (it assumes 128)
        processor, entries = _tensor_plan(g, config)
        dt = getattr(torch, dtype)
        _write_weights(g, processor, entries, staging, dt, progress)
        config.dtype = dt
        config.save_pretrained(staging)
        GenerationConfig.from_model_config(config).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        atomic_write_text(staging / "secateurs-source.json", json.dumps(
            {"gguf": str(g.path), "architecture": g.arch, "storage_dtype": dtype, "tensors": len(entries),
             "float32_bytes": g.float32_bytes(), "seconds": round(time.time() - start, 1)}, indent=1))
        if target.exists():  # another process finished the same conversion first; keep its folder
            shutil.rmtree(staging)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def cached_folder(target_of, choice: str | None = None) -> Path | None:
    """A folder converted before that ``choice`` accepts: the asked dtype's, or under ``auto`` the one the
    rule picks for its recorded float32 size (a folder without the record is an older float32 conversion)."""
    choice = check_convert_dtype(choice)
    for d in ("float32", "bfloat16") if choice == "auto" else (choice,):
        f = target_of(d)
        if not (f / "config.json").exists():
            continue
        src = f / "secateurs-source.json"
        if choice != "auto" or (storage_dtype(json.loads(src.read_text())["float32_bytes"], "auto") == d
                                if src.exists() else d == "float32"):
            return f
    return None


def convert_to(source, target_of, dtype: str | None = None, progress: bool = True, label: str | None = None) -> Path:
    """The folder ``target_of(storage dtype)`` of the GGUF file ``source`` (a path, or a function that gives
    it, called only when a conversion is needed): found in the cache, or converted (the file opened and
    checked, the dtype picked by ``storage_dtype``)."""
    found = cached_folder(target_of, dtype)
    if found is not None:
        return found
    path = Path(source() if callable(source) else source)
    g = GGUFFile(path)
    f32 = g.float32_bytes()
    choice = check_convert_dtype(dtype)
    storage = storage_dtype(f32, choice)
    target = target_of(storage)
    if (target / "config.json").exists():
        return target
    rule = ("as asked" if choice != "auto" else
            f"auto: float32 up to {FLOAT32_LIMIT / 2**30:.0f} GiB in float32, bfloat16 above; --convert-dtype chooses")
    if progress:
        print(f"secateurs: converting {label or path} ({f32 / 1e9:.2f} GB in float32) to {storage} safetensors in "
              f"{target} (once; {rule})", flush=True)
    return convert(g, target, storage, progress)


def gguf_folder(path: str | Path, dtype: str | None = None, progress: bool = True) -> Path:
    """The cached safetensors folder of the GGUF file ``path``, converted on first use."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"GGUF file {str(path)!r} does not exist")
    sha = content_hash(path, progress)
    stem = f"gguf-{sha[:16]}"
    target = convert_to(path, lambda d: cache_dir() / "models" / folder_name(stem, d), dtype, progress)
    remember_hash(path, sha)
    return target
