"""``secateurs bench``: prefill latency, decode throughput, peak memory, parameters and FLOPs of a model,
optionally side by side with another (see secateurs.eval.bench and docs/evaluation.md). ``.gguf`` files are
measured in llama.cpp (secateurs.llamacpp; docs/gguf.md), or with ``--engine pytorch`` their conversions in
PyTorch."""
from __future__ import annotations

import json

from . import add_common, placement_of, positive_int


def register(sub):
    p = sub.add_parser("bench", help="speed and memory of a model, optionally against another (measured side by side)",
                       fill=add_arguments)
    p.set_defaults(func=run)


def add_arguments(p):
    from ..defaults import ENGINE_CHOICES

    p.add_argument("model", help="embedded name, Hugging Face id, model folder, pruned secateurs folder, or a .gguf "
                   "file (measured in llama.cpp unless --engine pytorch)")
    p.add_argument("--engine", default=None, choices=list(ENGINE_CHOICES),
                   help="pytorch or llamacpp (default: llamacpp for .gguf files, pytorch otherwise; pytorch runs a .gguf "
                        "file's conversion to safetensors)")
    p.add_argument("--against", default=None, help="a second model (e.g. the dense one), measured in the same process, alternating")
    p.add_argument("--prompt-len", type=positive_int, default=512, help="prompt tokens (batch 1; default 512)")
    p.add_argument("--decode-tokens", type=positive_int, default=128, help="greedy decode steps with KV cache (default 128)")
    p.add_argument("--warmup", type=int, default=2, help="rounds run first and dropped (default 2)")
    p.add_argument("--reps", type=positive_int, default=5, help="timed rounds; figures are medians (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    p.add_argument("--clock", default="cpu", choices=["cpu", "wall"],
                   help="PyTorch on a CPU: time this process's CPU time with torch on one thread (cpu, the default: "
                        "the work of a pass, steady when other processes share the machine) or wall time on torch's "
                        "threads (wall: the latency on a machine of your own); GPUs and llama.cpp use wall time")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--threads", type=positive_int, default=None, help="llama.cpp threads for .gguf files, the same for "
                   "both (default: OMP_NUM_THREADS, else all cores)")
    p.add_argument("--flash-attn", action="store_true", help="llama.cpp's flash attention for .gguf files (off by "
                   "default, as in llama-cpp-python)")
    add_common(p, max_memory=False)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def run(args):
    from dataclasses import asdict

    from ..eval.bench import BenchSettings
    from ..eval.engines import same_engine
    from ..eval.load import load_note
    from ..result import versions
    from ..files import atomic_write_text

    s = BenchSettings(prompt_len=args.prompt_len, decode_tokens=args.decode_tokens, warmup=args.warmup,
                      reps=args.reps, seed=args.seed, clock=args.clock)
    s.validate()
    engine = same_engine(args.model, args.against, args.engine)
    device = args.device if engine.name != "torch" else placement_of(args)["device"]
    out = engine.bench(args.model, args.against, asdict(s), device=device, threads=args.threads,
                       memory=not args.no_memory, progress=not args.quiet, flash_attn=args.flash_attn, dtype=args.dtype)
    out["versions"] = versions()
    a = out.get("against")
    rows = [("prompt tokens/s", "prompt_tokens_per_s", ".1f")] if "prompt_tokens_per_s" in out else []
    rows += [("prefill ms", "prefill_ms", ".1f"), ("decode tokens/s", "decode_tokens_per_s", ".1f"),
            ("peak memory MB", "peak_memory_mb", ".0f"), ("params", "params", ","),
            ("prefill GFLOPs", "prefill_flops", ".1f")]
    print(f"{'':18}{'model':>16}" + (f"{'against':>16}" if a else ""))
    for label, key, spec in rows:
        v = out[key] / 1e9 if key == "prefill_flops" else out[key]
        av = (a[key] / 1e9 if key == "prefill_flops" else a[key]) if a else None
        print(f"{label:18}{_fmt(v, spec):>16}" + (f"{_fmt(av, spec):>16}" if a else ""))
    note = load_note(out.get("load"))
    if a:
        sp, ideal = out["speedup"], out["ideal_speedup"]
        print(f"speedup (measured / ideal from FLOPs): prefill {sp['prefill']:.2f}x / {ideal['prefill']:.2f}x, "
              f"decode {sp['decode']:.2f}x / {ideal['decode']:.2f}x" + (" (machine busy: see the note)" if note else ""))
    where = out["settings"]["device"] + (f", llama.cpp {out['gguf_type']}, {out['settings']['threads']} threads"
                                         + (", flash attention" if out["settings"]["flash_attn"] else "")
                                         if out["settings"].get("engine") == "llama.cpp" else "")
    print(f"(batch 1, prompt {s.prompt_len}, {s.decode_tokens} decode tokens, medians of {s.reps} rounds after "
          f"{s.warmup} warm-up, {where}, timer {out['settings']['timer']})")
    if note:
        print(note)
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=1))
