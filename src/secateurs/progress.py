"""Progress bars (tqdm on stderr); ``--quiet`` turns them off everywhere.

Our own bars go through ``progress_bar(enabled=...)``. The libraries we call have their own: transformers
("Loading weights", "Writing model shards"), the Hugging Face hub (downloads), datasets (map, loading) and
lm-evaluation-harness (requests, bootstrap). ``quiet()`` switches off the first three through their own
settings; lm-eval has no setting for all of its bars, so ``harness_output(quiet=True)`` holds its stderr
while it runs (given back if it fails).
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys

from tqdm.auto import tqdm


def progress_bar(iterable=None, desc: str = "", enabled: bool = True, total=None, **kw):
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False, dynamic_ncols=True, **kw)


def quiet() -> None:
    """No progress bars and no info-level chatter from transformers, the hub and datasets (``--quiet``)."""
    import os

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # for hub code that reads it later
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        import huggingface_hub.utils

        huggingface_hub.utils.disable_progress_bars()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


@contextlib.contextmanager
def harness_output(quiet: bool):
    """Around an lm-evaluation-harness run: with ``quiet``, what it writes to stderr (its tqdm bars) is held
    back, and written out only if the run fails (so an error's context is not lost)."""
    if not quiet:
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise
