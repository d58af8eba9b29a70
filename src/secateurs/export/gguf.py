"""GGUF export: a dense or pruned model as one file that llama.cpp runs (llama-server, ollama, LM Studio).

The file is written with the ``gguf`` package (llama.cpp's own writer, on PyPI) in f32, f16 or bf16; q8_0
and q4_k_m are made from the f32 file by llama.cpp's quantizer (``llama_model_quantize``), never by hand.
The tensors are read from the model as it is in memory (after surgery), so a dense model, an embedded name,
a Hugging Face folder and a pruned secateurs folder all export the same way.

Which llama.cpp architecture a model gets (``choose_layout``):

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
gemma3 use the half-split ("neox") rope and keep the order. Gemma's norms store ``1 + w``.

For the quantized types, MLP widths are padded with zero channels to a multiple of 32 (exact: a zero gate/up
row and a zero down column add nothing). llama.cpp quantizes a matrix only when its rows split into 32-wide
blocks (256 for the k-quants); a down projection with, say, 1,000 input channels would otherwise stay f16.

Tokenizer and chat template: see ``secateurs.export.gguf_vocab``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..models import get_adapter
from .checkpoint import layer_structure

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
QUANTIZED = {"q8_0": 7, "q4_k_m": 15}  # llama_ftype values (llama.h): LLAMA_FTYPE_MOSTLY_Q8_0, _Q4_K_M
FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32}  # general.file_type of the files written here directly
PAD_TO = 32
ZERO_FFN = 1  # n_ff of the minimal zero FFN of a layer that keeps attention but lost its MLP (0: llama.cpp drops
#               that layer's attention; the tests set 0 to show it)
STOCK_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
DECI_OK = ("llama", "mistral", "qwen2")  # uneven plans of these become deci
NORMAL_ROPE = ("llama", "deci")  # archs whose rope rotates consecutive pairs: q/k rows are permuted
EXPORTABLE = ("exportable: any plan of llama, mistral and qwen2 models (uneven ones as llama.cpp's deci "
              "architecture); for qwen3 and gemma3, plans whose remaining layers all keep attention and MLP with "
              "equal head and channel counts and no bias compensation (dense, whole layers removed, equal widths)")


def check_type(t: str) -> str:
    if t not in TYPES:
        raise UserError(f"unknown GGUF type {t!r}; use one of {', '.join(TYPES)}")
    return t


@dataclass
class Block:
    """One llama.cpp block: its sizes and tensors (torch layout [out, in], float32), names as in the file
    without the ``blk.N.`` prefix."""

    n_head: int
    n_head_kv: int
    n_ff: int
    tensors: dict = field(default_factory=dict)
    note: str = ""  # what the export did to this layer beyond copying it
    kept: tuple = (0, 0, 0)  # the plan's (query heads, key/value heads, MLP channels) of this layer


@dataclass
class Layout:
    arch: str
    model_type: str
    head_dim: int
    blocks: list[Block]
    top: dict  # token_embd, output_norm, (output)
    sliding: list[bool] | None = None  # gemma3: per block, whether it uses the sliding window

    def summary(self) -> list[dict]:
        return [{"n_head": b.n_head, "n_head_kv": b.n_head_kv, "n_ff": b.n_ff, "kept_heads": b.kept[0],
                 "kept_kv": b.kept[1], "kept_channels": b.kept[2], **({"note": b.note} if b.note else {})}
                for b in self.blocks]


# --- reading the model ------------------------------------------------------------------------------------
def _w(module) -> torch.Tensor:
    return module.weight.detach().float().cpu()


def _b(module) -> torch.Tensor | None:
    return None if getattr(module, "bias", None) is None else module.bias.detach().float().cpu()


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's half-split q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _refuse(model_type: str, why: str) -> UserError:
    return UserError(f"llama.cpp cannot hold this {model_type} plan as GGUF: {why}; {EXPORTABLE}")


def _first_uneven(adapter, layers, structure) -> tuple[int, str] | None:
    """(index, what) of the first remaining layer that a stock architecture (one size for all layers, no
    bias compensation) cannot hold, or None. llama.cpp's qwen2 graph also sizes q and o as hidden x hidden."""
    s0 = structure[0]
    c = adapter.config
    for i, (layer, s) in enumerate(zip(layers, structure)):
        if c.model_type == "qwen2" and s["heads"] * adapter.head_dim() != c.hidden_size:
            return i, f"{s['heads']} query heads (llama.cpp's qwen2 graph needs heads x head size = hidden size)"
        if not (s["attn"] and s["mlp"]):
            return i, "no attention" if not s["attn"] else "no MLP"
        if s["o_bias"] or s["down_bias"] or getattr(getattr(adapter.block(layer, "mlp"), adapter.gate), "bias", None) is not None:
            return i, "output-projection biases (bias compensation)"
        if (s["heads"], s["kv_heads"], s["intermediate"]) != (s0["heads"], s0["kv_heads"], s0["intermediate"]):
            return i, (f"{s['heads']} heads / {s['kv_heads']} KV heads / {s['intermediate']} channels where layer 0 "
                       f"has {s0['heads']} / {s0['kv_heads']} / {s0['intermediate']}")
    return None


def choose_layout(model, quantized: bool = False) -> Layout:
    """The llama.cpp architecture and every block's tensors for ``model`` (see the module docstring).
    Raises UserError, before anything is written, for a plan llama.cpp cannot represent."""
    adapter = get_adapter(model)
    c = model.config
    mt = c.model_type
    if mt not in STOCK_ARCH:
        raise UserError(f"no GGUF export for model_type={mt!r}; {EXPORTABLE}")
    hd = adapter.head_dim()
    structure = layer_structure(model)
    layers = adapter.layers()
    odd = _first_uneven(adapter, layers, structure)
    if odd is None:
        arch = STOCK_ARCH[mt]
    elif mt in DECI_OK:
        arch = "deci"
    else:
        reason = {"gemma3_text": "llama.cpp's gemma3 graph sizes every layer from layer 0 and has no per-block removal",
                  "qwen3": "its per-head q/k norms have no place in llama.cpp's deci architecture"}[mt]
        raise _refuse(mt, f"remaining layer {odd[0]} has {odd[1]} ({reason})")
    if mt == "gemma3_text":
        scalar = getattr(c, "query_pre_attn_scalar", hd)
        if scalar != hd:
            raise UserError(f"gemma3 with query_pre_attn_scalar={scalar} != head_dim={hd}: llama.cpp scales "
                            "attention by 1/sqrt(head_dim) (except for the 27B size); not exportable")

    shift = 1.0 if mt == "gemma3_text" else 0.0  # Gemma's RMSNorm multiplies by (1 + w)
    permute = arch in NORMAL_ROPE
    A, M = adapter.attn_branch, adapter.mlp_branch
    blocks = []
    for idx, (layer, s) in enumerate(zip(layers, structure)):
        t = {}
        n_head = n_kv = n_ff = 0
        note = []
        if s["attn"]:
            attn = adapter.block(layer, "attn")
            n_head, n_kv = s["heads"], s["kv_heads"]
            q, k, v, o = (getattr(attn, n) for n in (adapter.q, adapter.k, adapter.v, adapter.o))
            t["attn_norm.weight"] = _w(getattr(layer, A.pre_norm)) + shift
            t["attn_q.weight"], t["attn_k.weight"], t["attn_v.weight"] = _w(q), _w(k), _w(v)
            t["attn_output.weight"] = _w(o)
            for name, mod in (("attn_q", q), ("attn_k", k), ("attn_v", v), ("attn_output", o)):
                if _b(mod) is not None:
                    t[f"{name}.bias"] = _b(mod)
            if permute:
                for name, n in (("attn_q", n_head), ("attn_k", n_kv)):
                    for suffix in (".weight", ".bias"):
                        if name + suffix in t:
                            t[name + suffix] = permute_rope(t[name + suffix], n)
            for hf, gg in (("q_norm", "attn_q_norm"), ("k_norm", "attn_k_norm")):
                if hasattr(attn, hf):
                    t[f"{gg}.weight"] = _w(getattr(attn, hf)) + shift
            if A.post_norm:
                t["post_attention_norm.weight"] = _w(getattr(layer, A.post_norm)) + shift
        elif not blocks:  # first block without attention: one all-zero head (see the module docstring)
            n_head = n_kv = 1
            hidden = c.hidden_size
            t["attn_norm.weight"] = torch.ones(hidden)
            for name, shape in (("attn_q", (hd, hidden)), ("attn_k", (hd, hidden)), ("attn_v", (hd, hidden)),
                                ("attn_output", (hidden, hd))):
                t[f"{name}.weight"] = torch.zeros(shape)
            note.append("attention removed; first block: one all-zero head so that llama.cpp reads the head size")
        else:
            note.append("attention removed (n_head 0)")
        if s["mlp"]:
            mlp = adapter.block(layer, "mlp")
            gate, up, down = (getattr(mlp, n) for n in (adapter.gate, adapter.up, adapter.down))
            n_ff = s["intermediate"]
            t["ffn_norm.weight"] = _w(getattr(layer, M.pre_norm)) + shift
            t["ffn_gate.weight"], t["ffn_up.weight"], t["ffn_down.weight"] = _w(gate), _w(up), _w(down)
            for name, mod in (("ffn_gate", gate), ("ffn_up", up), ("ffn_down", down)):
                if _b(mod) is not None:
                    t[f"{name}.bias"] = _b(mod)
            if M.post_norm:
                t["post_ffw_norm.weight"] = _w(getattr(layer, M.post_norm)) + shift
            if quantized and n_ff % PAD_TO:
                pad = PAD_TO - n_ff % PAD_TO
                for name in ("ffn_gate", "ffn_up"):
                    t[f"{name}.weight"] = torch.cat([t[f"{name}.weight"], torch.zeros(pad, c.hidden_size)])
                    if f"{name}.bias" in t:
                        t[f"{name}.bias"] = torch.cat([t[f"{name}.bias"], torch.zeros(pad)])
                t["ffn_down.weight"] = torch.cat([t["ffn_down.weight"], torch.zeros(c.hidden_size, pad)], dim=1)
                note.append(f"MLP padded from {n_ff} to {n_ff + pad} channels with zero channels (quantization blocks)")
                n_ff += pad
        elif ZERO_FFN:  # deci drops a layer's attention when n_ff == 0: a minimal FFN with exactly zero output
            n_ff = ZERO_FFN
            hidden = c.hidden_size
            t["ffn_norm.weight"] = torch.ones(hidden)
            t["ffn_gate.weight"], t["ffn_up.weight"] = torch.zeros(n_ff, hidden), torch.zeros(n_ff, hidden)
            t["ffn_down.weight"] = torch.zeros(hidden, n_ff)
            note.append("MLP removed; minimal zero FFN (n_ff 1) because llama.cpp's deci graph drops the attention "
                        "of a layer with n_ff 0")
        kept = (s["heads"], s["kv_heads"], s["intermediate"])
        blocks.append(Block(n_head, n_kv, n_ff, t, "; ".join(note), kept))

    emb = model.get_input_embeddings().weight.detach().float().cpu()
    top = {"token_embd.weight": emb, "output_norm.weight": _w(adapter.decoder().norm) + shift}
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        top["output.weight"] = _w(head)
    sliding = None
    if arch == "gemma3":
        types = list(getattr(c, "layer_types", None) or [])
        sliding = [lt == "sliding_attention" for lt in types] if len(types) == len(blocks) else None
    return Layout(arch, mt, hd, blocks, top, sliding)


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
    import math

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
    window = getattr(c, "sliding_window", None)
    if layout.model_type == "mistral" and window and window < ctx:
        ctx = window  # llama.cpp's llama graph has no sliding window: within it the attention is exact
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
        extra["rope_freqs.weight"] = _llama3_rope_factors(rp, layout.head_dim)
    elif rtype != "default":
        raise UserError(f"rope type {rtype!r} of this model is not supported by the GGUF export (default, linear, "
                        "and llama3 for llama-family models are)")
    if layout.arch == "gemma3":
        if getattr(c, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(float(c.final_logit_softcapping))
        if window:
            w.add_sliding_window(int(window))
            if layout.sliding is not None:
                w.add_sliding_window_pattern(layout.sliding)
            swa = (getattr(c, "rope_parameters", None) or {}).get("sliding_attention", {})
            w.add_rope_freq_base_swa(float(swa.get("rope_theta", getattr(c, "rope_local_base_freq", 10000.0))))
    return extra


def _to_file_dtype(name: str, t: torch.Tensor, ftype: str):
    """(array, raw_dtype) as stored: 1-D tensors (norms, biases, rope factors) stay f32, as llama.cpp's
    converter keeps them."""
    import gguf

    a = t.contiguous().numpy().astype(np.float32, copy=False)
    if ftype == "f32" or a.ndim == 1:
        return a, None
    if ftype == "f16":
        return a.astype(np.float16), None
    return gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def write_file(layout: Layout, config, vocab, path: Path, ftype: str, meta: dict, tensors: bool = True) -> int:
    """Writes the GGUF at ``path`` (f32/f16/bf16); returns the number of tensors (``tensors=False``: metadata
    only, which llama.cpp loads with ``vocab_only`` to check the tokenizer)."""
    import gguf

    w = gguf.GGUFWriter(str(path), layout.arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(meta.get("name", "secateurs export"))
    w.add_file_type(FILE_TYPE[ftype])
    extra = write_hparams(w, layout, config)
    vocab.write(w)
    for k, v in meta.items():
        if k != "name":
            w.add_string(f"secateurs.{k}", v if isinstance(v, str) else json.dumps(v))
    n = 0
    items = list(layout.top.items()) + list(extra.items())
    items += [(f"blk.{i}.{name}", t) for i, b in enumerate(layout.blocks) for name, t in b.tensors.items()]
    for name, t in items if tensors else []:
        a, raw = _to_file_dtype(name, t, ftype)
        if raw is None:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, a, raw_shape=t.shape, raw_dtype=raw)
        n += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return n


def quantize(src: Path, dst: Path, ftype: str, threads: int | None = None) -> None:
    """llama.cpp's own quantizer (llama_model_quantize), from an f32 GGUF."""
    from ..llamacpp import binding as llamacpp

    lc = llamacpp.binding()
    params = lc.llama_model_quantize_default_params()
    params.ftype = QUANTIZED[ftype]
    params.nthread = threads or llamacpp.default_threads()
    with llamacpp.quiet():
        rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.exists():
        raise RuntimeError(f"llama.cpp's quantizer failed ({ftype}, return code {rc})")


def export_gguf(model, tokenizer, out: str | Path, ftype: str = "f32", meta: dict | None = None,
                threads: int | None = None) -> dict:
    """Writes ``model`` (dense or pruned, in memory) to ``out`` as GGUF of type ``ftype``; returns a summary.
    Everything is written next to ``out`` under temporary names and renamed into place at the end, so an
    error or an interruption leaves nothing behind (and an earlier ``out`` unchanged)."""
    from .gguf_vocab import vocab_for

    check_type(ftype)
    out = Path(out)
    layout = choose_layout(model, quantized=ftype in QUANTIZED)  # may refuse: nothing written yet
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
            n = write_file(layout, model.config, vocab, tmp_f32, "f32", meta)
            quantize(tmp_f32, tmp, ftype, threads)
        else:
            n = write_file(layout, model.config, vocab, tmp, ftype, meta)
        os.replace(tmp, out)
    finally:
        for p in (tmp, tmp_f32):
            p.unlink(missing_ok=True)
    return {"file": str(out), "type": ftype, "arch": layout.arch, "model_type": layout.model_type,
            "tensors": n, "bytes": out.stat().st_size, "layers": layout.summary(), "tokenizer": vocab.describe()}


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


def export_model(model_ref: str, out: str, ftype: str = "f32", threads=None, progress: bool = True, model=None,
                 tokenizer=None) -> dict:
    """Loads ``model_ref`` (unless ``model`` is given) and writes the GGUF; returns the summary."""
    from .. import __version__
    from ..sources import load_model

    if model is None:
        model, tokenizer = load_model(model_ref, device="cpu", progress=progress)
    plan = getattr(model, "secateurs_plan", None)
    name = f"{model_ref} (secateurs" + (f", {plan.method}" if plan is not None and plan.method else "") + ")"
    return export_gguf(model, tokenizer, out, ftype, meta={"name": name, "source": model_ref, "version": __version__},
                       threads=threads)
