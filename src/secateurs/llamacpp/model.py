"""A GGUF file checked and read (``read_info``), opened in llama.cpp (``open_model``), and run: logits of a
sequence, greedy decoding.

``read_info`` gives the kept sizes of every layer: for a file written by secateurs those of the plan
(``secateurs.layers``: the zero padding and minimal zero FFNs of the export are not counted), for another GGUF
those of its tensor shapes; and each layer's sliding window, from the file's ``sliding_window`` and
``sliding_window_pattern`` keys (a file without the pattern key gets none counted: llama.cpp's per-architecture
default pattern is not read here).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..models.base import adapter_class
from .binding import binding, default_threads, quiet

FTYPE_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 10: "q2_k", 12: "q3_k_m", 15: "q4_k_m",
               17: "q5_k_m", 18: "q6_k", 32: "bf16"}


@dataclass
class GGUFInfo:
    path: str
    arch: str
    file_type: int
    type_name: str
    model_type: str | None  # secateurs.model_type (the Hugging Face architecture), None for other files
    add_bos: bool
    n_vocab: int
    params: int
    bytes: int
    layers: list[dict]  # per block: heads, kv_heads, channels (kept sizes), head_dim, window (None: full attention)
    hidden: int
    tied: bool
    chat_template: bool = False  # the file's metadata holds tokenizer.chat_template (a chat model)

    def kv_bytes(self, n_ctx: int) -> int:
        """llama.cpp's default (f16) KV cache for ``n_ctx`` tokens."""
        return n_ctx * sum(2 * L["kv_heads"] * L["head_dim"] * 2 for L in self.layers)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _windows(reader, arch: str, n_layers: int) -> list[int | None]:
    window = int(_field(reader, f"{arch}.attention.sliding_window", 0) or 0)
    pattern = _field(reader, f"{arch}.attention.sliding_window_pattern")
    if not window or not isinstance(pattern, list) or len(pattern) != n_layers:
        return [None] * n_layers
    return [window if sliding else None for sliding in pattern]


def read_info(path: str | Path) -> GGUFInfo:
    """Checks that ``path`` is a complete GGUF file (header, metadata and all tensor data present) and reads
    what eval and bench need. A missing, corrupt or truncated file is a UserError, before llama.cpp sees it."""
    import gguf

    p = Path(path)
    hint = "give a .gguf written by `secateurs export` or llama.cpp"
    if not p.is_file():
        raise UserError(f"GGUF file {path} does not exist; {hint}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF'); {hint}")
    try:
        r = gguf.GGUFReader(str(p))
        size = p.stat().st_size
        end = max((t.data_offset + int(t.n_bytes) for t in r.tensors), default=0)
    except Exception as e:  # noqa: BLE001 - the reader fails with many error types on damaged files
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
        raise UserError(f"{path} is a damaged or truncated GGUF file ({why}); {hint}") from e
    if end > size or not r.tensors:
        raise UserError(f"{path} is a damaged or truncated GGUF file ({size:,} bytes, its tensors need {end:,}); {hint}")
    arch = str(_field(r, "general.architecture", "?"))
    ft = int(_field(r, "general.file_type", -1))
    shapes = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    hidden = shapes["token_embd.weight"][0]
    n_vocab = shapes["token_embd.weight"][1]
    hd = int(_field(r, f"{arch}.attention.key_length", 0) or 0)
    layers_meta = _field(r, "secateurs.layers")
    layers = json.loads(layers_meta) if layers_meta else None
    if layers is None:  # another GGUF: sizes from the tensor shapes
        n_blocks = int(_field(r, f"{arch}.block_count", 0))
        heads = _field(r, f"{arch}.attention.head_count", 0)
        hd = hd or (hidden // (heads if isinstance(heads, int) else max(heads)) if heads else 0)
        layers = []
        for i in range(n_blocks):
            q, k, g = (shapes.get(f"blk.{i}.{n}.weight") for n in ("attn_q", "attn_k", "ffn_gate"))
            layers.append({"heads": q[1] // hd if q else 0, "kv_heads": k[1] // hd if k else 0,
                           "channels": g[1] if g else 0})
    else:
        layers = [{"heads": L.get("kept_heads", L["n_head"]), "kv_heads": L.get("kept_kv", L["n_head_kv"]),
                   "channels": L.get("kept_channels", L["n_ff"])} for L in layers]
    for L, window in zip(layers, _windows(r, arch, len(layers))):
        L["head_dim"] = hd
        L["window"] = window
    return GGUFInfo(
        path=str(p), arch=arch, file_type=ft, type_name=FTYPE_NAMES.get(ft, f"file_type {ft}"),
        model_type=(str(_field(r, "secateurs.model_type")) if _field(r, "secateurs.model_type") else None),
        add_bos=bool(_field(r, "tokenizer.ggml.add_bos_token", False)), n_vocab=n_vocab,
        params=sum(int(np.prod(s)) for s in shapes.values()), bytes=p.stat().st_size, layers=layers,
        hidden=hidden, tied="output.weight" not in shapes, chat_template=bool(_field(r, "tokenizer.chat_template")))


def needs_bos(info: GGUFInfo) -> bool:
    """Whether every row starts with BOS: the original architecture's rule for a file written by secateurs
    (``secateurs.model_type``), the file's ``add_bos_token`` for another GGUF."""
    if info.model_type:
        return adapter_class(info.model_type).bos_per_row
    return info.add_bos


def open_model(path: str | Path, n_ctx: int, threads: int | None = None, logits_all: bool = False,
               n_batch: int | None = None, kv_f32: bool = False, flash_attn: bool = False):
    """A ``llama_cpp.Llama`` for a checked GGUF file (llama.cpp's own messages are kept off the terminal).
    The KV cache is llama.cpp's default f16 unless ``kv_f32`` (the tests' exact comparisons). Flash attention
    is off unless asked for (llama-cpp-python's default; without it llama.cpp sizes every layer's V cache for the
    widest layer, attention-free layers included)."""
    lc = binding()
    read_info(path)
    threads = threads or default_threads()
    n_batch = n_batch or min(n_ctx, 512)
    with quiet() as log:
        try:
            kv = {"type_k": lc.GGML_TYPE_F32, "type_v": lc.GGML_TYPE_F32} if kv_f32 else {}
            return lc.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                            n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                            flash_attn=flash_attn, verbose=False, **kv)
        except (ValueError, RuntimeError) as e:
            err = e
    detail = next((ln for ln in reversed(log) if "error" in ln.lower() or "failed" in ln.lower()), str(err))
    raise UserError(f"llama.cpp cannot load {path}: {detail.strip()[:200]}")


def logits(llm, ids) -> np.ndarray:
    """Float32 logits [len(ids), vocab] of one sequence from an empty cache (``llm`` needs logits_all)."""
    llm.reset()
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def last_logits(llm) -> np.ndarray:
    """The logits of the last evaluated position (a view of llama.cpp's buffer)."""
    lc = binding()
    ptr = lc.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def greedy(llm, ids, n: int) -> list[int]:
    """``n`` greedy tokens after ``ids``, one at a time with the KV cache."""
    llm.reset()
    llm.eval(list(map(int, ids)))
    out = []
    for _ in range(n):
        nxt = int(np.argmax(last_logits(llm)))
        out.append(nxt)
        llm.eval([nxt])
    return out
