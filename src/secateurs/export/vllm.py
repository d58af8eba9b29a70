"""vLLM export: a dense or pruned model as a folder that vLLM serves (``vllm serve DIR`` / ``vllm.LLM(DIR)``).

Which model a folder gets (``choose_folder``; the adapter's ``vllm`` facts say which model types can be uneven):

- **stock**: every remaining layer keeps attention and MLP with the same head, key/value-head and channel counts
  and no added bias (dense, whole layers removed, equal widths): the stock architecture's config, as the pruned
  checkpoint writes it (``checkpoint.export_config``). vLLM runs it with its own model of that architecture.
- **DeciLMForCausalLM** (vLLM's ``nemotron_nas`` model) for any other plan of a Llama-family model:
  ``model_type`` ``nemotron-nas`` and one ``block_configs`` entry per remaining layer, ``attention`` {``no_op``,
  ``n_heads_in_group``} and ``ffn`` {``no_op``, ``intermediate_size``} (no ``ffn_mult`` key: with one, even
  None, vLLM derives the width from it). The folder carries ``configuration_secateurs_vllm.py`` (``auto_map``
  AutoConfig), which gives vLLM the blocks as attributes; load it with ``trust_remote_code=True``. The weights
  keep the Llama names, and a removed branch has no tensor at all, its norm included (vLLM refuses a leftover).
- **Biases.** vLLM's bias switches hold for every layer: ``attention_bias`` gives every o_proj a bias (and q/k/v
  ones, unless ``qkv_bias`` is set), ``qkv_bias`` the q/k/v biases (Qwen2's), ``mlp_bias`` gate, up and down
  biases. FLAP's bias compensation is carried exactly: ``attention_bias`` with ``qkv_bias`` as the model has
  them, ``mlp_bias`` with zero gate/up biases, and zero biases in the layers without compensation (a zero bias
  adds nothing: the cost is one addition per output).
- **A first layer without attention** crashes vLLM 0.32's DeciLM (``DeciModel.forward`` starts with
  ``residual = None``, and a no-op attention leaves it None for the fused add-norm of the FFN: "too many values to
  unpack"). Such a layer gets an attention whose weights are all zero, with one key/value head
  (``n_heads_in_group`` = the head count) and a norm of ones: its output is exactly zero. It costs one
  attention's work in that one layer.
- **Refused**, before anything is written, with one line: query-head counts that differ between the layers that
  keep attention (vLLM gives every DeciLM layer ``num_attention_heads`` query heads; the key/value heads may
  differ; the line names ``prune --engine vllm``, and a plan made with it that narrows heads anyway is an
  internal error, not the user's), uneven plans of model types DeciLM cannot hold (the adapters' ``why_not``),
  a Mistral sliding window shorter than the context (DeciLM's layers would attend to everything).

Tensors stream as in the GGUF export: a folder is not loaded (``gguf.open_folder``: the skeleton on the meta
device, every tensor read from its safetensors a block of rows at a time). The folder is written under a
temporary name and renamed at the end.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..files import atomic_write_text
from ..models import get_adapter
from ..models.base import adapter_class, supported_model_types
from ..runtime.st_io import StreamWriter
from .checkpoint import _plain_config, export_config, layer_structure
from .gguf_tensors import FileTensor, ModuleWeights

TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
AUTO = "auto"  # the dtype the model's weights are stored in
CONFIG_FILE = "configuration_secateurs_vllm.py"
CONFIG_TEMPLATE = Path(__file__).with_name(CONFIG_FILE)
DECI = "DeciLMForCausalLM"
DECI_TYPE = "nemotron-nas"
HOLDS = ("vLLM holds, per layer, attention or MLP removed, any MLP width and FLAP's bias compensation, with one "
         "query-head count for every layer that keeps attention (key/value heads may differ)")


def exportable() -> str:
    deci = [t for t in supported_model_types() if (a := adapter_class(t).vllm.get(t)) is not None and a.deci]
    return f"uneven plans are exportable for {', '.join(deci)} models; other types only with stock plans"


@dataclass
class VllmFolder:
    """What the folder holds: its kind (stock-depth, stock-width or deci), config.json and the tensors."""

    kind: str
    config: dict
    tensors: list[tuple[str, FileTensor]]
    layers: list[dict]
    zero_biases: int = 0  # zero bias tensors written because vLLM's bias switches hold for every layer


def _parameters(model):
    """(name, module, attribute) of every parameter, a tied one once (as the model saves them)."""
    seen = set()
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield (f"{mname}.{pname}" if mname else pname), mod, pname


def _uneven_heads(model, model_type: str, why: str) -> Exception:
    """The refusal of query heads that differ between layers: a UserError for a plan made without an engine
    constraint, naming what makes plans vLLM holds; an internal error for one made with ``prune --engine vllm``,
    which promises plans vLLM holds (a bug of the method, not the user's mistake)."""
    from ..methods import head_keeping_methods, keeps_heads

    plan = getattr(model, "secateurs_plan", None)
    if plan is not None and keeps_heads(plan.engine):
        return RuntimeError(f"internal error: this {plan.method or model_type} plan was made with --engine vllm, "
                            f"which keeps every query head, yet {why}; please report it")
    made = f"{plan.method} plan" if plan is not None and plan.method else "plan"
    return UserError(f"vLLM cannot hold this {model_type} plan: {why}; {HOLDS}; this {made} was made without "
                     f"--engine vllm: `secateurs prune --engine vllm` makes plans vLLM holds (methods: "
                     f"{', '.join(head_keeping_methods())}), or export --format gguf for llama.cpp")


def _deci_config(model, adapter, structure) -> tuple[dict, dict]:
    """(config.json of the DeciLM folder, the bias switches) or a UserError for what DeciLM cannot hold."""
    c = model.config
    mt = c.model_type
    facts = adapter.vllm_arch()
    if not facts.deci:
        raise UserError(f"vLLM cannot hold an uneven {mt} plan ({facts.why_not}); only stock plans of {mt} "
                        f"(dense, whole layers removed, equal widths) are exportable; {exportable()}")
    hd = adapter.head_dim()
    if adapter.query_scale_dim() != hd:
        raise UserError(f"{mt} scales attention by 1/sqrt({adapter.query_scale_dim()}) where head_dim={hd}: vLLM's "
                        "DeciLM layers scale by 1/sqrt(head_dim); not exportable as an uneven plan")
    window = adapter.uniform_window()
    if window and window < c.max_position_embeddings:
        raise UserError(f"{mt} with a sliding window of {window} tokens: vLLM's DeciLM layers have no sliding window "
                        "for this config; only stock plans (dense, whole layers removed, equal widths) are exportable")
    attn = [(i, s) for i, s in enumerate(structure) if s["attn"]]
    heads = attn[0][1]["heads"] if attn else c.num_attention_heads
    for i, s in attn:
        if s["heads"] != heads:
            raise _uneven_heads(model, mt, f"remaining layer {i} keeps {s['heads']} query heads where layer "
                                           f"{attn[0][0]} keeps {heads} (vLLM's DeciLM model gives every layer "
                                           "num_attention_heads query heads)")
    layers = adapter.layers()
    q_bias = any(getattr(adapter.block(layers[i], "attn"), adapter.q).bias is not None for i, _ in attn)
    switches = {"attention_bias": any(s["o_bias"] for s in structure),
                "qkv_bias": q_bias,
                "mlp_bias": any(s["down_bias"] or getattr(adapter.block(layer, "mlp"), adapter.gate).bias is not None
                                for layer, s in zip(layers, structure) if s["mlp"])}
    blocks = []
    for s in structure:
        a = {"no_op": not s["attn"], "replace_with_linear": False}
        if s["attn"]:
            a["n_heads_in_group"] = heads // s["kv_heads"]
        f = {"no_op": not s["mlp"], "replace_with_linear": False}
        if s["mlp"]:
            f["intermediate_size"] = s["intermediate"]
        blocks.append({"attention": a, "ffn": f})
    if structure and not structure[0]["attn"]:  # vLLM's first-layer bug (module docstring): a zero attention
        blocks[0]["attention"] = {"no_op": False, "replace_with_linear": False, "n_heads_in_group": heads}
    cfg = _plain_config(c)  # whole: DeciLM's defaults are Llama's, not the model type's
    for key in ("auto_map", "torch_dtype", "model_type", "transformers_version"):
        cfg.pop(key, None)
    cfg.update(architectures=[DECI], model_type=DECI_TYPE,
               auto_map={"AutoConfig": f"{CONFIG_FILE[:-3]}.SecateursDeciConfig"},
               num_attention_heads=heads, num_key_value_heads=max((s["kv_heads"] for _, s in attn), default=1),
               head_dim=hd, block_configs=blocks, secateurs_base_model_type=mt, **switches)
    return cfg, switches


def _zero_biases(model, adapter, structure, switches, names) -> list[tuple[str, FileTensor]]:
    """The biases vLLM's switches give a layer that the pruned model does not have, as zeros."""
    want = {"attn": [(adapter.o, switches["attention_bias"])] +
                    [(p, switches["qkv_bias"]) for p in (adapter.q, adapter.k, adapter.v)],
            "mlp": [(p, switches["mlp_bias"]) for p in (adapter.gate, adapter.up, adapter.down)]}
    out = []
    for layer, s in zip(adapter.layers(), structure):
        for kind in ("attn", "mlp"):
            if not s[kind]:
                continue
            for proj, on in want[kind]:
                lin = getattr(adapter.block(layer, kind), proj)
                if on and lin.bias is None:
                    out.append((f"{names[id(lin)]}.bias", FileTensor.zeros(lin.out_features)))
    return out


def _zero_attention(model, adapter, heads: int, switches: dict) -> list[tuple[str, FileTensor]]:
    """Layer 0's attention, all zero, with one key/value head: its output is exactly zero."""
    hd, hidden = adapter.head_dim(), model.config.hidden_size
    layers = next(n for n, m in model.named_modules() if m is adapter.layers())
    at = f"{layers}.0.{adapter.attn_branch.module}"
    out = [(f"{layers}.0.{adapter.attn_branch.pre_norm}.weight", FileTensor.ones(hidden)),
           (f"{at}.{adapter.q}.weight", FileTensor.zeros(heads * hd, hidden)),
           (f"{at}.{adapter.k}.weight", FileTensor.zeros(hd, hidden)),
           (f"{at}.{adapter.v}.weight", FileTensor.zeros(hd, hidden)),
           (f"{at}.{adapter.o}.weight", FileTensor.zeros(hidden, heads * hd))]
    if switches["qkv_bias"]:
        out += [(f"{at}.{adapter.q}.bias", FileTensor.zeros(heads * hd))]
        out += [(f"{at}.{p}.bias", FileTensor.zeros(hd)) for p in (adapter.k, adapter.v)]
    if switches["attention_bias"]:
        out.append((f"{at}.{adapter.o}.bias", FileTensor.zeros(hidden)))
    return out


def choose_folder(model, weights: ModuleWeights | None = None) -> VllmFolder:
    """The folder's kind, config and tensors for ``model`` (dense or pruned; in memory, or a skeleton whose
    ``weights`` come from its files). Raises UserError, before anything is written, for what vLLM cannot hold."""
    adapter = get_adapter(model)
    W = weights or ModuleWeights(model)
    mt = model.config.model_type
    if adapter.vllm_arch() is None:
        raise UserError(f"no vLLM export for model_type={mt!r}; {exportable()}")
    structure = layer_structure(model)
    tensors = [(name, W(mod, attr)) for name, mod, attr in _parameters(model)]
    kind, cfg = export_config(model)
    zeros = []
    if kind == "custom":
        kind = "deci"
        cfg, switches = _deci_config(model, adapter, structure)
        zeros = _zero_biases(model, adapter, structure, switches, {id(m): n for n, m in model.named_modules()})
        if not structure[0]["attn"]:
            zeros += _zero_attention(model, adapter, cfg["num_attention_heads"], switches)
    else:
        cfg.setdefault("architectures", [type(model).__name__])
    layers = [{k: s[k] for k in ("attn", "heads", "kv_heads", "mlp", "intermediate", "o_bias", "down_bias")}
              for s in structure]
    return VllmFolder(kind, cfg, tensors + zeros, layers, len(zeros))


def _stored_dtype(model, weights: ModuleWeights | None, dtype: str) -> torch.dtype:
    if dtype != AUTO:
        return TYPES[dtype]
    W = weights or ModuleWeights(model)
    emb = model.get_input_embeddings()
    return W.dtype(emb, "weight")


def write_folder(f: VllmFolder, out: Path, dtype: torch.dtype, tokenizer=None, model=None) -> int:
    """Writes ``f`` into ``out`` (a new folder, which the caller renames into place); returns its bytes."""
    out.mkdir(parents=True)
    writer = StreamWriter(out / "model.safetensors", [(n, dtype, t.shape) for n, t in f.tensors], {"format": "pt"})
    try:
        for name, t in f.tensors:
            for block in t.blocks():
                writer.write(name, block.to(dtype))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    cfg = dict(f.config, dtype=str(dtype).removeprefix("torch."))
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True))
    if f.kind == "deci":
        shutil.copyfile(CONFIG_TEMPLATE, out / CONFIG_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
    plan = getattr(model, "secateurs_plan", None)
    if plan is not None:
        plan.save(out / "plan.json")
    return sum(p.stat().st_size for p in out.iterdir())


# --- the command -------------------------------------------------------------------------------------------
def check_request(dtype: str, out: str, overwrite: bool) -> None:
    """What the command line can get wrong, checked before the model is read."""
    if dtype not in (AUTO, *TYPES):
        raise UserError(f"unknown vLLM export type {dtype!r}; use {AUTO} (as stored) or one of {', '.join(TYPES)}")
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {out} is a file; a vLLM export is a folder")
    if p.exists() and not overwrite:
        raise UserError(f"{out} exists; choose another --out or pass --overwrite")


def export_vllm(model, tokenizer, out: str | Path, dtype: str = AUTO, weights: ModuleWeights | None = None) -> dict:
    """Writes ``model`` (in memory, or a skeleton read through ``weights``) as a vLLM folder at ``out``, under a
    temporary name renamed at the end (an error leaves nothing, and an earlier ``out`` as it was)."""
    out = Path(out)
    f = choose_folder(model, weights)  # may refuse: nothing written yet
    dt = _stored_dtype(model, weights, dtype)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        size = write_folder(f, tmp, dt, tokenizer, model)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {"folder": str(out), "kind": f.kind, "architecture": f.config["architectures"][0],
            "dtype": str(dt).removeprefix("torch."), "tensors": len(f.tensors), "zero_biases": f.zero_biases,
            "bytes": size, "layers": f.layers, "trust_remote_code": f.kind == "deci"}


def export_model(model_ref: str, out: str, dtype: str = AUTO, progress: bool = True, model=None, tokenizer=None,
                 folder: str | Path | None = None) -> dict:
    """The vLLM folder of ``model_ref`` (or of ``model`` in memory; or of ``folder``, written from it), streamed
    from its files where it is a folder (``gguf.exported``); a hub id is loaded first."""
    from .gguf import exported

    with exported(model_ref, progress, model, tokenizer, folder) as (model, tokenizer, weights):
        return export_vllm(model, tokenizer, out, dtype, weights)
