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
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from .data import calib_rows, eval_rows
from .errors import UserError
from .eval.perplexity import HELD_OUT_ROWS, HELD_OUT_SEQLEN, perplexity, rows_label
from .export.checkpoint import _plain_config, write_pruned
from .methods import PruneContext, check_reach, get_method, make_config, run_method
from .models import get_adapter, load_model
from .plan import atomic_write_text, check_ratio
from .result import FORMAT as RESULT_FORMAT
from .runtime.pool import PoolSettings, WorkerPool, replica_loader
from .surgery import apply_plan


@dataclass
class PruneSettings:
    model: str
    method: str
    ratio: float | None = None
    calib: str = "wiki"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    eval: str = "wiki:test"  # held-out perplexity measured before and after ('' to skip)
    eval_rows: int = HELD_OUT_ROWS  # rows of eval_seqlen tokens: the same defaults as `secateurs eval`
    eval_seqlen: int = HELD_OUT_SEQLEN
    device: str = "cpu"
    options: dict = field(default_factory=dict)  # method-specific options
    export: str = ""  # "gguf": also write OUT/model.gguf for llama.cpp (secateurs.export.gguf)
    export_type: str = "f32"


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
              pool: PoolSettings | None = None) -> dict:
    """The prune job; ``pool`` (``--workers``) runs the method's candidate evaluations on Ray workers. It does
    not change the result, so it is not part of the settings a resumed run must repeat."""
    with ExitStack() as stack:
        return _run_prune(s, out, overwrite, progress, log, pool, stack)


def _open_pool(pool: PoolSettings, s: PruneSettings, method) -> WorkerPool:
    if not method.parallel:
        from .methods import all_methods

        names = ", ".join(m.name for m in all_methods().values() if m.parallel)
        raise UserError(f"--workers applies to the methods that search candidates ({names}), not {s.method}")
    return WorkerPool(pool, partial(replica_loader, s.model, device=s.device)).open()


def _run_prune(s: PruneSettings, out: str | Path, overwrite: bool, progress: bool, log, pool, stack: ExitStack) -> dict:
    out = Path(out)
    method = get_method(s.method)
    cfg = make_config(method, s.options)
    if method.needs_ratio or s.ratio is not None:
        check_ratio(s.ratio)
    if hasattr(cfg, "check_budget"):  # methods with their own budget (e.g. tell's --speedup) check it up front
        cfg.check_budget(s.ratio)
    check_out(out, overwrite)
    if s.export:
        from .export.gguf import check_request

        check_request(s.export, s.export_type, str(out / "model.gguf"), True)
    t_pool = time.time()  # Ray connected and placement checked before anything is loaded or written
    workers = stack.enter_context(_open_pool(pool, s, method)) if pool is not None else None
    t_pool = time.time() - t_pool
    torch.manual_seed(s.seed)
    model, tok = load_model(s.model, device=s.device, progress=progress)
    adapter = get_adapter(model)
    spec = adapter.spec()
    check_reach(method, spec, s.ratio, cfg)
    dense_config = _plain_config(model.config)
    calib = calib_rows(tok, model, s.calib, s.nsamples, s.seqlen, s.seed)
    test = eval_rows(tok, model, s.eval, s.eval_seqlen, s.eval_rows) if s.eval else None

    # inputs are all valid: only now is anything written
    settings = asdict(s) | {"options": asdict(cfg)}
    work = open_work(out, settings, overwrite, log)

    def measure(tag):
        r = {"ppl_calib": perplexity(model, calib, progress=progress, desc=f"calib ppl ({tag})").ppl}
        if test is not None:
            r["ppl_test"] = perplexity(model, test, progress=progress, desc=f"{s.eval} ppl ({tag})").ppl
        return r

    before = _cached(work / "dense.json", lambda: measure("dense"))
    log(f"secateurs: {s.model}: {spec.total_params:,} params, calib ppl ({rows_label(*calib.shape)}) {before['ppl_calib']:.3f}"
        + (f", {s.eval} ppl ({rows_label(*test.shape)}) {before['ppl_test']:.3f}" if test is not None else ""))

    ctx = PruneContext(model, tok, adapter, spec, calib, s.ratio, s.seed, work, progress, pool=workers)
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
        "versions": versions(),
    }
    if ctx.extra:
        result["method_details"] = ctx.extra
    if workers is not None:
        result["workers"] = workers.summary() | {"ray_start_seconds": t_pool}
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
    (work / "settings.json").unlink()
    (work / "dense.json").unlink()
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    if refused is not None:
        raise UserError(f"pruned model written to {out}, but no GGUF: {refused}")
    result["_model"] = model  # in-process callers (the demo) may keep using the pruned model
    result["_tokenizer"] = tok
    return result
