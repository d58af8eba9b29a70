"""``secateurs apply PLAN MODEL --out DIR``: re-apply a saved plan to the original model and save the result
as a pruned folder (``secateurs.save``: with a result.json like ``secateurs prune`` writes, so ``secateurs
report`` reads it)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from . import add_common, count_arg, placement_of, positive_int


def register(sub):
    p = sub.add_parser("apply", help="apply a saved pruning plan to the original model and save the pruned model",
                       fill=add_arguments)
    p.set_defaults(func=run)


def add_arguments(p):
    from ..defaults import HELD_OUT_ROWS, HELD_OUT_SEQLEN

    p.add_argument("plan", help="plan.json, or a pruned folder holding one")
    p.add_argument("model", help="the original (dense) model: embedded name, Hugging Face id or model folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--eval", default="wiki:test", help="held-out set measured before and after ('' to skip)")
    p.add_argument("--eval-rows", type=count_arg, default=HELD_OUT_ROWS,
                   help=f"rows of the held-out set (0 = all; default {HELD_OUT_ROWS}, as `secateurs eval`)")
    p.add_argument("--eval-seqlen", "--seqlen", dest="eval_seqlen", type=positive_int, default=HELD_OUT_SEQLEN,
                   help=f"tokens per row of the held-out set (default {HELD_OUT_SEQLEN}, as `secateurs eval`)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_common(p)


def plan_path(text: str) -> Path:
    p = Path(text)
    return p / "plan.json" if p.is_dir() else p


def run(args):
    where = placement_of(args)
    with tempfile.TemporaryDirectory(prefix="secateurs-spill-") as spill:
        return _run(args, where, Path(spill))


def _run(args, where, spill):
    from .. import api
    from ..data import eval_rows
    from ..eval.perplexity import perplexity
    from ..export.checkpoint import load_pruned
    from ..models import get_adapter
    from ..plan import PruningPlan
    from ..result import held_out, held_out_label
    from ..runtime import model_dtype, onloader_of
    from ..workdir import check_out

    out = Path(args.out)
    check_out(out, args.overwrite)
    plan = PruningPlan.load(plan_path(args.plan))
    device, workload = where["device"], (4, args.eval_seqlen)
    model, tok = api.load(args.model, device=device, dtype=where["dtype"], progress=not args.quiet,
                          max_memory=where["max_memory"], spill_dir=spill, workload=workload)
    spec = get_adapter(model).spec()
    plan.validate(spec)
    test = eval_rows(tok, model, args.eval, args.eval_seqlen, args.eval_rows) if args.eval else None

    def ppl(m, tag):
        return perplexity(m, test, progress=not args.quiet, desc=f"{args.eval} ppl ({tag})").ppl if test is not None else None

    before = ppl(model, "dense")
    streamed = onloader_of(model) is not None
    if not streamed:
        api.apply_plan(model, plan, spec)
    settings = {"model": args.model, "plan": str(plan_path(args.plan)), "plan_method": plan.method,
                "plan_settings": plan.meta.get("settings"), "eval": args.eval or None, "eval_rows": args.eval_rows,
                "eval_seqlen": args.eval_seqlen, "device": device, "dtype": str(model_dtype(model)).replace("torch.", ""),
                "max_memory": where["max_memory"], "placement": getattr(model, "secateurs_placement", None)}
    measured = {}

    def result(folder):  # the pruned model measured: in memory, or read back layer by layer from the folder
        pruned = model
        if streamed:
            pruned, _ = load_pruned(folder, dtype=where["dtype"], device=device, max_memory=where["max_memory"],
                                    tokenizer=False, spill_dir=spill, workload=workload)
        measured.update(model=args.model, settings=settings, ratio_target=None, applied=True,
                        **held_out(args.eval, test, args.eval_seqlen, before, ppl(pruned, "pruned")))
        return measured

    kind = api.save(model, tok, plan, out, overwrite=True, result=result)
    print(f"applied {plan_path(args.plan)}: ratio {plan.ratio(spec):.4f}, params {spec.total_params:,} -> "
          f"{plan.params(spec):,}" + (f", {held_out_label(measured)} {before:.3f} -> {measured['ppl_test_after']:.3f}"
                                     if test is not None else "") + f"; saved as {kind} to {out}")
