"""The llama-cpp-python binding, its thread default, and a way to keep llama.cpp's messages off the terminal."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile

from ..errors import UserError

INSTALL_HINT = ("running GGUF files needs llama-cpp-python 0.3.36: `make setup` builds it for this CPU "
                "(or: CMAKE_ARGS=\"$(python tools/llama_cmake_args.py)\" pip install 'llama-cpp-python[server]==0.3.36')")


def binding():
    """The ``llama_cpp`` module (its logger silenced); a UserError saying how to install it when it is missing."""
    try:
        import llama_cpp
        from llama_cpp import _logger
    except ImportError as e:
        raise UserError(INSTALL_HINT) from e
    _logger.set_verbose(False)
    return llama_cpp


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when set, else every core."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return os.cpu_count() or 1


@contextlib.contextmanager
def quiet():
    """Sends what llama.cpp prints to fd 2 into a temporary file; yields a list that gets its lines."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            lines.extend(f.read().decode("utf-8", "replace").splitlines())
