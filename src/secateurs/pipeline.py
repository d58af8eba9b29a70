"""The prune job of ``secateurs prune``, on top of the API (``secateurs.api``): settings, work folder, load,
calibrate, prune, apply (or write layer by layer), measure, result. Resumable.

Work happens in ``OUT.partial/`` (``workdir``): methods keep their resumable state there, the dense
measurements are cached there, and only when everything is written is the folder renamed to ``OUT``. Running
the same command again after an interruption resumes from that folder; a different command refuses to mix
with it.
"""
from __future__ import annotations

import json
import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import api
from .data import calib_rows, eval_rows
from .errors import UserError
from .eval.load import LoadWatch, cores
from .eval.perplexity import HELD_OUT_ROWS, HELD_OUT_SEQLEN, perplexity, rows_label
from .export.checkpoint import _plain_config, load_pruned, write_pruned
from .export.card import write_card
from .files import atomic_write_text
from .methods import PruneContext, get_method, make_config, run_method
from .models import get_adapter
from .result import held_out, make_result, plan_counts
from .runtime import input_device, model_dtype, onloader_of
from .runtime.placement import parse_max_memory
from .runtime.pool import PoolSettings
from .sources import load_model
from .workdir import cached, check_out, finish, open_work, work_of

FORMAT_NAMES = {"gguf": "GGUF"}  # --export formats as the messages name them (others: as --export spells them)

PPL_BATCH = 4  # rows per batch of the perplexity measured before and after


EXPORTS = {"gguf": "model.gguf", "vllm": "vllm"}  # --export: what it writes inside OUT


@dataclass
class PruneSettings:
    model: str
    method: str
    ratio: float | None = None
    calib: str = "wiki"
    nsamples: int | None = None  # None: the default for the device and method (``api.calibration_size``)
    seqlen: int | None = None
    seed: int = 0
    eval: str = "wiki:test"  # held-out perplexity measured before and after ('' to skip)
    eval_rows: int = HELD_OUT_ROWS  # rows of eval_seqlen tokens: the same defaults as `secateurs eval`
    eval_seqlen: int = HELD_OUT_SEQLEN
    device: str = "cpu"
    options: dict = field(default_factory=dict)  # method-specific options
    export: str = ""  # "gguf": also write OUT/model.gguf for llama.cpp (secateurs.export.gguf); "vllm": OUT/vllm/
    export_type: str = "f16"  # export.gguf.DEFAULT_TYPE, as the CLI (vllm takes it too, and auto/f32/bf16)
    dtype: str = "auto"  # working precision (runtime.precision)
    max_memory: str | None = None  # --max-memory (runtime.placement)
    engine: str = ""  # --engine: the engine the plan must run in (defaults.PRUNE_ENGINES); "": any


def estimates(cfg, model, calib, ratio: float | None, log=print, workers: int | None = None,
              engine: str | None = None) -> dict:
    """Estimated peak memory per device and search time (``runtime.estimate``), printed and returned: the
    number of evaluations the method will run for ``engine`` (``cfg.evaluations``) times one evaluation (one
    calibration batch timed through the model, times the batches of an evaluation), divided among ``workers``
    (``--workers``) for the methods that run their evaluations on the pool."""
    from .runtime.estimate import estimate_peak, format_duration, model_sizes
    from .runtime.placement import format_size
    from .runtime.passes import row_nll

    batch = cfg.pass_rows()
    ol = onloader_of(model)
    dtype = model_dtype(model)
    sizes = model_sizes(model, dtype)
    dev = input_device(model)
    b = ol.budget if ol is not None else None
    peak = estimate_peak(sizes, cfg, calib.shape[0], calib.shape[1], batch, str(dev),
                         b.device_bytes if b else None, b.cpu_bytes if b else None, b.disk_bytes if b else None)
    n, rows, what = cfg.evaluations(get_adapter(model).spec(), ratio, calib.shape[0], engine)
    if ol is None:  # a first pass warms up kernels and allocator (an onloaded pass pays its reads every time)
        row_nll(model, calib[:batch], batch)
    threads = torch.get_num_threads()
    with LoadWatch(threads) as watch:
        t0, c0 = time.perf_counter(), time.process_time()
        row_nll(model, calib[:batch], batch)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # on a busy CPU the pass waited for the cores: what it costs on a quiet one is the CPU time it used, spread
    # over its threads (an onloaded pass also waits for its reads, which CPU time leaves out: wall time there)
    busy = dev.type == "cpu" and ol is None and bool(watch.loaded)
    per_batch = min(wall, cpu / threads) if busy else wall
    per_eval = per_batch * -(-rows // batch)
    total = n * per_eval
    share = workers if workers and cfg.parallel else 1
    total /= share
    where = ", ".join(f"{k} {format_size(v)}" for k, v in peak.per_place.items() if v) or "-"
    log(f"secateurs: estimated peak memory: {where} ({'layer by layer' if peak.onload else 'whole model'} in "
        f"{str(dtype).replace('torch.', '')}; weights {format_size(sizes.weights)})")
    if share > 1:
        log(f"secateurs: each of the {share} workers holds its own replica of the model: the figures above per worker "
            f"and once more for this process")
    if busy:
        log(f"secateurs: the machine was busy while timing ({watch.samples[-1]} threads runnable on {cores()} cores): "
            f"timed by the CPU time of the pass, {per_batch:.2f} s per batch against {wall:.2f} s of wall time; "
            "the search takes longer while the machine stays busy")
    log(f"secateurs: estimated search time: {n} x {format_duration(per_eval)}" + (f" / {share} workers" if share > 1 else "")
        + f" = {format_duration(total)} ({what}; one evaluation = {-(-rows // batch)} batches of {batch} x "
        f"{calib.shape[1]} tokens, {per_batch:.2f} s per batch timed on {dev})")
    return {"peak_bytes": peak.per_place, "method_state_bytes": {h.what: h.nbytes for h in peak.held},
            "weights_bytes": sizes.weights,
            "onload": peak.onload, "evaluations": n, "rows_per_evaluation": rows, "what": what,
            "seconds_per_batch": per_batch, "seconds_per_batch_wall": wall, "timing_load": watch.record(),
            "seconds_per_evaluation": per_eval, "workers": share, "search_seconds": total}


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


def timed_method(method, ctx: PruneContext, cfg, work: Path):
    """``run_method``, its search seconds added to those of earlier interrupted runs in ``work``."""
    spent_file = work / SPENT
    spent = _spent_before(work)
    t0 = time.time()
    atomic_write_text(spent_file, json.dumps({"seconds": spent, "running_since": t0}))
    try:
        plan = run_method(method, ctx, cfg)
    except BaseException:
        atomic_write_text(spent_file, json.dumps({"seconds": spent + time.time() - t0}))
        raise
    spent_file.unlink(missing_ok=True)
    return plan, spent + time.time() - t0


def run_prune(s: PruneSettings, out: str | Path, overwrite: bool = False, progress: bool = True, log=print,
              pool: PoolSettings | None = None, dry_run: bool = False) -> dict:
    """The prune job; returns result.json's dict (with the pruned model and tokenizer under ``_model`` and
    ``_tokenizer``). ``pool`` (``--workers``) runs the method's candidate evaluations on Ray workers; it does
    not change the result, so it is not part of the settings a resumed run must repeat. ``dry_run``: load,
    print the estimates, write nothing (no pool is started)."""
    with ExitStack() as stack:
        return _run_prune(s, Path(out), overwrite, progress, log, pool, stack, dry_run)


def _run_prune(s: PruneSettings, out: Path, overwrite: bool, progress: bool, log, pool, stack: ExitStack,
               dry_run: bool) -> dict:
    from .runtime.precision import check_device

    # settings: every input checked before anything is loaded or written
    cfg = make_config(get_method(s.method), s.options)
    method = api.check_request(cfg, s.ratio, workers=pool is not None, engine=s.engine or None)
    dev = check_device(s.device, present=pool is None)  # a pool checks its own placement when it opens
    max_memory = parse_max_memory(s.max_memory)
    if not dry_run:
        check_out(out, overwrite)
    if s.export == "vllm":
        from .export.vllm import check_request as check_vllm

        check_vllm(s.export_type, str(out / EXPORTS["vllm"]), True)
    elif s.export:
        from .export.gguf import check_request as check_gguf

        check_gguf(s.export, s.export_type, str(out / EXPORTS["gguf"]), True)
    nsamples, seqlen, calib_source = api.calibration_size(cfg, s.nsamples, s.seqlen, dev.type)
    if calib_source != "given":
        log(f"secateurs: calibration {nsamples} rows x {seqlen} tokens ({calib_source}; --nsamples/--seqlen to change)")
    s = replace(s, nsamples=nsamples, seqlen=seqlen)
    work = work_of(out)
    workload = api.workload(cfg, seqlen)
    t_pool = time.time()  # Ray connected and placement checked before anything is loaded or written
    workers = (stack.enter_context(api.open_pool(pool, s.model, s.device, s.dtype, max_memory, workload))
               if pool is not None and not dry_run else None)
    t_pool = time.time() - t_pool
    if pool is not None:
        check_device(s.device)  # this process loads the model there too

    # load and calibrate
    torch.manual_seed(s.seed)
    model, tok = load_model(s.model, device=s.device, dtype=s.dtype, progress=progress, max_memory=max_memory,
                            spill_dir=None if dry_run else work / "spill", workload=workload)
    api.check_model(method, cfg, model, s.ratio, s.engine or None, s.model, (nsamples, seqlen))
    streamed = onloader_of(model) is not None
    if s.export and streamed:
        raise UserError(f"--export {s.export} converts the pruned model in memory, and under --max-memory {s.max_memory} it "
                        "runs layer by layer; prune without --export, then `secateurs export OUT --format {s.export} ...` "
                        "on a machine where the pruned model fits")
    spec = get_adapter(model).spec()
    dense_config = _plain_config(model.config)
    calib = calib_rows(tok, model, s.calib, nsamples, seqlen, s.seed)
    test = eval_rows(tok, model, s.eval, s.eval_seqlen, s.eval_rows) if s.eval else None
    est = estimates(cfg, model, calib, s.ratio, log, workers=pool.workers if pool is not None else None,
                    engine=s.engine or None)
    calibration = {"nsamples": nsamples, "seqlen": seqlen, "source": calib_source}
    if dry_run:
        cached_work = cfg.cached_work(model, calib, s.seed, s.engine or None, model_ref=s.model)
        if cached_work:
            log(f"secateurs: {cached_work}")
        return {"dry_run": True, "estimates": est, "calibration": calibration, "cached_work": cached_work}

    # work folder: only now is anything written
    settings = asdict(s) | {"options": asdict(cfg)}
    if not s.engine:
        del settings["engine"]  # as the settings of runs before --engine were, so that those resume
    work = open_work(out, settings, overwrite, log)
    shutil.rmtree(work / "spill", ignore_errors=True)  # states spilled by an interrupted run are not reused

    def measure(tag):
        r = {"ppl_calib": perplexity(model, calib, PPL_BATCH, progress=progress, desc=f"calib ppl ({tag})").ppl}
        if test is not None:
            r["ppl_test"] = perplexity(model, test, PPL_BATCH, progress=progress, desc=f"{s.eval} ppl ({tag})").ppl
        return r

    before = cached(work / "dense.json", lambda: measure("dense"))
    log(f"secateurs: {s.model}: {spec.total_params:,} params, calib ppl ({rows_label(*calib.shape)}) {before['ppl_calib']:.3f}"
        + (f", {s.eval} ppl ({rows_label(*test.shape)}) {before['ppl_test']:.3f}" if test is not None else ""))

    # prune
    ctx = PruneContext.build(model, calib, tokenizer=tok, ratio=s.ratio, seed=s.seed, workdir=work, progress=progress,
                             pool=workers, model_ref=s.model, engine=s.engine or None)
    plan, search_seconds = timed_method(method, ctx, cfg, work)
    plan.meta = {"settings": settings}
    placement = dict(getattr(model, "secateurs_placement", {}))

    # apply, or write layer by layer and read back; measure
    if streamed:
        # the pruned folder is written from the dense checkpoint as the plan slices each layer, then read back
        # at its pruned shapes (layer by layer too) for the measurement after pruning
        write_pruned(model, tok, plan, dense_config, work)
        model, _ = load_pruned(work, dtype=s.dtype, device=s.device, max_memory=max_memory, spill_dir=work / "spill",
                               tokenizer=False, workload=workload)
    else:
        api.apply_plan(model, plan, spec)
    after = measure("pruned")

    # result
    result = make_result(
        s.method, s.model, settings, plan_counts(plan, spec, s.ratio),
        held_out(s.eval, test, s.eval_seqlen, before.get("ppl_test"), after.get("ppl_test")),
        ppl_calib_before=before["ppl_calib"], ppl_calib_after=after["ppl_calib"], search_seconds=search_seconds,
        **plan.record, calibration=calibration, placement=placement, estimates=est)
    if workers is not None:
        result["workers"] = workers.summary() | {"ray_start_seconds": t_pool}
    if not streamed:
        write_pruned(model, tok, plan, dense_config, work)
    refused = _export(s, work, model, tok, result, progress)
    _publish(work, out, result)
    if refused is not None:
        raise UserError(f"pruned model written to {out}, but no {FORMAT_NAMES.get(s.export, s.export)} export: {refused}")
    result["_model"] = model  # in-process callers (the demo) may keep using the pruned model
    result["_tokenizer"] = tok
    return result


def _export(s: PruneSettings, work: Path, model, tok, result: dict, progress: bool) -> UserError | None:
    """``--export gguf``: OUT/model.gguf; ``--export vllm``: the folder OUT/vllm; recorded in the result. A plan
    the engine cannot hold still leaves the pruned folder: the reason is recorded and returned, for the job to
    exit with it."""
    if not s.export:
        return None
    if s.export == "vllm":
        from .export.vllm import export_model
    else:
        from .export.gguf import export_model
    name = EXPORTS[s.export]
    try:
        result[s.export] = export_model(s.model, str(work / name), s.export_type, progress=progress, model=model,
                                        tokenizer=tok)
        result[s.export]["file" if s.export == "gguf" else "folder"] = name
    except UserError as e:
        result[s.export] = {"refused": str(e)}
        return e
    return None


def _publish(work: Path, out: Path, result: dict) -> None:
    """result.json written last, the bookkeeping removed, the work folder renamed to ``out``."""
    atomic_write_text(work / "result.json", json.dumps(result, indent=1))
    write_card(work)
    for name in ("settings.json", "dense.json"):
        (work / name).unlink()
    shutil.rmtree(work / "spill", ignore_errors=True)
    finish(work, out)
