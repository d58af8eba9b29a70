"""``secateurs prune``: prune a model with a registered method; writes plan, model and result.json."""
from __future__ import annotations

from . import add_placement, count_arg, device_of, placement_of, positive_int, ratio_arg


def add_arguments(p, method: str | None = None) -> None:
    """``prune``'s options in groups; the method groups of every method, or only ``method``'s (``--method NAME
    --help``)."""
    from ..defaults import HELD_OUT_ROWS, HELD_OUT_SEQLEN
    from ._options import MethodHelp, add_method_options

    p.add_argument("model", help="embedded name (smollm2-135m, gemma3-270m), Hugging Face id or model folder")
    g = p.add_argument_group("general")
    g.add_argument("-h", "--help", action=MethodHelp, build=add_arguments,
                   help="show this help; after --method NAME, only that method's options")
    g.add_argument("--method", required=True, help="pruning method (`secateurs methods` lists them)")
    g.add_argument("--ratio", type=ratio_arg, default=None, help="target parameter ratio, 0 < R < 1 (fraction of all "
                   "parameters removed; whole-block methods land on the first reachable ratio >= R)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice: the calibration rows drawn, "
                   "searches and samplers (default 0)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the estimated peak memory and search time, and stop (nothing is written)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("placement", "device, working precision and memory budget (docs/scale.md)")
    add_placement(g)
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", default="wiki", help="calibration text set (default wiki = wiki:calib)")
    g.add_argument("--nsamples", type=positive_int, default=None,
                   help="calibration rows (default 32; 4 for searches on a CPU: blockpruner, sleb, self-pruner)")
    g.add_argument("--seqlen", type=positive_int, default=None,
                   help="tokens per calibration row (default 512; 256 for searches on a CPU)")
    g = p.add_argument_group("evaluation", "held-out perplexity, measured before and after pruning (the same "
                             "defaults as `secateurs eval`)")
    g.add_argument("--eval", default="wiki:test", help="held-out text set ('' to skip; default wiki:test)")
    g.add_argument("--eval-rows", type=count_arg, default=HELD_OUT_ROWS,
                   help=f"rows of the held-out set (0 = all; default {HELD_OUT_ROWS})")
    g.add_argument("--eval-seqlen", type=positive_int, default=HELD_OUT_SEQLEN,
                   help=f"tokens per held-out row (default {HELD_OUT_SEQLEN})")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder (work happens in OUT.partial, resumable)")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    g.add_argument("--export", default="", choices=["", "gguf", "vllm"],
                   help="also write OUT/model.gguf for llama.cpp (gguf) or the folder OUT/vllm for vLLM (vllm)")
    g.add_argument("--export-type", default="f16", help="tensor type of the export: f32, f16, bf16, q8_0, q6_k, q5_k_m, "
                   "q4_k_m, q3_k_m, q2_k for gguf; auto (as the pruned model), f32, f16, bf16 for vllm (default f16, "
                   "as llama.cpp's own converter)")
    from ..defaults import PRUNE_ENGINES

    g.add_argument("--engine", default="", choices=["", *PRUNE_ENGINES],
                   help="the engine the plan must run in: " + "; ".join(f"{k}: {v}" for k, v in PRUNE_ENGINES.items())
                   + "; the plan records it")
    g = p.add_argument_group("worker pool (Ray; methods that search candidates: blockpruner, sleb, self-pruner; "
                             "and tell --assign response)")
    g.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="evaluate the search's candidates (tell: its block responses) on N Ray workers, each holding "
                        "a replica of the model (same result as one process)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (HOST:PORT, ray://HOST:PORT or auto) instead of starting one here: "
                        "the way to use several machines")
    g.add_argument("--threads-per-worker", type=positive_int, default=None, metavar="T",
                   help="CPU threads (and CPUs reserved) per worker (default: the most that places every worker)")
    g.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs per worker with --device cuda (default 1; 0.5 puts two workers on one GPU)")
    add_method_options(p, method)


def register(sub):
    p = sub.add_parser("prune", help="prune a model to a target ratio with a registered method", add_help=False,
                       usage="secateurs prune MODEL --method NAME [--ratio R] --out DIR [options]",
                       description="Prune a model with a registered method; writes plan.json, the pruned model and "
                       "result.json. `secateurs prune --method NAME --help` shows one method's options.",
                       fill=add_arguments)
    p.set_defaults(func=run)


def run(args):
    from ..eval.perplexity import rows_label
    from ..methods import get_method
    from ..pipeline import PruneSettings, run_prune
    from ..result import held_out_label
    from ._options import selected

    get_method(args.method)
    options = selected(args, args.method)
    pool = _pool_settings(args)
    where = placement_of(args, present=pool is None)
    s = PruneSettings(model=args.model, method=args.method, ratio=args.ratio, calib=args.calib,
                      nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, eval=args.eval,
                      eval_rows=args.eval_rows, eval_seqlen=args.eval_seqlen, device=where["device"], options=options,
                      export=args.export, export_type=args.export_type, dtype=args.dtype,
                      max_memory=where["max_memory"], engine=args.engine)
    r = run_prune(s, args.out, overwrite=args.overwrite, progress=not args.quiet, pool=pool,
                  dry_run=args.dry_run)
    if args.dry_run:
        return
    print(f"{r['method']}: ratio {r['ratio_achieved']:.4f} (target {r['ratio_target']}), "
          f"params {r['params_before']:,} -> {r['params_after']:,}, "
          f"calib ppl ({rows_label(r['calibration']['nsamples'], r['calibration']['seqlen'])}) {r['ppl_calib_before']:.3f} -> {r['ppl_calib_after']:.3f}"
          + (f", {held_out_label(r)} {r['ppl_test_before']:.3f} -> {r['ppl_test_after']:.3f}" if r['eval_set'] else "")
          + f"; search {r['search_seconds']:.1f}s; written to {args.out}"
          + (f" (GGUF: model.gguf, {r['gguf']['type']}, architecture {r['gguf']['arch']})" if "gguf" in r else "")
          + (f" (vLLM: vllm/, {r['vllm']['dtype']}, {r['vllm']['architecture']})" if "vllm" in r else ""))


def _pool_settings(args):
    from ..errors import UserError
    from ..runtime.pool import PoolSettings

    if args.workers is None:
        given = [o for o, v in (("--ray-address", args.ray_address), ("--threads-per-worker", args.threads_per_worker),
                                ("--gpus-per-worker", args.gpus_per_worker)) if v is not None]
        if given:
            raise UserError(f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} --workers N")
        return None
    return PoolSettings(args.workers, args.ray_address, args.threads_per_worker, args.gpus_per_worker, device_of(args))
