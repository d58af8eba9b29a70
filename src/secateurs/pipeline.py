"""The prune job: load, calibrate, run a method, apply its plan, measure, save. Resumable.

Work happens in ``OUT.partial/``: methods keep their resumable state there, the dense measurements are cached
there, and only when everything is written is the folder renamed to ``OUT``. Running the same command again
after an interruption resumes from that folder; a different command refuses to mix with it.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .data import calib_rows, eval_rows
from .errors import UserError
from .eval.perplexity import perplexity
from .export.checkpoint import _plain_config, load_pruned, write_pruned
from .methods import PruneContext, get_method, make_config
from .models import get_adapter, load_model
from .plan import atomic_write_text, check_ratio
from .runtime import input_device, model_dtype
from .surgery import apply_plan

PPL_BATCH = 4  # rows per batch of the perplexity measured before and after


@dataclass
class PruneSettings:
    model: str
    method: str
    ratio: float | None = None
    calib: str = "wiki"
    nsamples: int | None = None  # None: the default for the device and method (``calibration_defaults``)
    seqlen: int | None = None
    seed: int = 0
    eval: str = "wiki:test"  # held-out perplexity measured before and after ('' to skip)
    eval_rows: int = 16
    device: str = "cpu"
    options: dict = field(default_factory=dict)  # method-specific options
    dtype: str = "auto"  # working precision (runtime.precision)
    max_memory: str | None = None  # --max-memory (runtime.placement)


DEFAULT_CALIBRATION = (32, 512)  # rows x tokens, on a GPU and for one-shot methods on a CPU
CPU_SEARCH_CALIBRATION = (4, 256)  # searches on a CPU (a greedy BlockPruner search of SmolLM2 to 25%: ~20 min)


def calibration_defaults(s: PruneSettings, cfg, device_type: str) -> tuple[int, int, str]:
    """(rows, tokens per row, where they come from): the given ones, or defaults that fit the device. Methods
    that search (their config has ``searches = True``) get a small calibration on a CPU."""
    searches = getattr(cfg, "searches", False)
    rows, seqlen = CPU_SEARCH_CALIBRATION if device_type == "cpu" and searches else DEFAULT_CALIBRATION
    if s.nsamples is not None and s.seqlen is not None:
        return s.nsamples, s.seqlen, "given"
    src = (f"the CPU default for {s.method} (a search)" if device_type == "cpu" and searches
           else "the default")
    return (s.nsamples or rows), (s.seqlen or seqlen), src


def versions() -> dict:
    import transformers

    from . import __version__

    return {"secateurs": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"output folder {out} exists and is not empty; choose another --out or pass --overwrite")


def _cached(path: Path, compute):
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    atomic_write_text(path, json.dumps(value))
    return value


def estimates(s: PruneSettings, method, cfg, model, calib, batch: int, log=print) -> dict:
    """Estimated peak memory per device and search time (``runtime.estimate``), printed and returned: the
    number of evaluations the method will run times one evaluation (one calibration batch timed through the
    model, times the batches of an evaluation)."""
    from .runtime.estimate import estimate_peak, evaluations, format_duration, model_sizes
    from .runtime.placement import format_size, onloader_of
    from .runtime.passes import row_nll

    ol = onloader_of(model)
    dtype = model_dtype(model)
    sizes = model_sizes(model, dtype)
    dev = input_device(model)
    b = ol.budget if ol is not None else None
    peak = estimate_peak(sizes, s.method, calib.shape[0], calib.shape[1], batch, str(dev),
                         b.device_bytes if b else None, asdict(cfg), b.cpu_bytes if b else None,
                         b.disk_bytes if b else None)
    spec = get_adapter(model).spec()
    n, rows, what = evaluations(cfg, spec, s.ratio, calib.shape[0])
    if ol is None:  # a first pass warms up kernels and allocator (an onloaded pass pays its reads every time)
        row_nll(model, calib[:batch], batch)
    t0 = time.perf_counter()
    row_nll(model, calib[:batch], batch)
    per_batch = time.perf_counter() - t0
    per_eval = per_batch * -(-rows // batch)
    total = n * per_eval
    where = ", ".join(f"{k} {format_size(v)}" for k, v in peak.per_place.items() if v) or "-"
    log(f"secateurs: estimated peak memory: {where} ({'layer by layer' if peak.onload else 'whole model'} in "
        f"{str(dtype).replace('torch.', '')}; weights {format_size(sizes.weights)})")
    log(f"secateurs: estimated search time: {n} x {format_duration(per_eval)} = {format_duration(total)} "
        f"({what}; one evaluation = {-(-rows // batch)} batches of {batch} x {calib.shape[1]} tokens, "
        f"{per_batch:.2f} s per batch timed on {dev})")
    return {"peak_bytes": peak.per_place, "method_state_bytes": {h.what: h.nbytes for h in peak.held},
            "weights_bytes": sizes.weights,
            "onload": peak.onload, "evaluations": n, "rows_per_evaluation": rows, "what": what,
            "seconds_per_batch": per_batch, "seconds_per_evaluation": per_eval, "search_seconds": total}


def run_prune(s: PruneSettings, out: str | Path, overwrite: bool = False, progress: bool = True, log=print,
              dry_run: bool = False) -> dict:
    """The prune job (module docstring). ``dry_run``: load, print the estimates, write nothing."""
    from .runtime.placement import onloader_of, parse_max_memory
    from .runtime.precision import check_device

    out = Path(out)
    method = get_method(s.method)
    cfg = make_config(method, s.options)
    if method.needs_ratio or s.ratio is not None:
        check_ratio(s.ratio)
    if hasattr(cfg, "check_budget"):  # methods with their own budget (e.g. tell's --speedup) check it up front
        cfg.check_budget(s.ratio)
    dev = check_device(s.device)
    max_memory = parse_max_memory(s.max_memory)
    if not dry_run:
        check_out(out, overwrite)
    nsamples, seqlen, calib_source = calibration_defaults(s, cfg, dev.type)
    if calib_source != "given":
        log(f"secateurs: calibration {nsamples} rows x {seqlen} tokens ({calib_source}; --nsamples/--seqlen to change)")
    s = replace(s, nsamples=nsamples, seqlen=seqlen)
    batch = max(getattr(cfg, "batch_size", 1), PPL_BATCH)
    work = out.with_name(out.name + ".partial")
    torch.manual_seed(s.seed)
    model, tok = load_model(s.model, device=s.device, dtype=s.dtype, progress=progress, max_memory=max_memory,
                            spill_dir=None if dry_run else work / "spill", workload=(batch, seqlen))
    if hasattr(cfg, "check_placement"):  # e.g. tell --speedup needs the whole model in memory
        cfg.check_placement(onloader_of(model) is not None)
    adapter = get_adapter(model)
    spec = adapter.spec()
    dense_config = _plain_config(model.config)
    calib = calib_rows(tok, model, s.calib, nsamples, seqlen, s.seed)
    test = eval_rows(tok, model, s.eval, seqlen, s.eval_rows) if s.eval else None
    est = estimates(s, method, cfg, model, calib, getattr(cfg, "batch_size", PPL_BATCH), log)
    if dry_run:
        return {"dry_run": True, "estimates": est, "calibration": {"nsamples": nsamples, "seqlen": seqlen,
                                                                  "source": calib_source}}

    # inputs are all valid: only now is anything written
    settings = asdict(s) | {"options": asdict(cfg)}
    if work.exists():
        old = json.loads((work / "settings.json").read_text()) if (work / "settings.json").exists() else None
        if old != json.loads(json.dumps(settings)):
            if not overwrite:
                raise UserError(f"{work} holds an unfinished run with other settings; delete it or pass --overwrite")
            shutil.rmtree(work)
        else:
            log(f"secateurs: resuming the unfinished run in {work}")
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "spill", ignore_errors=True)  # states spilled by an interrupted run are not reused
    atomic_write_text(work / "settings.json", json.dumps(settings, indent=1))

    def measure(tag):
        r = {"ppl_calib": perplexity(model, calib, PPL_BATCH, progress=progress, desc=f"calib ppl ({tag})").ppl}
        if test is not None:
            r["ppl_test"] = perplexity(model, test, PPL_BATCH, progress=progress, desc=f"{s.eval} ppl ({tag})").ppl
        return r

    before = _cached(work / "dense.json", lambda: measure("dense"))
    log(f"secateurs: {s.model}: {spec.total_params:,} params, calib ppl {before['ppl_calib']:.3f}"
        + (f", {s.eval} ppl {before['ppl_test']:.3f}" if test is not None else ""))

    ctx = PruneContext(model, tok, adapter, spec, calib, s.ratio, s.seed, work, progress)
    # search time accumulates over interrupted runs (a Ctrl-C records the time spent so far)
    spent_file = work / "search_seconds.json"
    spent = json.loads(spent_file.read_text()) if spent_file.exists() else 0.0
    t0 = time.time()
    try:
        plan = method.fn(ctx, cfg)
    except BaseException:
        atomic_write_text(spent_file, json.dumps(spent + time.time() - t0))
        raise
    search_seconds = spent + time.time() - t0
    spent_file.unlink(missing_ok=True)
    plan.method = s.method
    plan.meta = {"settings": settings}
    placement = dict(getattr(model, "secateurs_placement", {}))
    streamed = onloader_of(model) is not None
    if streamed:
        # layer by layer: the pruned folder is written from the dense checkpoint as the plan slices each layer,
        # then read back at its pruned shapes (layer by layer too) for the measurement after pruning
        write_pruned(model, tok, plan, dense_config, work)
        model, _ = load_pruned(work, dtype=s.dtype, device=s.device, max_memory=max_memory, spill_dir=work / "spill",
                               tokenizer=False,
                               workload=(batch, seqlen))
    else:
        apply_plan(model, plan, spec)
    after = measure("pruned")
    params_after = plan.params(spec)
    result = {
        "method": s.method,
        "model": s.model,
        "settings": settings,
        "ratio_target": s.ratio,
        "ratio_achieved": plan.ratio(spec),
        "params_before": spec.total_params,
        "params_after": params_after,
        "ppl_calib_before": before["ppl_calib"],
        "ppl_calib_after": after["ppl_calib"],
        "eval_set": s.eval or None,
        "ppl_test_before": before.get("ppl_test"),
        "ppl_test_after": after.get("ppl_test"),
        "search_seconds": search_seconds,
        "ppl_evaluations": ctx.ppl_evaluations,
        "removed_blocks": [b.name for b in plan.removed_blocks()],
        "calibration": {"nsamples": nsamples, "seqlen": seqlen, "source": calib_source},
        "placement": placement,
        "estimates": est,
        "versions": versions(),
    }
    if ctx.extra:
        result["method_details"] = ctx.extra
    if not streamed:
        write_pruned(model, tok, plan, dense_config, work)
    atomic_write_text(work / "result.json", json.dumps(result, indent=1))
    (work / "settings.json").unlink()
    (work / "dense.json").unlink()
    shutil.rmtree(work / "spill", ignore_errors=True)
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    result["_model"] = model  # in-process callers (the demo) may keep using the pruned model
    result["_tokenizer"] = tok
    return result
