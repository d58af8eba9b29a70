"""The method registry: a method is a config dataclass plus a function ``(ctx, cfg) -> PruningPlan``.

Modules in this package register themselves with ``@register_method``; they are imported on first use of the
registry, so adding a method is adding a file. Config fields become ``secateurs prune`` options
(``--field-name``); a field's ``metadata={"help": ...}`` is its help text.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UserError
from ..models.base import Adapter, ModelSpec
from ..plan import WIDTH, PruningPlan, RatioRule, check_ratio_reached


@dataclass
class PruneContext:
    """Everything a method may use. ``workdir`` holds resumable state; ``count_ppl`` counts evaluations."""

    model: torch.nn.Module
    tokenizer: Any
    adapter: Adapter
    spec: ModelSpec
    calib: torch.Tensor  # calibration rows [nsamples, seqlen]
    ratio: float | None  # target parameter ratio (None when the method stops by another rule)
    seed: int
    workdir: Path
    progress: bool = True
    ppl_evaluations: int = 0
    extra: dict | None = None  # results a method wants recorded in result.json (e.g. per-block scores)
    pool: Any = None  # runtime.pool.WorkerPool (--workers) for methods registered with parallel=True, else None
    model_ref: str | None = None  # how the user named the model (embedded name, folder, hub id)

    def count_ppl(self, n: int = 1) -> None:
        self.ppl_evaluations += n

    def record(self, **kv) -> None:
        self.extra = {**(self.extra or {}), **kv}


@dataclass
class MethodSpec:
    name: str
    summary: str
    config_cls: type
    fn: Callable[[PruneContext, Any], PruningPlan]
    needs_ratio: bool = True
    ratio_rule: RatioRule = WIDTH  # how the plan meets --ratio (plan.RatioRule), as `methods` and --help say it
    reach: Callable[[ModelSpec, Any], float | None] | None = None  # (spec, cfg) -> the largest ratio it can reach
    parallel: bool = False  # evaluates candidates on a worker pool when given one (--workers)
    rule_for: Callable[[Any], RatioRule] | None = None  # cfg -> the rule of one run, where options change it

    def rule(self, cfg) -> RatioRule:
        """The rule one run's plan is checked by (``run_method``)."""
        return self.rule_for(cfg) if self.rule_for else self.ratio_rule


_REGISTRY: dict[str, MethodSpec] = {}
_LOADED = False


def register_method(name: str, summary: str, config_cls: type, needs_ratio: bool = True, ratio_rule: RatioRule = WIDTH,
                    reach=None, parallel: bool = False, rule_for=None):
    """``ratio_rule``: how the method meets a target ratio (the tolerance it promises); ``rule_for(cfg)``: the
    rule of one run, for methods whose options change it; ``reach(spec, cfg)``: the largest ratio it can reach on
    a model (None where it cannot tell before it runs), checked before any work; ``parallel``: it evaluates
    candidates on a worker pool when given one (--workers)."""
    def deco(fn):
        _REGISTRY[name] = MethodSpec(name, summary, config_cls, fn, needs_ratio, ratio_rule, reach, parallel, rule_for)
        return fn

    return deco


def check_reach(spec: MethodSpec, model: ModelSpec, ratio: float | None, cfg) -> None:
    """A UserError, before any work, when the target ratio is beyond what the method can remove on this model."""
    top = spec.reach(model, cfg) if spec.reach and ratio is not None else None
    if top is not None and ratio > top + 1e-12:
        raise UserError(f"target ratio {ratio} is out of reach for {spec.name} on this model: the most it can "
                        f"remove is {top:.4f}")


def run_method(spec: MethodSpec, ctx: PruneContext, cfg) -> PruningPlan:
    """The method's plan, checked against its promise: with a target ratio, the plan meets it by the method's
    rule (``MethodSpec.rule``), or this is a UserError that says what was reached."""
    plan = spec.fn(ctx, cfg)
    if ctx.ratio is not None:
        check_ratio_reached(plan, ctx.spec, ctx.ratio, spec.rule(cfg), spec.name)
    return plan


def _load_all() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for m in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{m.name}")


def all_methods() -> dict[str, MethodSpec]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> MethodSpec:
    methods = all_methods()
    if name not in methods:
        raise UserError(f"unknown method {name!r}; available: {', '.join(methods)}")
    return methods[name]


def make_config(spec: MethodSpec, options: dict):
    """Builds the method's config from the options that name its fields (others are ignored)."""
    names = {f.name for f in fields(spec.config_cls)}
    return spec.config_cls(**{k: v for k, v in options.items() if k in names and v is not None})
