"""Placing a model: in the working dtype, on the compute device, whole (today's fast path), split across the
GPUs by accelerate's ``device_map``, or layer by layer (onloaded) when ``--max-memory`` says it does not fit.

The decision (``place``): without ``--max-memory`` the model is loaded whole onto ``--device`` (or, with
``--device cuda`` on a machine with several GPUs that one cannot hold, split across them). With a budget, the
model is loaded whole if its weights plus one batch's working set fit the compute device's budget; else split
across GPUs if their budgets hold it; else onloaded, provided the budget holds at least what layer-by-layer
work needs (``estimate.min_budget``: a ``UserError`` names that size otherwise).

Every placement is recorded on the model as ``model.secateurs_placement`` (mode, device, dtype, budget), which
``result.json`` reports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from .estimate import min_budget, model_sizes, reserve_bytes, working_bytes
from .onload import Onloader, build_skeleton, materialize, resolve_keys
from .placement import Budget, format_size
from .precision import check_device, checkpoint_dtype, dtype_name, resolve_dtype
from .st_io import SafetensorsSource

DEFAULT_WORKLOAD = (4, 512)  # (rows per batch, tokens per row) assumed when the caller does not say


def _note(log, text: str) -> None:
    if log is not None:
        log(f"secateurs: {text}")


def working_dtype(dtype, device, config, log=print) -> torch.dtype:
    """The working dtype (``runtime.precision``); says so when it differs from the checkpoint's."""
    ckpt = checkpoint_dtype(config)
    dt = resolve_dtype(dtype, device, ckpt)
    if ckpt is not None and ckpt != dt and (dtype is None or dtype == "auto"):
        _note(log, f"the checkpoint is {dtype_name(ckpt)}; computing in {dtype_name(dt)} on {torch.device(device).type} "
                   "(--dtype auto; --dtype NAME chooses)")
    return dt


def _meta_model(config, dtype):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def budget_check(sizes, budget: Budget, workload, what: str = "this model") -> None:
    batch, seqlen = workload
    floor = min_budget(sizes, batch, seqlen)
    if budget.device_bytes < floor:
        raise UserError(
            f"--max-memory: {format_size(budget.device_bytes)} on {budget.device} is smaller than one layer of {what} "
            f"needs; the smallest budget that works is {format_size(floor, up=True)} (the largest layer or head block "
            f"{format_size(sizes.unit_bytes)}, one batch of {batch} x {seqlen} tokens "
            f"{format_size(working_bytes(sizes, batch, seqlen))}, resident norms {format_size(sizes.other_bytes)})")


def _gpu_device_map(meta_model, sizes, workload, max_memory: dict | None):
    """accelerate's device map over the GPUs present (their ``--max-memory`` sizes, else their free memory), or
    None when they cannot hold the model (then it is onloaded) or there is only one."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    from accelerate import infer_auto_device_map

    work = working_bytes(sizes, *workload)
    gpus = {}
    for i in range(torch.cuda.device_count()):
        cap = (max_memory or {}).get(f"cuda:{i}", torch.cuda.mem_get_info(i)[0])
        gpus[i] = max(0, cap - work)
    if sum(gpus.values()) < sizes.weights:
        return None
    dm = infer_auto_device_map(meta_model, max_memory=gpus, no_split_module_classes=meta_model._no_split_modules,
                               dtype=next(meta_model.parameters()).dtype)
    if any(not isinstance(v, int) for v in dm.values()):
        return None
    return dm


def place(folder: str, config, dtype=None, device="cpu", max_memory=None, spill_dir: Path | None = None,
          workload=None, trust_remote_code: bool = False, log=print):
    """The dense model of ``folder`` (a local folder or a hub id) placed as the module docstring says."""
    from transformers import AutoModelForCausalLM

    dev = check_device(device)
    dt = working_dtype(dtype, dev, config, log)
    mm = max_memory  # parse_max_memory's dict: parsed where the budget entered
    workload = workload or DEFAULT_WORKLOAD
    meta_model = _meta_model(config, dt)
    sizes = model_sizes(meta_model, dt)
    multi = dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1
    budget = Budget.from_max_memory(mm, dev, spill_dir) if mm is not None else None
    fits = budget is None or sizes.weights + working_bytes(sizes, *workload) <= budget.device_bytes
    if multi and (budget is not None or sizes.weights + working_bytes(sizes, *workload) > torch.cuda.mem_get_info(0)[0]):
        dm = _gpu_device_map(meta_model, sizes, workload, mm)
        if dm is not None:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt, device_map=dm, trust_remote_code=trust_remote_code)
            model.config.dtype = dt
            model.secateurs_placement = {"mode": "device_map", "device": "cuda", "dtype": dtype_name(dt),
                                         "devices": sorted({str(v) for v in dm.values()}), "max_memory": mm}
            return model.eval()
    if fits:
        kw = {"device_map": str(dev)} if dev.type == "cuda" else {}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt, trust_remote_code=trust_remote_code, **kw)
        model.to(dev)
        model.config.dtype = dt
        model.secateurs_placement = {"mode": "resident", "device": str(dev), "dtype": dtype_name(dt), "max_memory": mm}
        return model.eval()
    budget_check(sizes, budget, workload)
    local = _local_folder(folder)
    skel = build_skeleton(config, dt, dev)
    try:  # what from_pretrained would read too
        from transformers import GenerationConfig

        skel.generation_config = GenerationConfig.from_pretrained(local)
    except OSError:
        pass
    _onload(skel, SafetensorsSource(local), dev, dt, budget, sizes, workload, mm)
    _note(log, f"{format_size(sizes.weights)} of weights over a {format_size(budget.device_bytes)} budget on {dev}: "
               "layer by layer (weights read from the checkpoint as each layer runs)")
    return skel


def _onload(skel, source, dev, dt, budget, sizes, workload, mm):
    ol = Onloader(skel, source, dev, dt, budget, reserve=reserve_bytes(sizes, *workload))
    skel.secateurs_placement = {"mode": "onload", "device": str(dev), "dtype": dtype_name(dt), "max_memory": mm,
                                "budget_bytes": budget.device_bytes, "reserve_bytes": ol.reserve}
    return ol


def from_skeleton(make_skeleton: Callable[[torch.dtype, torch.device], torch.nn.Module], folder: Path, dtype,
                  device, max_memory=None, spill_dir: Path | None = None, workload=None):
    """A model built by ``make_skeleton(dtype, device)`` (parameters on the meta device, at their final shapes)
    with its weights from ``folder``'s safetensors: read whole if they fit (or no budget is given), else onloaded.
    Nothing is built at another shape first."""
    dev = check_device(device)
    mm = max_memory  # parse_max_memory's dict: parsed where the budget entered
    workload = workload or DEFAULT_WORKLOAD
    skel = make_skeleton(dtype, dev)
    source = SafetensorsSource(folder)
    sizes = model_sizes(skel, dtype)
    budget = Budget.from_max_memory(mm, dev, spill_dir) if mm is not None else None
    if budget is None or sizes.weights + working_bytes(sizes, *workload) <= budget.device_bytes:
        materialize(skel, source, resolve_keys(skel, source), dtype, dev)
        source.close()
        skel.secateurs_placement = {"mode": "resident", "device": str(dev), "dtype": dtype_name(dtype), "max_memory": mm}
        return skel
    budget_check(sizes, budget, workload, "this pruned model")
    _onload(skel, source, dev, dtype, budget, sizes, workload, mm)
    return skel


def _local_folder(name: str) -> str:
    """A hub id's local snapshot (weights and configuration), downloaded if needed; a folder as it is."""
    if Path(name).is_dir():
        return name
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:  # noqa: BLE001 - offline, unknown id...: say what failed
        raise UserError(f"could not fetch {name!r} for layer-by-layer loading: {str(e).splitlines()[0]}") from e
