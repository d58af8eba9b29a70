"""``secateurs export``: a dense or pruned model as a GGUF file for llama.cpp (secateurs.export.gguf) or as a
folder for vLLM (secateurs.export.vllm)."""
from __future__ import annotations

from . import add_convert_dtype, positive_int

FORMATS = ("gguf", "vllm")


def register(sub):
    p = sub.add_parser("export", help="write a dense or pruned model as a GGUF file for llama.cpp / ollama, or as a "
                       "folder for vLLM", fill=add_arguments)
    p.set_defaults(func=run)


def add_arguments(p):
    from ..export.gguf import DEFAULT_TYPE, QUANTIZED, TYPES

    p.add_argument("model", help="embedded name, Hugging Face id, model folder or pruned secateurs folder")
    p.add_argument("--format", default="gguf", help=f"output format: {' or '.join(FORMATS)} (default gguf)")
    p.add_argument("--type", default=None,
                   help=f"tensor type: gguf: {', '.join(TYPES)} (default {DEFAULT_TYPE}, as llama.cpp's own converter; "
                   f"{', '.join(QUANTIZED)} are made by llama.cpp's quantizer); vllm: auto (as stored, the default), "
                   "f32, f16 or bf16")
    p.add_argument("--out", required=True, help="output file (gguf: FILE.gguf) or folder (vllm)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--threads", type=positive_int, default=None, help="quantizer threads (default: OMP_NUM_THREADS, else all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    add_convert_dtype(p)


def describe(r: dict) -> str:
    notes = sum(1 for L in r["layers"] if L.get("note"))
    return (f"{r['file']}: {r['type']}, llama.cpp architecture {r['arch']}, {len(r['layers'])} blocks"
            + (f" ({notes} adapted, see docs/gguf.md)" if notes else "") + f", {r['bytes'] / 2**20:.1f} MiB")


def describe_vllm(r: dict) -> str:
    how = ", load with trust_remote_code=True" if r["trust_remote_code"] else ""
    zeros = f", {r['zero_biases']} zero biases (see docs/vllm.md)" if r["zero_biases"] else ""
    return (f"{r['folder']}: vLLM folder, {r['architecture']} ({r['kind']}), {len(r['layers'])} layers, {r['dtype']}"
            f"{zeros}, {r['bytes'] / 2**20:.1f} MiB{how}")


def run(args):
    from ..errors import UserError

    if args.format == "vllm":
        from ..export.vllm import AUTO, check_request, export_model

        check_request(args.type or AUTO, args.out, args.overwrite)
        print(describe_vllm(export_model(args.model, args.out, args.type or AUTO, progress=not args.quiet)))
        return
    if args.format != "gguf":
        raise UserError(f"unknown export format {args.format!r}; use {' or '.join(FORMATS)}")
    from ..export.gguf import DEFAULT_TYPE, check_request, export_model

    check_request(args.format, args.type or DEFAULT_TYPE, args.out, args.overwrite)
    r = export_model(args.model, args.out, args.type or DEFAULT_TYPE, args.threads, progress=not args.quiet)
    print(describe(r))
