"""The ``secateurs`` command. Each sub-command is a module here with ``register(subparsers)``: it adds its
parser with ``fill=`` (the function that adds its options) and sets ``func``; modules are found automatically,
so a new command is a new file.

A command's options are added only when that command is used (parsed, or its help shown: ``CommandParser``),
so building the parser and ``secateurs --help`` import nothing heavy (no torch); the modules a command needs
are imported when it runs.

User mistakes (``UserError``) print one line and exit with code 2; Ctrl-C exits 130 and says how to resume.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from ..errors import UserError


class CommandParser(argparse.ArgumentParser):
    """A sub-command's parser whose options are added by ``fill(parser)`` the first time it is used: parsed, or
    its help or usage shown. Every command takes ``--quiet``."""

    def __init__(self, *args, fill=None, **kw):
        super().__init__(*args, **kw)
        self._fill, self._done = fill, False

    def filled(self) -> "CommandParser":
        if not self._done:
            self._done = True
            if self._fill is not None:
                self._fill(self)
            if "--quiet" not in self._option_string_actions:
                self.add_argument("--quiet", action="store_true", help="no progress bars or messages")
        return self

    def parse_known_args(self, args=None, namespace=None):
        return super(CommandParser, self.filled()).parse_known_args(args, namespace)

    def format_help(self):
        return super(CommandParser, self.filled()).format_help()

    def format_usage(self):
        return super(CommandParser, self.filled()).format_usage()


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(prog="secateurs", description="Training-free structured pruning of LLMs.")
    p.add_argument("--version", action="version", version=f"secateurs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=CommandParser)
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
        if getattr(args, "convert_dtype", None):
            from ..sources.gguf import set_convert_dtype

            set_convert_dtype(args.convert_dtype)
        return args.func(args) or 0
    except UserError as e:
        print(f"secateurs: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("secateurs: interrupted; run the same command again to resume where it stopped", file=sys.stderr)
        return 130


def add_placement(p, max_memory: bool = True) -> None:
    """Where and in what precision the model runs: device, working dtype, memory budget (docs/scale.md)."""
    from ..defaults import DTYPE_CHOICES

    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="working precision of weights, computation and saved files: auto keeps the checkpoint's "
                        "dtype on a GPU and uses float32 on a CPU (default auto; docs/scale.md)")
    if max_memory:
        p.add_argument("--max-memory", default=None, metavar="SIZES",
                       help="memory budget per device, e.g. cuda:0=20GiB,cpu=30GiB (disk=SIZE bounds spilled files) or "
                            "one size for the CPU such as 8GiB: a model that does not fit runs layer by layer, weights "
                            "read from its safetensors as each layer runs (docs/scale.md)")
    add_convert_dtype(p)


def add_convert_dtype(p) -> None:
    """How a .gguf file (or an embedded model) is stored when converted on first use (secateurs.sources.gguf)."""
    from ..sources.gguf import CONVERT_DTYPES, FLOAT32_LIMIT

    p.add_argument("--convert-dtype", default=None, choices=CONVERT_DTYPES,
                   help=f"storage dtype of a .gguf model's one-time conversion to safetensors: auto (default) stores "
                        f"float32 up to {FLOAT32_LIMIT // 2**30} GiB in float32 and bfloat16 above")


def add_common(p, max_memory: bool = True, placement: bool = True) -> None:
    """The options every model-running command shares: device, precision and memory budget (``placement``;
    without it only --device), quiet."""
    if placement:
        add_placement(p, max_memory)
    else:
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        add_convert_dtype(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def device_of(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def placement_of(args, present: bool = True) -> dict:
    """``device``, ``dtype`` and ``max_memory`` (parsed) from the common options, checked before any work: an
    unknown device, a dtype the device cannot run or an unreadable budget is a UserError. ``present=False``
    (a worker pool checks placement itself): the device name alone."""
    from ..runtime.placement import parse_max_memory
    from ..runtime.precision import as_dtype, check_device, check_dtype_runs

    device = device_of(args)
    dev = check_device(device, present)
    if args.dtype != "auto" and present:
        check_dtype_runs(as_dtype(args.dtype), dev)
    return {"device": device, "dtype": args.dtype, "max_memory": parse_max_memory(getattr(args, "max_memory", None))}


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
