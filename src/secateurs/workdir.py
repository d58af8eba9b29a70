"""The work folder of a resumable job (prune, heal): work happens in ``OUT.partial/``, which holds the job's
settings; running the same job again resumes from it, a different one refuses to mix with it; the finished
folder is renamed to ``OUT`` in one step."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import UserError
from .files import atomic_write_text


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"output folder {out} exists and is not empty; choose another --out or pass --overwrite")


def work_of(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def open_work(out: Path, settings: dict, overwrite: bool, log=print, what: str = "run") -> Path:
    """``OUT.partial/`` for a job with these settings: resumed when it holds the same settings, refused (or,
    with ``overwrite``, discarded) when it holds others; the settings are written there."""
    work = work_of(out)
    if work.exists():
        old = json.loads((work / "settings.json").read_text()) if (work / "settings.json").exists() else None
        if old != json.loads(json.dumps(settings)):
            if not overwrite:
                raise UserError(f"{work} holds an unfinished {what} with other settings; delete it or pass --overwrite")
            shutil.rmtree(work)
        else:
            log(f"secateurs: resuming the unfinished {what} in {work}")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / "settings.json", json.dumps(settings, indent=1))
    return work


def cached(path: Path, compute):
    """The JSON value kept in ``path``, computed and written there the first time."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    atomic_write_text(path, json.dumps(value))
    return value


def finish(work: Path, out: Path) -> None:
    """Renames the complete work folder to ``out`` (replacing an earlier ``out``)."""
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
