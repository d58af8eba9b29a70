"""``secateurs export``: a dense or pruned model as a GGUF file for llama.cpp (secateurs.export.gguf)."""
from __future__ import annotations

from . import add_convert_dtype, positive_int


def register(sub):
    p = sub.add_parser("export", help="write a dense or pruned model as a GGUF file for llama.cpp / ollama",
                       fill=add_arguments)
    p.set_defaults(func=run)


def add_arguments(p):
    from ..export.gguf import DEFAULT_TYPE, QUANTIZED, TYPES

    p.add_argument("model", help="embedded name, Hugging Face id, model folder or pruned secateurs folder")
    p.add_argument("--format", default="gguf", help="output format (gguf)")
    p.add_argument("--type", default=DEFAULT_TYPE,
                   help=f"tensor type: {', '.join(TYPES)} (default {DEFAULT_TYPE}, as llama.cpp's own converter; "
                   f"{', '.join(QUANTIZED)} are made by llama.cpp's quantizer)")
    p.add_argument("--out", required=True, help="output file (FILE.gguf)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--threads", type=positive_int, default=None, help="quantizer threads (default: OMP_NUM_THREADS, else all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    add_convert_dtype(p)


def describe(r: dict) -> str:
    notes = sum(1 for L in r["layers"] if L.get("note"))
    return (f"{r['file']}: {r['type']}, llama.cpp architecture {r['arch']}, {len(r['layers'])} blocks"
            + (f" ({notes} adapted, see docs/gguf.md)" if notes else "") + f", {r['bytes'] / 2**20:.1f} MiB")


def run(args):
    from ..export.gguf import check_request, export_model

    check_request(args.format, args.type, args.out, args.overwrite)
    r = export_model(args.model, args.out, args.type, args.threads, progress=not args.quiet)
    print(describe(r))
