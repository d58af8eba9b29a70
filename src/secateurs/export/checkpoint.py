"""Saving and loading pruned models as folders.

A pruned folder holds ``model.safetensors`` (the pruned tensors, tied weights stored once), ``plan.json``
(re-appliable to the original model), ``secateurs.json`` (format tag and the dense model's configuration)
and the tokenizer. ``load_pruned`` rebuilds the dense skeleton from that configuration, applies the plan's
structure and loads the tensors: no pickles, no custom code needed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..plan import PruningPlan, atomic_write_text

FORMAT = "secateurs-model/1"


def _plain_config(config) -> dict:
    d = config.to_dict()
    d.pop("quantization_config", None)
    return d


def write_pruned(model, tokenizer, plan: PruningPlan, dense_config: dict, folder: str | Path) -> None:
    """Writes the pruned model into ``folder`` (which the caller renames into place when complete)."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / "model.safetensors"))
    plan.save(folder / "plan.json")
    atomic_write_text(folder / "secateurs.json", json.dumps({"format": FORMAT, "dense_config": dense_config}, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_pruned(model, tokenizer, plan: PruningPlan, dense_config: dict, out: str | Path) -> Path:
    """Writes to a temporary sibling folder, then renames it to ``out``: an interrupted save leaves no
    folder that could be mistaken for a good one."""
    out = Path(out)
    tmp = out.with_name(out.name + ".saving")
    if tmp.exists():
        shutil.rmtree(tmp)
    write_pruned(model, tokenizer, plan, dense_config, tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def build_pruned_skeleton(dense_config: dict, plan: PruningPlan, dtype=torch.float32):
    """A model with the pruned structure (weights not meaningful yet)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..surgery import apply_plan

    cfg = dict(dense_config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    apply_plan(model, plan)
    return model


def load_pruned(folder: str | Path, dtype=torch.float32, device: str = "cpu"):
    """Returns (model, tokenizer) of a folder written by ``save_pruned``."""
    from safetensors.torch import load_model
    from transformers import AutoTokenizer

    folder = Path(folder)
    try:
        meta = json.loads((folder / "secateurs.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{folder} is not a readable secateurs model folder: {e}") from e
    if meta.get("format") != FORMAT:
        raise UserError(f"{folder}/secateurs.json: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    plan = PruningPlan.load(folder / "plan.json")
    model = build_pruned_skeleton(meta["dense_config"], plan, dtype=dtype)
    load_model(model, str(folder / "model.safetensors"), strict=True)
    model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").exists() else None
    return model, tok
