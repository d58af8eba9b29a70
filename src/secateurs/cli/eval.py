"""``secateurs eval``: perplexity of a model (dense or pruned) on named text sets, and zero-shot accuracy
through lm-evaluation-harness (``--tasks``; see secateurs.eval.zeroshot and docs/evaluation.md). A ``.gguf``
file is evaluated in llama.cpp, or with ``--engine pytorch`` its conversion in PyTorch (secateurs.eval.engines
picks the engine from the input)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from . import add_common, count_arg, placement_of, positive_int


def register(sub):
    p = sub.add_parser("eval", help="perplexity (and, where available, zero-shot accuracy) of a model", fill=add_arguments)
    p.set_defaults(func=run)


def add_arguments(p):
    from ..defaults import ENGINE_CHOICES, HELD_OUT_ROWS, HELD_OUT_SEQLEN

    p.add_argument("model", help="embedded name, Hugging Face id, model folder, pruned secateurs folder, or a .gguf "
                   "file (run in llama.cpp unless --engine pytorch)")
    p.add_argument("--engine", default=None, choices=list(ENGINE_CHOICES),
                   help="pytorch or llamacpp (default: llamacpp for a .gguf file, pytorch otherwise; pytorch runs a .gguf "
                        "file's conversion to safetensors)")
    p.add_argument("--ppl", default="wiki:test", help="comma-separated text sets (default wiki:test; '' for none)")
    p.add_argument("--seqlen", type=positive_int, default=HELD_OUT_SEQLEN,
                   help=f"tokens per perplexity row (default {HELD_OUT_SEQLEN}, as prune's --eval-seqlen)")
    p.add_argument("--rows", type=count_arg, default=HELD_OUT_ROWS,
                   help=f"rows per set (0 = all; default {HELD_OUT_ROWS}, as prune's --eval-rows)")
    p.add_argument("--tasks", default="", help="comma-separated zero-shot tasks: piqa, hellaswag, winogrande, arc_easy, "
                   "arc_challenge, boolq, openbookqa (offline data), or hub:NAME for any lm-eval task from the hub")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N items of each task (a quick look)")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--threads", type=positive_int, default=None, help="llama.cpp threads for a .gguf (default: "
                   "OMP_NUM_THREADS, else all cores)")
    add_common(p)


def run(args):
    from ..errors import UserError
    from ..eval.engines import engine_for

    sets = [s for s in args.ppl.split(",") if s]
    if args.rows < 0:
        raise UserError(f"--rows must be 0 (all) or more (got {args.rows})")
    tasks, built = [], {}
    engine = engine_for(args.model, args.engine)
    if args.tasks and engine.name != "torch":
        raise UserError(f"zero-shot --tasks run in PyTorch; {args.model} is evaluated in {engine.name} (perplexity only)")
    if args.tasks:
        from ..eval.zeroshot import build_tasks, parse_tasks

        tasks = parse_tasks(args.tasks)
        built = build_tasks(tasks)  # before the model: a bad name or an unreachable hub fails fast
    elif args.limit is not None:
        raise UserError("--limit applies to zero-shot tasks: give --tasks too")
    if not sets and not tasks:
        raise UserError("nothing to evaluate: give --ppl sets and/or --tasks")
    if engine.name == "torch":
        where = placement_of(args)
    else:
        where = {"device": args.device, "dtype": args.dtype, "max_memory": args.max_memory}
    if tasks and where["max_memory"] is not None:
        raise UserError("--tasks runs the whole model through lm-evaluation-harness and cannot run layer by layer; "
                        "drop --max-memory for zero-shot tasks (perplexity works with it)")
    with tempfile.TemporaryDirectory(prefix="secateurs-spill-") as spill:
        return _run(args, engine, sets, tasks, built, where, Path(spill))


def _run(args, engine, sets, tasks, built, where, spill):
    from ..result import versions
    from ..files import atomic_write_text

    device = where["device"]
    handle = engine.open(args.model, args.seqlen, device=device, threads=args.threads, progress=not args.quiet,
                         dtype=where["dtype"], max_memory=where["max_memory"], spill_dir=spill,
                         workload=(args.batch_size, args.seqlen))
    rows_by_set = {name: handle.rows(name, args.seqlen, args.rows) for name in sets}  # validate all first
    out = {"model": args.model, "ppl": {},
           "settings": {"ppl": sets, "seqlen": args.seqlen, "rows": args.rows, "batch_size": args.batch_size,
                        "tasks": tasks, "limit": args.limit, "device": device or "cpu", "max_memory": where["max_memory"],
                        **handle.settings()},
           "versions": versions()}
    for name, rows in rows_by_set.items():
        r = handle.perplexity(rows, batch_size=args.batch_size, progress=not args.quiet, desc=f"{name} ppl")
        out["ppl"][name] = r.as_dict()
        print(f"{name}: ppl {r.ppl:.3f} ({r.label}, {r.tokens} tokens)")
    if tasks:
        import lm_eval

        from ..eval.zeroshot import zero_shot

        out["tasks"], _ = zero_shot(handle.model, handle.tokenizer, built, limit=args.limit, batch_size=args.batch_size,
                                    progress=not args.quiet)
        out["versions"]["lm_eval"] = lm_eval.__version__
        for name, r in out["tasks"].items():
            norm = f"  acc_norm {r['acc_norm']:.4f}" if r["acc_norm"] is not None else ""
            print(f"{name}: acc {r['acc']:.4f}{norm}  ({r['n']} items)")
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=1))
