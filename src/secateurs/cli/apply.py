"""``secateurs apply PLAN MODEL --out DIR``: re-apply a saved plan to the original model and save the result
as a pruned folder (with a result.json like ``secateurs prune`` writes, so ``secateurs report`` reads it)."""
from __future__ import annotations

import json
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
    from ..data import eval_rows
    from ..eval.perplexity import perplexity
    from ..export.checkpoint import _plain_config, load_pruned, save_pruned
    from ..models import get_adapter
    from ..sources import load_model
    from ..pipeline import check_out, versions
    from ..plan import PruningPlan
    from ..result import FORMAT as RESULT_FORMAT
    from ..result import held_out_label
    from ..runtime import model_dtype, onloader_of
    from ..surgery import apply_plan

    out = Path(args.out)
    check_out(out, args.overwrite)
    plan = PruningPlan.load(plan_path(args.plan))
    device = where["device"]
    workload = (4, args.eval_seqlen)
    model, tok = load_model(args.model, device=device, dtype=where["dtype"], progress=not args.quiet,
                            max_memory=where["max_memory"], spill_dir=spill, workload=workload)
    spec = get_adapter(model).spec()
    plan.validate(spec)
    dense_config = _plain_config(model.config)
    test = eval_rows(tok, model, args.eval, args.eval_seqlen, args.eval_rows) if args.eval else None

    def ppl(m, tag):
        return perplexity(m, test, progress=not args.quiet, desc=f"{args.eval} ppl ({tag})").ppl if test is not None else None

    before = ppl(model, "dense")
    streamed = onloader_of(model) is not None
    if not streamed:
        apply_plan(model, plan, spec)
    settings = {"model": args.model, "plan": str(plan_path(args.plan)), "plan_method": plan.method,
                "plan_settings": plan.meta.get("settings"), "eval": args.eval or None, "eval_rows": args.eval_rows,
                "eval_seqlen": args.eval_seqlen, "device": device, "dtype": str(model_dtype(model)).replace("torch.", ""),
                "max_memory": where["max_memory"], "placement": getattr(model, "secateurs_placement", None)}
    result = {
        "format": RESULT_FORMAT,
        "method": plan.method or "hand-made",
        "model": args.model,
        "settings": settings,
        "ratio_target": None,
        "ratio_achieved": plan.ratio(spec),
        "params_before": spec.total_params,
        "params_after": plan.params(spec),
        "eval_set": args.eval or None,
        "eval_rows": test.shape[0] if test is not None else None,
        "eval_seqlen": args.eval_seqlen if test is not None else None,
        "ppl_test_before": before,
        "ppl_test_after": None,
        "removed_blocks": [b.name for b in plan.removed_blocks()],
        "applied": True,
        "versions": versions(),
    }

    def result_text(folder):  # the pruned model measured: in memory, or read back layer by layer from the folder
        pruned = model
        if streamed:
            pruned, _ = load_pruned(folder, dtype=where["dtype"], device=device, max_memory=where["max_memory"], tokenizer=False,
                                    spill_dir=spill, workload=workload)
        result["ppl_test_after"] = ppl(pruned, "pruned")
        return json.dumps(result, indent=1)

    kind = save_pruned(model, tok, plan, dense_config, out, extra={"result.json": result_text})
    after = result["ppl_test_after"]
    print(f"applied {plan_path(args.plan)}: ratio {result['ratio_achieved']:.4f}, params {spec.total_params:,} -> "
          f"{result['params_after']:,}" + (f", {held_out_label(result)} {before:.3f} -> {after:.3f}" if test is not None else "")
          + f"; saved as {kind} to {out}")
