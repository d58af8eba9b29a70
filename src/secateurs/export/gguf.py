"""GGUF export: a dense or pruned model as one file that llama.cpp runs (llama-server, ollama, LM Studio).

The file is written with the ``gguf`` package (llama.cpp's own writer, on PyPI) in f32, f16 (the default, as
llama.cpp's ``convert_hf_to_gguf.py``) or bf16; the quantized types (q8_0, q6_k, q5_k_m, q4_k_m, q3_k_m,
q2_k) are made from an f32 file by llama.cpp's quantizer (``llama_model_quantize``), never by hand.

The export streams: every tensor is read when it is written, a block of rows at a time
(``gguf_tensors.FileTensor``), so its memory is a block, never the model. A folder (an embedded name, a Hugging Face folder, a pruned secateurs
folder) is not loaded at all: its structure is built on the meta device (for a pruned folder, the dense
skeleton with ``plan.json`` applied, as ``secateurs.load`` builds it) and the tensors are read from its
safetensors files (``runtime.st_io.SafetensorsSource``). A model in memory (``export_gguf``) is read the same
way from its parameters. Either way the file is the same.

Which llama.cpp architecture a model gets (``choose_layout``; the adapter's ``llamacpp`` facts name them):

- **stock** (``llama`` for llama and mistral, ``qwen2``, ``qwen3``, ``gemma3``): every remaining layer keeps
  attention and MLP with the same head, key/value-head and channel counts, and no bias was added (dense,
  whole layers removed, equal widths). For gemma3 the per-layer sliding/global pattern of the remaining
  layers is written as an array, so removing whole layers keeps each layer's own attention type.
- **deci** (llama, mistral, qwen2 otherwise): per-layer ``head_count`` / ``head_count_kv`` /
  ``feed_forward_length`` arrays, optional q/k/v biases, and FLAP's bias compensation as
  ``attn_output.bias`` / ``ffn_down.bias`` (tensor names read from llama.cpp's ``src/models/deci.cpp``).
  Two things of that graph are worked around, exactly:
  - a layer that keeps attention but has ``n_ff == 0`` takes ``continue`` before its output is stored, so
    llama.cpp would silently drop that attention: such a layer gets a minimal FFN, ``n_ff = 1`` with zero
    gate, up and down weights, whose output is exactly zero;
  - llama.cpp reads the head size from layer 0's head count (with 0 heads it sets every head size to 0):
    when the first remaining layer has no attention it gets one query / key-value head whose weights are
    all zero (exactly zero output).
- anything else is refused before anything is written: uneven qwen3 (its per-head q/k norms have no place in
  deci) and uneven gemma3 (llama.cpp's gemma3 graph sizes every layer from layer 0 and has no per-block
  removal).

llama / deci use llama.cpp's "normal" rope (rotating consecutive pairs), so the q and k rows of every head are
permuted from the Hugging Face half-split order, as llama.cpp's convert_hf_to_gguf.py does; qwen2, qwen3 and
gemma3 use the half-split ("neox") rope and keep the order. Norms whose model scales by ``offset + w``
(Gemma: 1 + w) are stored as that sum.

For the quantized types, MLP widths are padded with zero channels to a multiple of 32 (exact: a zero gate/up
row and a zero down column add nothing). llama.cpp quantizes a matrix only when its rows split into 32-wide
blocks (256 for the k-quants); a down projection with, say, 1,000 input channels would otherwise stay f16.

Tokenizer and chat template: see ``secateurs.export.gguf_vocab``.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..models import get_adapter
from ..models.base import adapter_class, supported_model_types
from ..progress import progress_bar
from ..runtime.onload import build_skeleton
from ..runtime.st_io import SafetensorsSource
from .checkpoint import build_pruned_skeleton, layer_structure, read_pruned
from .gguf_tensors import FileTensor, ModuleWeights

TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k")
DEFAULT_TYPE = "f16"  # what llama.cpp's own converter writes by default (convert_hf_to_gguf.py --outtype)
# llama_ftype values (llama.h): LLAMA_FTYPE_MOSTLY_Q8_0, _Q6_K, _Q5_K_M, _Q4_K_M, _Q3_K_M, _Q2_K
QUANTIZED = {"q8_0": 7, "q6_k": 18, "q5_k_m": 17, "q4_k_m": 15, "q3_k_m": 12, "q2_k": 10}
FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32}  # general.file_type of the files written here directly
PAD_TO = 32
ZERO_FFN = 1  # n_ff of the minimal zero FFN of a layer that keeps attention but lost its MLP (0: llama.cpp drops
#               that layer's attention; the tests set 0 to show it)
NORMAL_ROPE = ("llama", "deci")  # archs whose rope rotates consecutive pairs: q/k rows are permuted
FULL_WIDTH_Q = ("qwen2",)  # archs whose llama.cpp graph sizes q and o as hidden x hidden


def check_type(t: str) -> str:
    if t not in TYPES:
        raise UserError(f"unknown GGUF type {t!r}; use one of {', '.join(TYPES)}")
    return t


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def exportable() -> str:
    """Which plans of which model types a GGUF holds (from the adapters' ``llamacpp`` facts)."""
    arch = {t: adapter_class(t).llamacpp.get(t) for t in supported_model_types()}
    any_plan = [t for t, a in arch.items() if a is not None and a.uneven]
    even = [t for t, a in arch.items() if a is not None and not a.uneven]
    return (f"exportable: any plan of {_listed(any_plan)} models (uneven ones as llama.cpp's deci architecture); "
            f"for {_listed(even)}, plans whose remaining layers all keep attention and MLP with equal head and "
            "channel counts and no bias compensation (dense, whole layers removed, equal widths)")


@dataclass
class GgufBlock:
    """One llama.cpp block (``blk.N``): its sizes and tensors, names as in the file without the prefix."""

    n_head: int
    n_head_kv: int
    n_ff: int
    tensors: dict[str, FileTensor] = field(default_factory=dict)
    note: str = ""  # what the export did to this layer beyond copying it
    kept: tuple = (0, 0, 0)  # the plan's (query heads, key/value heads, MLP channels) of this layer


@dataclass
class Layout:
    arch: str
    model_type: str
    head_dim: int
    blocks: list[GgufBlock]
    top: dict[str, FileTensor]  # token_embd, output_norm, (output)
    sliding: list[bool] | None = None  # gemma3: per block, whether it uses the sliding window
    window: int | None = None  # the attention window every layer uses (Mistral), if any

    def summary(self) -> list[dict]:
        return [{"n_head": b.n_head, "n_head_kv": b.n_head_kv, "n_ff": b.n_ff, "kept_heads": b.kept[0],
                 "kept_kv": b.kept[1], "kept_channels": b.kept[2], **({"note": b.note} if b.note else {})}
                for b in self.blocks]


# --- reading the model ------------------------------------------------------------------------------------
def _refuse(model_type: str, why: str) -> UserError:
    return UserError(f"llama.cpp cannot hold this {model_type} plan as GGUF: {why}; {exportable()}")


def _first_uneven(adapter, even_arch: str, layers, structure) -> tuple[int, str] | None:
    """(index, what) of the first remaining layer that a stock architecture (one size for all layers, no
    bias compensation) cannot hold, or None."""
    s0 = structure[0]
    c = adapter.config
    for i, (layer, s) in enumerate(zip(layers, structure)):
        if even_arch in FULL_WIDTH_Q and s["heads"] * adapter.head_dim() != c.hidden_size:
            return i, (f"{s['heads']} query heads (llama.cpp's {even_arch} graph needs heads x head size = "
                       "hidden size)")
        if not (s["attn"] and s["mlp"]):
            return i, "no attention" if not s["attn"] else "no MLP"
        if s["o_bias"] or s["down_bias"] or getattr(getattr(adapter.block(layer, "mlp"), adapter.gate), "bias", None) is not None:
            return i, "output-projection biases (bias compensation)"
        if (s["heads"], s["kv_heads"], s["intermediate"]) != (s0["heads"], s0["kv_heads"], s0["intermediate"]):
            return i, (f"{s['heads']} heads / {s['kv_heads']} KV heads / {s['intermediate']} channels where layer 0 "
                       f"has {s0['heads']} / {s0['kv_heads']} / {s0['intermediate']}")
    return None


def _tied(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.device.type != "meta" and a.data_ptr() == b.data_ptr())


def _add_branch(t: dict, W, norm, norm_name: str, module, projections, shift: float) -> None:
    """A branch's pre-norm, then its projections' weights, then their biases (``projections``: (name in the
    file, attribute of ``module``)), into ``t`` in that order, the order of the file."""
    t[f"{norm_name}.weight"] = W(norm, "weight").plus(shift)
    mods = [(name, getattr(module, attr)) for name, attr in projections]
    for name, mod in mods:
        t[f"{name}.weight"] = W(mod, "weight")
    for name, mod in mods:
        if (b := W(mod, "bias")) is not None:
            t[f"{name}.bias"] = b


def choose_layout(model, quantized: bool = False, weights: ModuleWeights | None = None) -> Layout:
    """The llama.cpp architecture and every block's tensors for ``model`` (see the module docstring), read
    through ``weights`` (default: from the model's parameters in memory). Raises UserError, before anything
    is written, for a plan llama.cpp cannot represent."""
    adapter = get_adapter(model)
    W = weights or ModuleWeights(model)
    c = model.config
    mt = c.model_type
    facts = adapter.llamacpp_arch()
    if facts is None:
        raise UserError(f"no GGUF export for model_type={mt!r}; {exportable()}")
    hd = adapter.head_dim()
    structure = layer_structure(model)
    layers = adapter.layers()
    odd = _first_uneven(adapter, facts.even, layers, structure)
    if odd is None:
        arch = facts.even
    elif facts.uneven:
        arch = facts.uneven
    else:
        raise _refuse(mt, f"remaining layer {odd[0]} has {odd[1]} ({facts.why_not})")
    scale = adapter.query_scale_dim()
    if scale != hd:
        raise UserError(f"{mt} with attention scale 1/sqrt({scale}) where head_dim={hd}: llama.cpp's {arch} graph "
                        "scales attention by 1/sqrt(head_dim); not exportable")

    shift = adapter.norm_offset
    permute = arch in NORMAL_ROPE
    A, M = adapter.attn_branch, adapter.mlp_branch
    hidden = c.hidden_size
    blocks = []
    for layer, s in zip(layers, structure):
        t = {}
        n_head = n_kv = n_ff = 0
        note = []
        if s["attn"]:
            attn = adapter.block(layer, "attn")
            n_head, n_kv = s["heads"], s["kv_heads"]
            _add_branch(t, W, getattr(layer, A.pre_norm), "attn_norm", attn, (("attn_q", adapter.q), ("attn_k", adapter.k),
                        ("attn_v", adapter.v), ("attn_output", adapter.o)), shift)
            if permute:
                for name, n in (("attn_q", n_head), ("attn_k", n_kv)):
                    for suffix in (".weight", ".bias"):
                        if name + suffix in t:
                            t[name + suffix] = t[name + suffix].rope_permuted(n)
            for hf, gg in ((adapter.q_norm, "attn_q_norm"), (adapter.k_norm, "attn_k_norm")):
                if getattr(attn, hf, None) is not None:
                    t[f"{gg}.weight"] = W(getattr(attn, hf), "weight").plus(shift)
            if A.post_norm:
                t["post_attention_norm.weight"] = W(getattr(layer, A.post_norm), "weight").plus(shift)
        elif not blocks:  # first block without attention: one all-zero head (see the module docstring)
            n_head = n_kv = 1
            t["attn_norm.weight"] = FileTensor.ones(hidden)
            for name, shape in (("attn_q", (hd, hidden)), ("attn_k", (hd, hidden)), ("attn_v", (hd, hidden)),
                                ("attn_output", (hidden, hd))):
                t[f"{name}.weight"] = FileTensor.zeros(*shape)
            note.append("attention removed; first block: one all-zero head so that llama.cpp reads the head size")
        else:
            note.append("attention removed (n_head 0)")
        if s["mlp"]:
            mlp = adapter.block(layer, "mlp")
            n_ff = s["intermediate"]
            _add_branch(t, W, getattr(layer, M.pre_norm), "ffn_norm", mlp, (("ffn_gate", adapter.gate),
                        ("ffn_up", adapter.up), ("ffn_down", adapter.down)), shift)
            if M.post_norm:
                t["post_ffw_norm.weight"] = W(getattr(layer, M.post_norm), "weight").plus(shift)
            if quantized and n_ff % PAD_TO:
                pad = PAD_TO - n_ff % PAD_TO
                for name in ("ffn_gate.weight", "ffn_gate.bias", "ffn_up.weight", "ffn_up.bias"):
                    if name in t:
                        t[name] = t[name].padded_rows(pad)
                t["ffn_down.weight"] = t["ffn_down.weight"].padded_cols(pad)
                note.append(f"MLP padded from {n_ff} to {n_ff + pad} channels with zero channels (quantization blocks)")
                n_ff += pad
        elif ZERO_FFN:  # deci drops a layer's attention when n_ff == 0: a minimal FFN with exactly zero output
            n_ff = ZERO_FFN
            t["ffn_norm.weight"] = FileTensor.ones(hidden)
            t["ffn_gate.weight"], t["ffn_up.weight"] = FileTensor.zeros(n_ff, hidden), FileTensor.zeros(n_ff, hidden)
            t["ffn_down.weight"] = FileTensor.zeros(hidden, n_ff)
            note.append("MLP removed; minimal zero FFN (n_ff 1) because llama.cpp's deci graph drops the attention "
                        "of a layer with n_ff 0")
        kept = (s["heads"], s["kv_heads"], s["intermediate"])
        blocks.append(GgufBlock(n_head, n_kv, n_ff, t, "; ".join(note), kept))

    emb = model.get_input_embeddings()
    top = {"token_embd.weight": W(emb, "weight"), "output_norm.weight": W(adapter.final_norm(), "weight").plus(shift)}
    head = model.get_output_embeddings()
    if head is not None and not _tied(head.weight, emb.weight):
        top["output.weight"] = W(head, "weight")
    sliding = None
    if arch == "gemma3":
        types = list(getattr(c, "layer_types", None) or [])
        sliding = [lt == "sliding_attention" for lt in types] if len(types) == len(blocks) else None
    return Layout(arch, mt, hd, blocks, top, sliding, adapter.uniform_window())


# --- writing ----------------------------------------------------------------------------------------------
def _rope(c) -> dict:
    """The rope parameters of the full-attention layers (transformers 5: ``rope_parameters``)."""
    rp = getattr(c, "rope_parameters", None) or {}
    rp = rp.get("full_attention", rp) if isinstance(rp, dict) else {}
    if not rp and getattr(c, "rope_theta", None) is not None:
        rp = {"rope_theta": c.rope_theta, "rope_type": "default"}
    return rp


def _llama3_rope_factors(rp: dict, head_dim: int) -> torch.Tensor:
    """llama3 rope scaling as llama.cpp wants it: a rope_freqs tensor (as convert_hf_to_gguf computes it)."""
    base = rp.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, lo, hi = rp.get("factor", 8.0), rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    lo_wave, hi_wave = old / lo, old / hi
    out = []
    for f in freqs.tolist():
        wave = 2 * math.pi / f
        if wave < hi_wave:
            out.append(1.0)
        elif wave > lo_wave:
            out.append(factor)
        else:
            smooth = (old / wave - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def write_hparams(w, layout: Layout, c) -> dict:
    """Architecture keys; returns extra top-level tensors (rope_freqs for llama3 rope)."""
    import gguf

    extra = {}
    blocks = layout.blocks
    per_layer = layout.arch == "deci"
    ctx = c.max_position_embeddings
    if layout.window and layout.window < ctx:
        ctx = layout.window  # llama.cpp's llama graph has no sliding window: within it the attention is exact
    w.add_context_length(ctx)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(len(blocks))
    w.add_feed_forward_length([b.n_ff for b in blocks] if per_layer else blocks[0].n_ff)
    w.add_head_count([b.n_head for b in blocks] if per_layer else blocks[0].n_head)
    w.add_head_count_kv([b.n_head_kv for b in blocks] if per_layer else blocks[0].n_head_kv)
    w.add_key_length(layout.head_dim)
    w.add_value_length(layout.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(layout.top["token_embd.weight"].shape[0])
    rp = _rope(c)
    w.add_rope_freq_base(float(rp.get("rope_theta", 10000.0)))
    if layout.arch != "gemma3":
        w.add_rope_dimension_count(layout.head_dim)
    rtype = rp.get("rope_type", "default")
    if rtype == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    elif rtype == "llama3" and layout.arch in NORMAL_ROPE:
        extra["rope_freqs.weight"] = FileTensor.const(_llama3_rope_factors(rp, layout.head_dim))
    elif rtype != "default":
        raise UserError(f"rope type {rtype!r} of this model is not supported by the GGUF export (default, linear, "
                        "and llama3 for llama-family models are)")
    if layout.arch == "gemma3":
        if getattr(c, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(float(c.final_logit_softcapping))
        window = getattr(c, "sliding_window", None)
        if window:
            w.add_sliding_window(int(window))
            if layout.sliding is not None:
                w.add_sliding_window_pattern(layout.sliding)
            swa = (getattr(c, "rope_parameters", None) or {}).get("sliding_attention", {})
            w.add_rope_freq_base_swa(float(swa.get("rope_theta", getattr(c, "rope_local_base_freq", 10000.0))))
    return extra


def _stored(t: FileTensor, ftype: str):
    """(numpy dtype, raw GGML type or None, bytes per element) of ``t`` in a file of type ``ftype``: 1-D
    tensors (norms, biases, rope factors) stay f32, as llama.cpp's converter keeps them."""
    import gguf

    if ftype == "f32" or len(t.shape) == 1:
        return np.dtype(np.float32), None, 4
    if ftype == "f16":
        return np.dtype(np.float16), None, 2
    return np.dtype(np.uint8), gguf.GGMLQuantizationType.BF16, 2


def _convert(block: torch.Tensor, dtype, raw) -> np.ndarray:
    import gguf

    a = block.contiguous().numpy().astype(np.float32, copy=False)
    return gguf.quants.quantize(a, raw) if raw is not None else a.astype(dtype, copy=False)


class _Streamed:
    """What ``GGUFWriter.write_tensor_data`` writes: ``nbytes`` and ``tofile`` (the interface of gguf's own lazy
    tensors), here one block of rows at a time, so a tensor is never whole in memory."""

    def __init__(self, name: str, t: FileTensor, dtype, raw, nbytes: int, bar):
        self.name, self.t, self.dtype, self.raw, self.nbytes, self.bar = name, t, dtype, raw, nbytes, bar

    def tofile(self, f) -> None:
        done = 0
        for block in self.t.blocks():
            a = _convert(block, self.dtype, self.raw)
            a.tofile(f)
            done += a.nbytes
            self.bar.update(a.nbytes)
        if done != self.nbytes:
            raise RuntimeError(f"GGUF export: {self.name} gave {done} bytes, {self.nbytes} declared")


def write_file(layout: Layout, config, vocab, path: Path, ftype: str, meta: dict, tensors: bool = True,
               progress: bool = False) -> int:
    """Writes the GGUF at ``path`` (f32/f16/bf16), the tensors streamed; returns the number of tensors
    (``tensors=False``: metadata only, which llama.cpp loads with ``vocab_only`` to check the tokenizer)."""
    import gguf

    w = gguf.GGUFWriter(str(path), layout.arch)
    try:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(meta.get("name", "secateurs export"))
        w.add_file_type(FILE_TYPE[ftype])
        extra = write_hparams(w, layout, config)
        vocab.write(w)
        for k, v in meta.items():
            if k != "name":
                w.add_string(f"secateurs.{k}", v if isinstance(v, str) else json.dumps(v))
        items = list(layout.top.items()) + list(extra.items())
        items += [(f"blk.{i}.{name}", t) for i, b in enumerate(layout.blocks) for name, t in b.tensors.items()]
        items = items if tensors else []
        streams = []
        for name, t in items:
            dtype, raw, size = _stored(t, ftype)
            nbytes = math.prod(t.shape) * size
            # a raw (bf16) tensor is declared by its bytes per row, as the gguf package expects of uint8 data
            w.add_tensor_info(name, t.shape if raw is None else (*t.shape[:-1], t.shape[-1] * size), dtype, nbytes,
                              raw_dtype=raw)
            streams.append((name, t, dtype, raw, nbytes))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        if not streams:
            w.write_tensors_to_file()  # the tensor table (empty) and its padding
            return 0
        w.write_ti_data_to_file()
        with progress_bar(desc=f"GGUF {ftype}", total=sum(s[-1] for s in streams), unit="B", unit_scale=True,
                          enabled=progress) as bar:
            for name, t, dtype, raw, nbytes in streams:
                w.write_tensor_data(_Streamed(name, t, dtype, raw, nbytes, bar))
        return len(streams)
    finally:
        w.close()


def quantize(src: Path, dst: Path, ftype: str, threads: int | None = None) -> None:
    """llama.cpp's own quantizer (llama_model_quantize), from an f32 GGUF (it reads one tensor at a time)."""
    from ..llamacpp import binding as llamacpp

    lc = llamacpp.binding()
    params = lc.llama_model_quantize_default_params()
    params.ftype = QUANTIZED[ftype]
    params.nthread = threads or llamacpp.default_threads()
    with llamacpp.quiet():
        rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.exists():
        raise RuntimeError(f"llama.cpp's quantizer failed ({ftype}, return code {rc})")


def export_gguf(model, tokenizer, out: str | Path, ftype: str = DEFAULT_TYPE, meta: dict | None = None,
                threads: int | None = None, weights: ModuleWeights | None = None, progress: bool = False) -> dict:
    """Writes ``model`` (dense or pruned, in memory; or a skeleton whose ``weights`` come from its files) to
    ``out`` as GGUF of type ``ftype``; returns a summary. Everything is written next to ``out`` under temporary
    names and renamed into place at the end, so an error or an interruption leaves nothing behind (and an
    earlier ``out`` unchanged)."""
    from .gguf_vocab import vocab_for

    check_type(ftype)
    out = Path(out)
    layout = choose_layout(model, ftype in QUANTIZED, weights)  # may refuse: nothing written yet
    vocab = vocab_for(tokenizer, layout.top["token_embd.weight"].shape[0])
    meta = dict(meta or {})
    meta.setdefault("model_type", layout.model_type)
    plan = getattr(model, "secateurs_plan", None)
    if plan is not None:
        meta.setdefault("plan", plan.to_dict() | {"meta": {}})
    meta["layers"] = layout.summary()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp_f32 = out.with_name(out.name + ".f32.partial")
    try:
        if ftype in QUANTIZED:
            n = write_file(layout, model.config, vocab, tmp_f32, "f32", meta, progress=progress)
            if progress:
                print(f"secateurs: quantizing to {ftype} with llama.cpp's quantizer", flush=True)
            quantize(tmp_f32, tmp, ftype, threads)
        else:
            n = write_file(layout, model.config, vocab, tmp, ftype, meta, progress=progress)
        os.replace(tmp, out)
    finally:
        for p in (tmp, tmp_f32):
            p.unlink(missing_ok=True)
    return {"file": str(out), "type": ftype, "arch": layout.arch, "model_type": layout.model_type,
            "tensors": n, "bytes": out.stat().st_size, "layers": layout.summary(), "tokenizer": vocab.describe()}


def open_folder(model_ref: str, progress: bool = True):
    """(skeleton, tokenizer, weights) of a model whose safetensors are read in place: an embedded name, a local
    model folder or a pruned secateurs folder. The skeleton has its parameters on the meta device at their
    final shapes (a pruned folder: the dense skeleton with ``plan.json`` applied, as ``secateurs.load`` builds
    it). None for anything else (a hub id, a folder without safetensors), which is loaded instead."""
    from transformers import AutoConfig, AutoTokenizer

    from ..sources import resolve

    folder = Path(resolve(model_ref, progress=progress))
    if not (folder.is_dir() and any((folder / f).exists() for f in ("model.safetensors", "model.safetensors.index.json"))):
        return None
    if (folder / "plan.json").exists() and (folder / "secateurs.json").exists():
        meta, _, plan = read_pruned(folder)
        model = build_pruned_skeleton(meta["dense_config"], plan)
        # the stock config is passed so that the tokenizer does not read config.json's auto_map
        tok = AutoTokenizer.from_pretrained(folder, config=model.config) if (folder / "tokenizer_config.json").exists() else None
    else:
        try:
            config = AutoConfig.from_pretrained(folder)
            tok = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise UserError(f"could not read model folder {model_ref!r}: {str(e).splitlines()[0]}") from e
        model = build_skeleton(config, torch.float32, "cpu")
    return model, tok, ModuleWeights(model, SafetensorsSource(folder))


@contextmanager
def exported(model_ref: str, progress: bool = True, model=None, tokenizer=None, folder: str | Path | None = None):
    """(model, tokenizer, weights) that an export reads: ``model`` when given (in memory; weights None), else
    ``folder`` (or ``model_ref``) streamed from its files (``open_folder``), else ``model_ref`` loaded (a hub
    id). The files are closed at the end."""
    from ..sources import load_model

    weights = None
    if model is None:
        opened = open_folder(str(folder or model_ref), progress)
        if opened is not None:
            model, tokenizer, weights = opened
        else:
            model, tokenizer = load_model(model_ref, device="cpu", progress=progress)
    try:
        yield model, tokenizer, weights
    finally:
        if weights is not None:
            weights.close()


# --- the command -------------------------------------------------------------------------------------------
def check_request(fmt: str, ftype: str, out: str, overwrite: bool) -> None:
    """Everything about the command line that can be wrong, checked before the model is loaded."""
    if fmt != "gguf":
        raise UserError(f"unknown export format {fmt!r}; use gguf")
    check_type(ftype)
    if ftype in QUANTIZED:
        from ..llamacpp.binding import binding

        binding()  # quantizing needs llama.cpp: say so before the work
    p = Path(out)
    if p.suffix.lower() != ".gguf":
        raise UserError(f"--out must name a .gguf file (got {out})")
    if p.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name ending in .gguf")
    if p.exists() and not overwrite:
        raise UserError(f"{out} exists; choose another --out or pass --overwrite")


def export_model(model_ref: str, out: str, ftype: str = DEFAULT_TYPE, threads=None, progress: bool = True,
                 model=None, tokenizer=None, folder: str | Path | None = None) -> dict:
    """Writes the GGUF of ``model_ref`` (or of ``model``, in memory, when given; or of ``folder``, a folder
    written from ``model_ref``, such as a prune's work folder); returns the summary. A folder is streamed from
    its files (``open_folder``); a hub id is loaded first."""
    from .._version import __version__

    with exported(model_ref, progress, model, tokenizer, folder) as (model, tokenizer, weights):
        plan = getattr(model, "secateurs_plan", None)
        name = f"{model_ref} (secateurs" + (f", {plan.method}" if plan is not None and plan.method else "") + ")"
        return export_gguf(model, tokenizer, out, ftype, meta={"name": name, "source": model_ref,
                                                              "version": __version__},
                           threads=threads, weights=weights, progress=progress)
