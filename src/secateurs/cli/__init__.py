"""The ``secateurs`` command. Each sub-command is a module here with ``register(subparsers)`` that sets
``func`` on its parser; modules are found automatically, so a new command is a new file.

User mistakes (``UserError``) print one line and exit with code 2; Ctrl-C exits 130 and says how to resume.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from ..errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(prog="secateurs", description="Training-free structured pruning of LLMs.")
    p.add_argument("--version", action="version", version=f"secateurs {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not m.name.startswith("_"):
            importlib.import_module(f"{__name__}.{m.name}").register(sub)
    return p


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        from ..progress import quiet

        quiet()
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"secateurs: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("secateurs: interrupted; run the same command again to resume where it stopped", file=sys.stderr)
        return 130


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def device_of(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _whole_number(text: str, least: int, note: str = "") -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if v < least:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {least}{note}, got {v}")
    return v


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def count_arg(text: str) -> int:
    """A row count: a whole number >= 0 (0 = all)."""
    return _whole_number(text, 0, " (0 = all)")


def ratio_arg(text: str) -> float:
    from ..plan import check_ratio

    try:
        return check_ratio(text, "a ratio")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
