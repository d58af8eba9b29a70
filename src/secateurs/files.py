"""Where secateurs keeps files and how it writes them: the cache folder and atomic writes.

Everything may import this module; it imports nothing of the package. A file or folder is written under a
temporary name and renamed into place, so a reader never sees a half-written one."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def cache_dir() -> Path:
    """``$SECATEURS_CACHE``, default ``~/.cache/secateurs``: converted models, measured costs and responses."""
    return Path(os.environ.get("SECATEURS_CACHE", Path.home() / ".cache" / "secateurs"))


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def publish_dir(staging: Path, target: Path) -> None:
    """Moves a finished folder ``staging`` to ``target`` (replacing an old one): until the rename, ``target`` is
    either absent or the old complete folder."""
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
