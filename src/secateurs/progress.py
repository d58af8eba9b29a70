"""Progress bars (tqdm on stderr); ``--quiet`` turns them off everywhere."""
from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(iterable=None, desc: str = "", enabled: bool = True, total=None, **kw):
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False, dynamic_ncols=True, **kw)
