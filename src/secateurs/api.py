"""The in-process API, on a model already in memory (``secateurs.load``, or any supported transformers model):

    model, tok = secateurs.load("smollm2-135m")
    plan = secateurs.prune(model, tok, secateurs.FlapConfig(), ratio=0.2, calib="wiki")
    secateurs.apply_plan(model, plan)
    secateurs.evaluate(model, tok, ppl="wiki:test")
    secateurs.save(model, tok, plan, "runs/flap-20")

``prune`` dispatches on the config's type (a ``methods.MethodConfig``); its keyword arguments and their
defaults are ``secateurs prune``'s options, and the CLI's prune job (``pipeline``) is built from the same
steps (``check_request``, ``check_model``, ``calibration``, ``PruneContext.build``, ``run_method``), so that
the same settings give the same plan. ``heal``, ``export`` and ``bench`` are the other commands as functions.
"""
from __future__ import annotations

import json
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, fields, replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from .data import calib_rows, eval_rows
from .errors import UserError
from .eval.perplexity import HELD_OUT_ROWS, HELD_OUT_SEQLEN, perplexity
from .export.checkpoint import _plain_config, save_pruned
from .methods import (PASS_ROWS, MethodSpec, PruneContext, all_methods, check_engine, check_engine_model, check_reach,
                      method_for, run_method)
from .models import get_adapter
from .plan import PruningPlan
from .result import held_out, make_result, plan_counts
from .runtime import input_device, onloader_of
from .runtime.pool import PoolSettings, WorkerPool
from .sources import load_model, replica_loader
from .surgery import apply_plan as _apply
from .workdir import check_out

DEFAULT_CALIBRATION = (32, 512)  # rows x tokens, on a GPU and for one-shot methods on a CPU
CPU_SEARCH_CALIBRATION = (4, 256)  # searches on a CPU (a greedy BlockPruner search of SmolLM2 to 25%: ~20 min)


def load(name_or_path: str, **kw):
    """(model, tokenizer) for an embedded name, a Hugging Face id or folder, or a pruned secateurs folder;
    ``device``, ``dtype`` and ``max_memory`` place it (``sources.load_model``)."""
    return load_model(name_or_path, **kw)


# --- prune, in steps the CLI's job shares ---------------------------------------------------------------
def with_speedup(cfg, speedup: float | None):
    """``cfg`` with its ``speedup`` budget set (the methods that have one: tell)."""
    if speedup is None:
        return cfg
    if "speedup" not in {f.name for f in fields(cfg)}:
        raise UserError(f"speedup applies to the methods with a speedup budget (tell), not {method_for(cfg).name}")
    return replace(cfg, speedup=speedup)


def check_request(cfg, ratio: float | None, workers: bool = False, engine: str | None = None) -> MethodSpec:
    """The method of ``cfg``, its options, budget and engine checked before anything is loaded (``cfg.check``,
    ``methods.check_engine``)."""
    method = method_for(cfg)
    cfg.check(ratio)
    check_engine(method, cfg, engine)
    if workers and not cfg.parallel:
        methods = all_methods().values()
        names = ", ".join(m.name for m in methods if m.parallel and not m.config_cls.parallel_when)
        some = "; ".join(f"{m.name} with {m.config_cls.parallel_when}" for m in methods if m.config_cls.parallel_when)
        raise UserError(f"--workers applies to the methods that search candidates ({names}), not {method.name}"
                        + (f"; and to {some}" if some else ""))
    return method


def check_model(method: MethodSpec, cfg, model, ratio: float | None, engine: str | None = None,
                model_ref: str | None = None, calib_shape: tuple[int, int] | None = None) -> None:
    """What needs the placed model, before any work: the placement the method needs, the ratio's reach, whether
    the engine can hold the method's plans of this model type, and what else the method checks against the
    loaded model (``cfg.check_loaded``; ``model_ref``: as the command named it) and the calibration size
    (``cfg.check_calibration``; ``calib_shape``: rows, tokens per row)."""
    cfg.check_placement(onloader_of(model) is not None)
    adapter = get_adapter(model)
    check_reach(method, adapter.spec(), ratio, cfg)
    check_engine_model(method, cfg, adapter, engine)
    cfg.check_loaded(model, model_ref)
    if calib_shape is not None:
        cfg.check_calibration(model, *calib_shape)


def calibration_size(cfg, nsamples: int | None, seqlen: int | None, device_type: str) -> tuple[int, int, str]:
    """(rows, tokens per row, where they come from): the given ones, or defaults that fit the device. Methods
    that search (``cfg.searches``) get a small calibration on a CPU."""
    small = device_type == "cpu" and cfg.searches
    rows, tokens = CPU_SEARCH_CALIBRATION if small else DEFAULT_CALIBRATION
    if nsamples is not None and seqlen is not None:
        return nsamples, seqlen, "given"
    src = f"the CPU default for {method_for(cfg).name} (a search)" if small else "the default"
    return (nsamples or rows), (seqlen or tokens), src


def workload(cfg, seqlen: int) -> tuple[int, int]:
    """(rows per batch, tokens per row) of the passes to come, for the placement's memory check."""
    return max(cfg.pass_rows(), PASS_ROWS), seqlen


def open_pool(workers: int | PoolSettings, model_ref: str, device: str, dtype: str, max_memory, work: tuple) -> WorkerPool:
    """The worker pool (``--workers``); each worker loads its replica as this process does: same dtype and
    budget (its own spill folder, ``replica_loader``)."""
    settings = workers if isinstance(workers, PoolSettings) else PoolSettings(workers, device=device)
    return WorkerPool(settings, partial(replica_loader, model_ref, device=device, dtype=dtype, max_memory=max_memory,
                                        workload=work)).open()


def prune(model, tokenizer, config, *, ratio: float | None = None, speedup: float | None = None,
          calib: str | torch.Tensor = "wiki", nsamples: int | None = None, seqlen: int | None = None, seed: int = 0,
          workers: int | PoolSettings | WorkerPool | None = None, device: str | None = None, dtype: str = "auto",
          max_memory=None, workdir: str | Path | None = None, progress: bool = True,
          model_ref: str | None = None, engine: str | None = None) -> PruningPlan:
    """The plan of the method ``config`` is the config of (``FlapConfig()``, ``BlockPrunerConfig(...)``, ...)
    for ``model``, which stays as it is (``apply_plan`` applies the plan).

    ``ratio``: the fraction of parameters to remove; ``speedup``: tell's measured-speedup budget instead.
    ``calib``: a text set (wiki, c4, a .txt/.jsonl file) drawn as ``nsamples`` rows of ``seqlen`` tokens with
    ``seed`` (defaults: those of ``secateurs prune``), or calibration rows themselves (a LongTensor [rows,
    tokens]). ``workers``: evaluate a search's candidates on that many Ray workers, each loading a replica by
    ``model_ref`` (default: the folder the model came from) with ``device``, ``dtype`` and ``max_memory`` (or on
    an open ``runtime.pool.WorkerPool``, left open).
    ``workdir``: where the method keeps resumable state (default: a temporary folder). The plan's ``record``
    holds what the method recorded. ``engine``: the engine the plan must run in (``defaults.PRUNE_ENGINES``:
    ``vllm`` keeps every query head), recorded in the plan's settings."""
    config = with_speedup(config, speedup)
    method = check_request(config, ratio, workers is not None, engine)
    device = device or input_device(model).type
    given = isinstance(calib, torch.Tensor)
    n, tokens = calib.shape if given else calibration_size(config, nsamples, seqlen, device.split(":")[0])[:2]
    check_model(method, config, model, ratio, engine, model_ref, (n, tokens))
    rows, name = (calib, "rows given") if given else (calib_rows(tokenizer, model, calib, n, tokens, seed), calib)
    ref = model_ref or getattr(model, "name_or_path", None)
    with ExitStack() as stack:
        folder = Path(workdir) if workdir is not None else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="secateurs-prune-")))
        folder.mkdir(parents=True, exist_ok=True)
        pool = workers if isinstance(workers, WorkerPool) or workers is None else stack.enter_context(
            open_pool(workers, ref, device, dtype, max_memory, workload(config, rows.shape[1])))
        ctx = PruneContext.build(model, rows, tokenizer=tokenizer, ratio=ratio, seed=seed, workdir=folder,
                                 progress=progress, pool=pool, model_ref=ref, engine=engine)
        plan = run_method(method, ctx, config)
    plan.meta = {"settings": {"model": ref, "method": method.name, "ratio": ratio, "calib": name,
                              "nsamples": rows.shape[0], "seqlen": rows.shape[1], "seed": seed,
                              "options": asdict(config), **({"engine": engine} if engine else {})}}
    return plan


# --- apply, measure, save -------------------------------------------------------------------------------
def apply_plan(model, plan: PruningPlan, spec=None):
    """Applies ``plan`` to the dense ``model`` in place (``surgery.apply_plan``) and returns it; the dense
    model's configuration and spec are kept on it for ``save``."""
    spec = spec or get_adapter(model).spec()
    dense = _plain_config(model.config)
    _apply(model, plan, spec)
    model.secateurs_dense = (dense, spec)
    return model


def evaluate(model, tokenizer, ppl: str = "wiki:test", rows: int = HELD_OUT_ROWS, seqlen: int = HELD_OUT_SEQLEN,
             batch_size: int = 4, progress: bool = False) -> dict:
    """Perplexity on each of the comma-separated text sets ``ppl`` (``rows`` rows of ``seqlen`` tokens, 0 =
    all: the defaults of ``secateurs eval``), as ``secateurs eval --json`` writes it: {set: {ppl, nll, tokens,
    seqlen, rows}}."""
    out = {}
    for name in (s for s in ppl.split(",") if s):
        r = perplexity(model, eval_rows(tokenizer, model, name, seqlen, rows), batch_size, progress=progress,
                       desc=f"{name} ppl")
        out[name] = r.as_dict()
    return out


def save(model, tokenizer, plan: PruningPlan, out: str | Path, overwrite: bool = False,
         result: dict | Callable[[Path], dict] | None = None) -> str:
    """Writes the pruned model as the folder ``secateurs prune`` writes (plan.json, the weights at their pruned
    shapes, config.json, secateurs.json, the tokenizer, result.json), which ``secateurs.load``, eval, bench,
    export, heal and report read; returns the export kind (stock or custom). ``model`` is the model
    ``apply_plan`` pruned, or a dense model placed layer by layer (--max-memory: the plan is applied as the
    folder is written). ``result``: what else result.json says (e.g. perplexities measured), or a function of
    the written folder that returns it (e.g. measuring the pruned model read back from it), called before the
    folder is renamed into place."""
    out = Path(out)
    check_out(out, overwrite)
    if onloader_of(model) is not None:
        dense, spec = _plain_config(model.config), get_adapter(model).spec()
    elif getattr(model, "secateurs_plan", None) is plan:
        dense, spec = model.secateurs_dense
    else:
        raise UserError("save writes the model this plan pruned: call secateurs.apply_plan(model, plan) first")
    settings = plan.meta.get("settings") or {}
    r = make_result(plan.method or "hand-made", settings.get("model"), settings,
                    plan_counts(plan, spec, settings.get("ratio")), held_out(None, None, 0, None, None), **plan.record)

    def text(folder: Path) -> str:
        return json.dumps(r | ((result(folder) if callable(result) else result) or {}), indent=1)

    return save_pruned(model, tokenizer, plan, dense, out, extra={"result.json": text})


# --- the other commands -----------------------------------------------------------------------------------
def heal(pruned: str | Path, out: str | Path, *, overwrite: bool = False, progress: bool = True,
         checkpoint_minutes: float = 5.0, teacher_cache: str | Path | None = None, **options) -> dict:
    """``secateurs heal``: heals the pruned folder ``pruned`` into ``out`` by distillation from its dense model;
    ``options`` are heal's (``heal.HealSettings``: data, tokens, loss, lora_rank, ...). Returns heal.json's
    record, with the healed model and tokenizer under ``_model`` and ``_tokenizer``."""
    from .heal import HealSettings, run_heal

    return run_heal(HealSettings(source=str(pruned), **options), out, overwrite=overwrite, progress=progress,
                    log=print if progress else (lambda *_: None), checkpoint_minutes=checkpoint_minutes,
                    teacher_cache_dir=teacher_cache)


def export(model, tokenizer, out: str | Path, type: str = "f32", *, overwrite: bool = False, threads: int | None = None,
           progress: bool = True, model_ref: str | None = None, format: str = "gguf") -> dict:
    """``secateurs export``: the model (dense, or pruned by ``apply_plan``) as a GGUF file for llama.cpp, of
    tensor type ``type``, or (``format="vllm"``) as a folder vLLM serves (``type``: auto, f32, f16, bf16);
    returns the export summary."""
    if format == "vllm":
        from .export.vllm import check_request as check_vllm, export_model as export_vllm

        check_vllm(type, str(out), overwrite)
        return export_vllm(model_ref or getattr(model, "name_or_path", "model"), str(out), type, progress, model=model,
                           tokenizer=tokenizer)
    from .export.gguf import check_request as check_gguf, export_model

    check_gguf(format, type, str(out), overwrite)
    return export_model(model_ref or getattr(model, "name_or_path", "model"), str(out), type, threads,
                        progress=progress, model=model, tokenizer=tokenizer)


def bench(model: str, against: str | None = None, *, prompt_len: int = 512, decode_tokens: int = 128, warmup: int = 2,
          reps: int = 5, seed: int = 0, memory: bool = True, device: str = "cpu", dtype: str = "auto",
          threads: int | None = None, flash_attn: bool = False, progress: bool = False, clock: str = "cpu") -> dict:
    """``secateurs bench``: prefill latency, decode throughput, peak memory, parameters and FLOPs of the model
    named ``model`` (a name, folder, pruned folder or .gguf file), side by side with ``against``; the
    dictionary of ``bench --json``."""
    from .eval.bench import BenchSettings
    from .eval.engines import same_engine

    s = BenchSettings(prompt_len=prompt_len, decode_tokens=decode_tokens, warmup=warmup, reps=reps, seed=seed, clock=clock)
    s.validate()
    return same_engine(model, against).bench(model, against, asdict(s), device=device, threads=threads, memory=memory,
                                             progress=progress, flash_attn=flash_attn, dtype=dtype)
