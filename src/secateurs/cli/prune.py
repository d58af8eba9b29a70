"""``secateurs prune``: prune a model with a registered method; writes plan, model and result.json."""
from __future__ import annotations

import dataclasses
import typing

from . import add_common, device_of, positive_int, ratio_arg


def _method_options(p):
    """Every registered method's config fields become options (shared names declared once)."""
    from ..methods import all_methods

    seen = {}
    for name, m in all_methods().items():
        group = None
        for f in dataclasses.fields(m.config_cls):
            if f.name in seen:
                continue
            seen[f.name] = name
            group = group or p.add_argument_group(f"options of {name}")
            hints = typing.get_type_hints(m.config_cls)
            typ = hints[f.name]
            kw = {"default": None, "help": f.metadata.get("help", "") + f" (default {f.default})"}
            if typ is bool:
                kw["action"] = argparse_bool()
            else:
                base = [t for t in typing.get_args(typ) if t is not type(None)] or [typ]
                kw["type"] = base[0] if base[0] in (int, float, str) else str
                if "choices" in f.metadata:
                    kw["choices"] = f.metadata["choices"]
            group.add_argument("--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ()), dest=f.name, **kw)
    return seen


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


def register(sub):
    p = sub.add_parser("prune", help="prune a model to a target ratio with a registered method")
    p.add_argument("model", help="embedded name (smollm2-135m, gemma3-270m), Hugging Face id or model folder")
    p.add_argument("--method", required=True, help="see `secateurs methods`")
    p.add_argument("--ratio", type=ratio_arg, default=None, help="target parameter ratio, 0 < R < 1")
    p.add_argument("--calib", default="wiki", help="calibration text set (default wiki = wiki:calib)")
    p.add_argument("--nsamples", type=positive_int, default=32, help="calibration rows (default 32)")
    p.add_argument("--seqlen", type=positive_int, default=512, help="tokens per row (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default="wiki:test", help="held-out set measured before and after ('' to skip)")
    p.add_argument("--eval-rows", type=int, default=16, help="rows of the held-out set (default 16)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--export", default="", choices=["", "gguf"], help="also write OUT/model.gguf for llama.cpp")
    p.add_argument("--export-type", default="f32", help="tensor type of the GGUF: f32, f16, bf16, q8_0, q4_k_m (default f32)")
    add_common(p)
    g = p.add_argument_group("worker pool (Ray; methods that search candidates: blockpruner, sleb, self-pruner)")
    g.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="evaluate the search's candidates on N Ray workers, each holding a replica of the model "
                        "(same result as one process)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (HOST:PORT, ray://HOST:PORT or auto) instead of starting one here: "
                        "the way to use several machines")
    g.add_argument("--threads-per-worker", type=positive_int, default=None, metavar="T",
                   help="CPU threads (and CPUs reserved) per worker (default: the most that places every worker)")
    g.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs per worker with --device cuda (default 1; 0.5 puts two workers on one GPU)")
    p.set_defaults(func=run, _method_fields=_method_options(p))


def run(args):
    from ..errors import UserError
    from ..methods import get_method
    from ..pipeline import PruneSettings, run_prune

    method = get_method(args.method)
    own = {f.name for f in dataclasses.fields(method.config_cls)}
    foreign = [k for k in args._method_fields if getattr(args, k) is not None and k not in own]
    if foreign:
        raise UserError(f"option(s) {', '.join('--' + k.replace('_', '-') for k in foreign)} do not apply to method {args.method}")
    options = {k: getattr(args, k) for k in own if getattr(args, k) is not None}
    s = PruneSettings(model=args.model, method=args.method, ratio=args.ratio, calib=args.calib,
                      nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, eval=args.eval,
                      eval_rows=args.eval_rows, device=device_of(args), options=options, export=args.export,
                      export_type=args.export_type)
    r = run_prune(s, args.out, overwrite=args.overwrite, progress=not args.quiet, pool=_pool_settings(args))
    print(f"{r['method']}: ratio {r['ratio_achieved']:.4f} (target {r['ratio_target']}), "
          f"params {r['params_before']:,} -> {r['params_after']:,}, "
          f"calib ppl {r['ppl_calib_before']:.3f} -> {r['ppl_calib_after']:.3f}"
          + (f", {r['eval_set']} ppl {r['ppl_test_before']:.3f} -> {r['ppl_test_after']:.3f}" if r['eval_set'] else "")
          + f"; search {r['search_seconds']:.1f}s; written to {args.out}"
          + (f" (GGUF: model.gguf, {r['gguf']['type']}, architecture {r['gguf']['arch']})" if "gguf" in r else ""))


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
