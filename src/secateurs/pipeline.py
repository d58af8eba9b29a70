"""The prune job: load, calibrate, run a method, apply its plan, measure, save. Resumable.

Work happens in ``OUT.partial/``: methods keep their resumable state there, the dense measurements are cached
there, and only when everything is written is the folder renamed to ``OUT``. Running the same command again
after an interruption resumes from that folder; a different command refuses to mix with it.
"""
from __future__ import annotations

import json
import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from .data import calib_rows, eval_rows
from .errors import UserError
from .eval.perplexity import HELD_OUT_ROWS, HELD_OUT_SEQLEN, perplexity, rows_label
from .export.checkpoint import _plain_config, load_pruned, write_pruned
from .export.card import write_card
from .methods import PruneContext, check_reach, get_method, make_config, run_method
from .models import get_adapter
from .sources import load_model
from .plan import check_ratio
from .files import atomic_write_text
from .result import FORMAT as RESULT_FORMAT
from .runtime import input_device, model_dtype
from .runtime.pool import PoolSettings, WorkerPool
from .sources import replica_loader
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
    eval_rows: int = HELD_OUT_ROWS  # rows of eval_seqlen tokens: the same defaults as `secateurs eval`
    eval_seqlen: int = HELD_OUT_SEQLEN
    device: str = "cpu"
    options: dict = field(default_factory=dict)  # method-specific options
    export: str = ""  # "gguf": also write OUT/model.gguf for llama.cpp (secateurs.export.gguf)
    export_type: str = "f32"
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


def open_work(out: Path, settings: dict, overwrite: bool, log=print, what: str = "run") -> Path:
    """``OUT.partial/`` for a job with these settings: resumed when it holds the same settings, refused (or,
    with ``overwrite``, discarded) when it holds others; the settings are written there."""
    work = out.with_name(out.name + ".partial")
    if work.exists():
        old = json.loads((work / "settings.json").read_text()) if (work / "settings.json").exists() else None
        if old != json.loads(json.dumps(settings)):
            if not overwrite:
                raise UserError(f"{work} holds an unfinished {what} with other settings; delete it or pass --overwrite")
            shutil.rmtree(work)
        else:
            log(f"secateurs: resuming the unfinished {what} in {work}")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / "settings.json", json.dumps(settings, indent=1))
    return work


def _cached(path: Path, compute):
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    atomic_write_text(path, json.dumps(value))
    return value


def estimates(s: PruneSettings, method, cfg, model, calib, batch: int, log=print, workers: int | None = None) -> dict:
    """Estimated peak memory per device and search time (``runtime.estimate``), printed and returned: the
    number of evaluations the method will run times one evaluation (one calibration batch timed through the
    model, times the batches of an evaluation), divided among ``workers`` (``--workers``) for the methods that
    run their evaluations on the pool."""
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
    share = workers if workers and method.parallel else 1
    total /= share
    where = ", ".join(f"{k} {format_size(v)}" for k, v in peak.per_place.items() if v) or "-"
    log(f"secateurs: estimated peak memory: {where} ({'layer by layer' if peak.onload else 'whole model'} in "
        f"{str(dtype).replace('torch.', '')}; weights {format_size(sizes.weights)})")
    if share > 1:
        log(f"secateurs: each of the {share} workers holds its own replica of the model: the figures above per worker "
            f"and once more for this process")
    log(f"secateurs: estimated search time: {n} x {format_duration(per_eval)}" + (f" / {share} workers" if share > 1 else "")
        + f" = {format_duration(total)} ({what}; one evaluation = {-(-rows // batch)} batches of {batch} x "
        f"{calib.shape[1]} tokens, {per_batch:.2f} s per batch timed on {dev})")
    return {"peak_bytes": peak.per_place, "method_state_bytes": {h.what: h.nbytes for h in peak.held},
            "weights_bytes": sizes.weights,
            "onload": peak.onload, "evaluations": n, "rows_per_evaluation": rows, "what": what,
            "seconds_per_batch": per_batch, "seconds_per_evaluation": per_eval, "workers": share, "search_seconds": total}


SPENT = "search_seconds.json"
BOOKKEEPING = ("settings.json", "dense.json", SPENT)


def _spent_before(work: Path) -> float:
    """Search seconds of earlier, interrupted runs in ``work``. A run stopped by an exception (Ctrl-C) recorded
    its time; a killed one left only when it started (``running_since``): it is counted up to its last saved
    state (the newest file a method wrote in ``work``), the time whose work is kept."""
    path = work / SPENT
    if not path.exists():
        return 0.0
    d = json.loads(path.read_text())
    if not isinstance(d, dict):  # written by an older version: the seconds alone
        return float(d)
    spent = float(d.get("seconds", 0.0))
    if "running_since" in d:
        saved = [f.stat().st_mtime for f in work.rglob("*") if f.is_file() and f.name not in BOOKKEEPING]
        spent += max(0.0, max(saved, default=d["running_since"]) - d["running_since"])
    return spent


def run_prune(s: PruneSettings, out: str | Path, overwrite: bool = False, progress: bool = True, log=print,
              pool: PoolSettings | None = None, dry_run: bool = False) -> dict:
    """The prune job; ``pool`` (``--workers``) runs the method's candidate evaluations on Ray workers. It does
    not change the result, so it is not part of the settings a resumed run must repeat. ``dry_run``: load,
    print the estimates, write nothing (no pool is started)."""
    with ExitStack() as stack:
        return _run_prune(s, out, overwrite, progress, log, pool, stack, dry_run)


def _check_pool(s: PruneSettings, method) -> None:
    if not method.parallel:
        from .methods import all_methods

        names = ", ".join(m.name for m in all_methods().values() if m.parallel)
        raise UserError(f"--workers applies to the methods that search candidates ({names}), not {s.method}")


def _open_pool(pool: PoolSettings, s: PruneSettings, max_memory, workload) -> WorkerPool:
    """The pool; each worker loads its replica as this process does: same dtype and budget (its own spill
    folder, ``replica_loader``)."""
    return WorkerPool(pool, partial(replica_loader, s.model, device=s.device, dtype=s.dtype, max_memory=max_memory,
                                    workload=workload)).open()


def _run_prune(s: PruneSettings, out: str | Path, overwrite: bool, progress: bool, log, pool, stack: ExitStack,
               dry_run: bool) -> dict:
    from .runtime.placement import onloader_of, parse_max_memory
    from .runtime.precision import check_device

    out = Path(out)
    method = get_method(s.method)
    cfg = make_config(method, s.options)
    if method.needs_ratio or s.ratio is not None:
        check_ratio(s.ratio)
    if hasattr(cfg, "check_budget"):  # methods with their own budget (e.g. tell's --speedup) check it up front
        cfg.check_budget(s.ratio)
    dev = check_device(s.device, present=pool is None)  # a pool checks its own placement when it opens
    max_memory = parse_max_memory(s.max_memory)
    if not dry_run:
        check_out(out, overwrite)
    if s.export:
        from .export.gguf import check_request

        check_request(s.export, s.export_type, str(out / "model.gguf"), True)
    if pool is not None:
        _check_pool(s, method)
    nsamples, seqlen, calib_source = calibration_defaults(s, cfg, dev.type)
    if calib_source != "given":
        log(f"secateurs: calibration {nsamples} rows x {seqlen} tokens ({calib_source}; --nsamples/--seqlen to change)")
    s = replace(s, nsamples=nsamples, seqlen=seqlen)
    batch = max(getattr(cfg, "batch_size", 1), PPL_BATCH)
    work = out.with_name(out.name + ".partial")
    t_pool = time.time()  # Ray connected and placement checked before anything is loaded or written
    workers = (stack.enter_context(_open_pool(pool, s, max_memory, (batch, seqlen)))
               if pool is not None and not dry_run else None)
    t_pool = time.time() - t_pool
    if pool is not None:
        check_device(s.device)  # this process loads the model there too
    torch.manual_seed(s.seed)
    model, tok = load_model(s.model, device=s.device, dtype=s.dtype, progress=progress, max_memory=max_memory,
                            spill_dir=None if dry_run else work / "spill", workload=(batch, seqlen))
    if hasattr(cfg, "check_placement"):  # e.g. tell --speedup needs the whole model in memory
        cfg.check_placement(onloader_of(model) is not None)
    if s.export and onloader_of(model) is not None:
        raise UserError(f"--export {s.export} converts the pruned model in memory, and under --max-memory {s.max_memory} it "
                        "runs layer by layer; prune without --export, then `secateurs export OUT --out OUT/model.gguf` "
                        "on a machine where the pruned model fits")
    adapter = get_adapter(model)
    spec = adapter.spec()
    check_reach(method, spec, s.ratio, cfg)
    dense_config = _plain_config(model.config)
    calib = calib_rows(tok, model, s.calib, nsamples, seqlen, s.seed)
    test = eval_rows(tok, model, s.eval, s.eval_seqlen, s.eval_rows) if s.eval else None
    est = estimates(s, method, cfg, model, calib, getattr(cfg, "batch_size", PPL_BATCH), log,
                    workers=pool.workers if pool is not None else None)
    if dry_run:
        return {"dry_run": True, "estimates": est, "calibration": {"nsamples": nsamples, "seqlen": seqlen,
                                                                  "source": calib_source}}

    # inputs are all valid: only now is anything written
    settings = asdict(s) | {"options": asdict(cfg)}
    work = open_work(out, settings, overwrite, log)
    shutil.rmtree(work / "spill", ignore_errors=True)  # states spilled by an interrupted run are not reused

    def measure(tag):
        r = {"ppl_calib": perplexity(model, calib, PPL_BATCH, progress=progress, desc=f"calib ppl ({tag})").ppl}
        if test is not None:
            r["ppl_test"] = perplexity(model, test, PPL_BATCH, progress=progress, desc=f"{s.eval} ppl ({tag})").ppl
        return r

    before = _cached(work / "dense.json", lambda: measure("dense"))
    log(f"secateurs: {s.model}: {spec.total_params:,} params, calib ppl ({rows_label(*calib.shape)}) {before['ppl_calib']:.3f}"
        + (f", {s.eval} ppl ({rows_label(*test.shape)}) {before['ppl_test']:.3f}" if test is not None else ""))

    ctx = PruneContext(model, tok, adapter, spec, calib, s.ratio, s.seed, work, progress, pool=workers,
                       model_ref=s.model)
    spent_file = work / SPENT
    spent = _spent_before(work)
    t0 = time.time()
    atomic_write_text(spent_file, json.dumps({"seconds": spent, "running_since": t0}))
    try:
        plan = run_method(method, ctx, cfg)
    except BaseException:
        atomic_write_text(spent_file, json.dumps({"seconds": spent + time.time() - t0}))
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
        "format": RESULT_FORMAT,
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
        "eval_rows": test.shape[0] if test is not None else None,
        "eval_seqlen": s.eval_seqlen if test is not None else None,
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
    if workers is not None:
        result["workers"] = workers.summary() | {"ray_start_seconds": t_pool}
    if not streamed:
        write_pruned(model, tok, plan, dense_config, work)
    refused = None
    if s.export:  # a plan llama.cpp cannot hold still leaves the pruned folder, then exits with the reason
        from .export.gguf import export_model

        try:
            result["gguf"] = export_model(s.model, str(work / "model.gguf"), s.export_type, progress=progress,
                                    model=model, tokenizer=tok)
            result["gguf"]["file"] = "model.gguf"
        except UserError as e:
            refused = e
            result["gguf"] = {"refused": str(e)}
    atomic_write_text(work / "result.json", json.dumps(result, indent=1))
    write_card(work)
    (work / "settings.json").unlink()
    (work / "dense.json").unlink()
    shutil.rmtree(work / "spill", ignore_errors=True)
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    if refused is not None:
        raise UserError(f"pruned model written to {out}, but no GGUF: {refused}")
    result["_model"] = model  # in-process callers (the demo) may keep using the pruned model
    result["_tokenizer"] = tok
    return result
