"""Saving and loading pruned models as Hugging Face folders that load anywhere.

A pruned folder is an ordinary Hugging Face model folder (``config.json``, ``model.safetensors``,
``generation_config.json``, tokenizer files) plus ``plan.json`` (re-appliable to the original model) and
``secateurs.json`` (format tag, the export kind and the dense model's configuration). The export kind is the
simplest that describes the pruned structure:

- ``stock-depth``: only whole layers removed, every other layer untouched: the stock architecture with
  fewer layers (``num_hidden_layers`` and ``layer_types`` reduced). No custom code.
- ``stock-width``: every remaining layer has the same head and channel counts and no added biases: the stock
  architecture with ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` changed and
  ``head_dim`` written explicitly. No custom code.
- ``custom``: anything else (uneven layers, removed attention or MLP blocks, bias compensation): the folder
  carries ``modeling_secateurs.py`` (torch + transformers only) and a config with ``auto_map``, so it loads
  with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` where secateurs is absent.

Before a folder is written, the model its config describes is built on the meta device and its parameter
names and shapes are compared with the pruned model's; a stock config that does not match falls back to
``custom``. ``secateurs.load(folder)`` never runs the folder's code: it rebuilds the dense skeleton, applies
``plan.json`` and loads the tensors (this also reads the older ``secateurs-model/1`` folders).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import types
from pathlib import Path

import torch

from ..errors import UserError
from ..plan import PruningPlan
from ..files import atomic_write_text
from .card import write_card
from ..models import get_adapter
from ..runtime import onloader_of, shared_copy
from ..runtime.head import block_bounds
from ..runtime.st_io import StreamWriter
from ..branches import PartialLayer
from ..surgery import apply_plan, narrow_layer
from ..runtime.onload import build_skeleton
from ..runtime.loading import from_skeleton, working_dtype

FORMAT = "secateurs-model/2"
READABLE_FORMATS = ("secateurs-model/1", FORMAT)
MODELING_FILE = "modeling_secateurs.py"
MODELING_TEMPLATE = Path(__file__).with_name(MODELING_FILE)
BRANCHES_SOURCE = Path(__file__).resolve().parents[1] / "branches.py"
_BRANCHES_IMPORT = re.compile(r"^from secateurs\.branches import .*$", re.M)


def _plain_config(config, diff: bool = False) -> dict:
    """The configuration as a dict (``diff``: only what differs from the class defaults, as config.json)."""
    d = config.to_diff_dict() if diff else config.to_dict()
    d.pop("quantization_config", None)
    return d


# --- describing the pruned structure ---------------------------------------------------------------------
def layer_structure(model) -> list[dict]:
    """Per remaining layer of a pruned model: which branches it has, its head / channel counts, and whether
    its output projections carry a bias. Read from the modules themselves."""
    adapter = get_adapter(model)
    hd = adapter.head_dim()
    out = []
    for layer in adapter.layers():
        attn, mlp = adapter.block(layer, "attn"), adapter.block(layer, "mlp")
        s = {"attn": attn is not None, "mlp": mlp is not None,
             "heads": 0, "kv_heads": 0, "o_bias": False, "intermediate": 0, "down_bias": False}
        if attn is not None:
            s.update(heads=getattr(attn, adapter.q).out_features // hd, kv_heads=getattr(attn, adapter.k).out_features // hd,
                     o_bias=getattr(attn, adapter.o).bias is not None)
        if mlp is not None:
            s.update(intermediate=getattr(mlp, adapter.gate).out_features, down_bias=getattr(mlp, adapter.down).bias is not None)
        out.append(s)
    return out


def stock_config(model, structure: list[dict]) -> tuple[str, dict] | None:
    """(kind, config dict) of the stock architecture when the structure allows it, else None."""
    cfg = _plain_config(model.config, diff=True)  # surgery already reduced num_hidden_layers / layer_types
    if not all(s["attn"] and s["mlp"] for s in structure):
        return None
    sizes = {(s["heads"], s["kv_heads"], s["intermediate"], s["o_bias"], s["down_bias"]) for s in structure}
    if len(sizes) != 1:
        return None
    heads, kv, inter, _, _ = sizes.pop()
    c = model.config
    dense = (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size)
    if (heads, kv, inter) == dense:
        return "stock-depth", cfg

    cfg.update(num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
               head_dim=get_adapter(model).head_dim())
    return "stock-width", cfg


def custom_config(model, structure: list[dict]) -> dict:
    adapter = get_adapter(model)
    base = model.config.model_type
    cfg = _plain_config(model.config, diff=True)
    cfg.update(
        model_type="secateurs_" + base,
        architectures=["SecateursForCausalLM"],
        auto_map={"AutoConfig": "modeling_secateurs.SecateursConfig",
                  "AutoModelForCausalLM": "modeling_secateurs.SecateursForCausalLM"},
        head_dim=adapter.head_dim(),
        secateurs_layers=structure,
        secateurs_branches={k: [b.module, b.pre_norm, b.post_norm] for k, b in
                            (("attn", adapter.attn_branch), ("mlp", adapter.mlp_branch))},
        secateurs_modules={"layers": next(n for n, m in model.named_modules() if m is adapter.layers()),
                           "attn": [adapter.q, adapter.k, adapter.v, adapter.o],
                           "mlp": [adapter.gate, adapter.up, adapter.down]},
    )
    return cfg


def modeling_source(base_model_type: str) -> str:
    """The modeling file for a folder whose base architecture is ``base_model_type``: the template with that
    type written in and the text of ``secateurs/branches.py`` (after its docstring) in place of its import, so
    the file imports only torch and transformers."""
    src, n = re.subn(r'^BASE_MODEL_TYPE = "[^"]*"', f'BASE_MODEL_TYPE = "{base_model_type}"',
                     MODELING_TEMPLATE.read_text(), count=1, flags=re.M)
    branches = BRANCHES_SOURCE.read_text()
    body = branches[len(branches) - len(branches.split('"""', 2)[2]):].lstrip("\n")
    src, m = _BRANCHES_IMPORT.subn(lambda _: body.rstrip("\n"), src, count=1)
    if n != 1 or m != 1:
        raise RuntimeError(f"{MODELING_TEMPLATE} lost its BASE_MODEL_TYPE line or its secateurs.branches import")
    return src


def modeling_module(base_model_type: str) -> types.ModuleType:
    """The modeling file's classes in this process (for checks; loading never needs it)."""
    name = f"_secateurs_modeling_{base_model_type}"
    if name not in sys.modules:  # dataclass processing of the config class looks its module up there
        mod = sys.modules[name] = types.ModuleType(name)
        try:
            exec(compile(modeling_source(base_model_type), str(MODELING_TEMPLATE), "exec"), mod.__dict__)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def _shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def skeleton_from_config(cfg: dict):
    """The model that ``cfg`` (a folder's config.json) describes, on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(cfg)
    model_type = cfg.pop("model_type")
    with torch.device("meta"):
        if model_type.startswith("secateurs_"):
            mod = modeling_module(model_type[len("secateurs_"):])
            return mod.SecateursForCausalLM(mod.SecateursConfig.from_dict(cfg))
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))


def export_config(model) -> tuple[str, dict]:
    """(kind, config.json contents) for a pruned model: stock when possible, custom otherwise; the config is
    checked to describe exactly the model's parameter names and shapes."""
    structure = layer_structure(model)
    want = _shapes(model)
    stock = stock_config(model, structure)
    if stock is not None:
        try:
            if _shapes(skeleton_from_config(stock[1])) == want:
                return stock
        except Exception:  # noqa: BLE001 - the stock config may be refused (transformers validates a new head count
            pass  # with errors of its own kinds, e.g. huggingface_hub's StrictDataclassClassValidationError): go custom
    cfg = custom_config(model, structure)
    got = _shapes(skeleton_from_config(cfg))
    if got != want:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))[:5]
        raise RuntimeError(f"custom export does not reproduce the pruned model's parameters (first differences: {diff})")
    return "custom", cfg


# --- writing -----------------------------------------------------------------------------------------------
def write_pruned(model, tokenizer, plan: PruningPlan, dense_config: dict, folder: str | Path) -> str:
    """Writes the pruned model into ``folder`` (which the caller renames into place when complete) and returns
    the export kind. ``secateurs.json`` is written last, so an interrupted write is not a readable folder.

    ``model`` is the pruned model, or an onloaded *dense* model (``--max-memory``): then the plan is applied
    layer by layer while the file is written (``write_streamed``). The weights are saved in the working dtype,
    which ``config.json`` records."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if onloader_of(model) is not None:
        kind, cfg, skeleton = write_streamed(model, plan, folder)
        if getattr(skeleton, "generation_config", None) is not None:
            skeleton.generation_config.save_pretrained(folder)
    else:
        kind, cfg = export_config(model)
        model.save_pretrained(folder)
    atomic_write_text(folder / "config.json", json.dumps(cfg, indent=2, sort_keys=True))
    if kind == "custom":
        atomic_write_text(folder / MODELING_FILE, modeling_source(model.config.model_type))
    elif (folder / MODELING_FILE).exists():
        (folder / MODELING_FILE).unlink()
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    plan.save(folder / "plan.json")
    atomic_write_text(folder / "secateurs.json",
                      json.dumps({"format": FORMAT, "export": kind, "dense_config": dense_config}, indent=1))
    return kind


def write_streamed(model, plan: PruningPlan, folder: Path):
    """The pruned model of an onloaded dense ``model`` written to ``folder/model.safetensors`` one layer at a
    time: the pruned shapes come from the plan applied on the meta device (``shared_copy``), every kept layer is
    read, sliced by surgery's own ``narrow_layer`` (so the tensors are bitwise those of ``apply_plan`` on a
    resident model) and written, the embedding and head in row blocks. Returns (kind, config, skeleton)."""
    ol = onloader_of(model)
    ol.unpin_all()
    spec = ol.adapter.spec()
    skeleton = apply_plan(shared_copy(model), plan, spec)
    kind, cfg = export_config(skeleton)
    layers = get_adapter(skeleton).layers()
    prefix = next(n for n, m in skeleton.named_modules() if m is layers) + "."
    kept = [i for i, lp in enumerate(plan.layers) if lp.attn or lp.mlp]
    params = list(skeleton.named_parameters())
    writer = StreamWriter(folder / "model.safetensors", [(n, ol.dtype, tuple(p.shape)) for n, p in params], {"format": "pt"})
    current, tensors = None, {}
    try:
        for name, p in params:
            if name.startswith(prefix):
                j, rel = name[len(prefix):].split(".", 1)
                if int(j) != current:
                    current, i = int(j), kept[int(j)]
                    lp = plan.layers[i]
                    with ol.using(i) as dense:
                        layer = shared_copy(dense)
                        narrow_layer(ol.adapter, layer, lp, spec)
                        if not (lp.attn and lp.mlp):
                            kind_kept = "attn" if lp.attn else "mlp"
                            layer = PartialLayer(layer, ol.adapter.branch(kind_kept), kind_kept, current, spec.head_dim)
                        tensors = {n: t.detach().to(ol.dtype) for n, t in layer.named_parameters()}
                writer.write(name, tensors.pop(rel))
            elif p.device.type != "meta":
                writer.write(name, p.detach().to(ol.dtype))
            else:  # the embedding or the head: rows from the file, a block at a time
                key = ol.key_of(name)
                for a, e in block_bounds(p.shape[0]):
                    writer.write(name, ol.source.read(key, a, e).to(ol.dtype))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return kind, cfg, skeleton


def save_pruned(model, tokenizer, plan: PruningPlan, dense_config: dict, out: str | Path,
                extra: dict[str, str] | None = None) -> str:
    """Writes to a temporary sibling folder, then renames it to ``out``: an interrupted save leaves no
    folder that could be mistaken for a good one (and an earlier ``out`` stays as it was). ``extra`` maps
    file names to texts written alongside (e.g. result.json) before the rename, or to functions of the written
    folder returning the text (e.g. measuring the pruned model read back from it)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".saving")
    if tmp.exists():
        shutil.rmtree(tmp)
    kind = write_pruned(model, tokenizer, plan, dense_config, tmp)
    for name, text in (extra or {}).items():
        atomic_write_text(tmp / name, text(tmp) if callable(text) else text)
    write_card(tmp)  # after result.json: the model card reads its figures
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return kind


# --- reading -----------------------------------------------------------------------------------------------
def build_pruned_skeleton(dense_config: dict, plan: PruningPlan, dtype=torch.float32, device="cpu"):
    """The pruned model at its pruned shapes, parameters on the meta device (no memory; weights not loaded yet),
    buffers real on ``device``: the dense structure is described on the meta device and the plan applied to it
    there, so no dense-sized tensor is ever allocated."""
    from transformers import AutoConfig


    cfg = dict(dense_config)
    for key in ("dtype", "torch_dtype"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = build_skeleton(config, dtype, device)
    apply_plan(model, plan)
    return model


def read_pruned(folder: Path) -> tuple[dict, dict, PruningPlan]:
    """(secateurs.json, config.json, plan) of a pruned folder; UserError when it is not one this version reads."""
    try:
        meta = json.loads((folder / "secateurs.json").read_text())
        cfg_file = folder / "config.json"  # format 1 folders have none: their dense configuration says the dtype
        saved_config = json.loads(cfg_file.read_text()) if cfg_file.exists() else meta.get("dense_config", {})
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{folder} is not a readable secateurs model folder: {e}") from e
    if meta.get("format") not in READABLE_FORMATS:
        raise UserError(f"{folder}/secateurs.json: unknown format {meta.get('format')!r}, expected one of {READABLE_FORMATS}")
    return meta, saved_config, PruningPlan.load(folder / "plan.json")


def load_pruned(folder: str | Path, dtype=None, device: str = "cpu", max_memory=None, spill_dir=None, workload=None,
                log=None, tokenizer: bool = True):
    """Returns (model, tokenizer) of a folder written by ``save_pruned`` (no code from the folder is run). The
    model is built at its pruned shapes from the start (``build_pruned_skeleton``) and its weights read from
    the folder, whole or layer by layer (``runtime.loading.from_skeleton``); ``dtype`` auto keeps the dtype the
    folder was saved in on a GPU (``runtime.precision``). ``tokenizer=False``: the model alone (the caller has
    the tokenizer already; a large vocabulary's tokenizer costs hundreds of MB to load again)."""
    from transformers import AutoTokenizer


    folder = Path(folder)
    meta, saved_config, plan = read_pruned(folder)
    dt = working_dtype(dtype, device, saved_config, log)
    model = from_skeleton(lambda d, dev: build_pruned_skeleton(meta["dense_config"], plan, d, dev), folder, dt, device,
                          max_memory, spill_dir, workload)
    # the stock config is passed so that the tokenizer does not read config.json (whose auto_map would
    # make transformers ask whether to trust the folder's code)
    tok = (AutoTokenizer.from_pretrained(folder, config=model.config)
           if tokenizer and (folder / "tokenizer_config.json").exists() else None)
    return model, tok
