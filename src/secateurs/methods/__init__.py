"""The method registry: a method is a config dataclass (a ``MethodConfig``) plus a function
``(ctx, cfg) -> PruningPlan``.

Modules in this package register themselves with ``@register_method``; they are imported on first use of the
registry, so adding a method is adding a file. Config fields become ``secateurs prune`` options
(``--field-name``); a field's ``metadata={"help": ...}`` is its help text. What the library asks of a method
(its ratio rule, reach, whether it searches or runs on the worker pool, its estimates and option checks) is
said by its config class, in one place.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from ..defaults import KEEP_HEADS_ENGINES, PRUNE_ENGINES
from ..errors import UserError
from ..importance.width import width_reach
from ..models import get_adapter
from ..models.base import Adapter, ModelSpec
from ..plan import WIDTH, PruningPlan, RatioRule, check_ratio, check_ratio_reached
from ..runtime.estimate import input_stats

PASS_ROWS = 4  # calibration rows per forward pass of a method without --batch-size (and of the perplexities)


@dataclass
class MethodConfig:
    """A method's options (the dataclass fields of a subclass) and what the library asks of the method. A
    subclass overrides what differs from these defaults."""

    needs_ratio: ClassVar[bool] = True  # --ratio is required (else the method checks its own budget in ``check``)
    rule: ClassVar[RatioRule] = WIDTH  # how its plans meet --ratio, as `methods` and --help say it
    searches: ClassVar[bool] = False  # a search: on a CPU the default calibration is small (api.calibration_size)
    parallel: ClassVar[bool] = False  # evaluates candidates on a worker pool when given one (--workers)
    # query heads: "kept" (never narrowed: depth methods), "optional" (kept when the engine asks, ``PruneContext.
    # keep_heads``: --engine vllm; flap, wanda-sp, tell), "narrowed" (narrowed per layer; cannot honour --engine vllm yet)
    query_heads: ClassVar[str] = "narrowed"
    parallel_when: ClassVar[str] = ""  # the options under which it does, where only some do (a property then)

    def check(self, ratio: float | None) -> None:
        """The options and the budget, before any work: a UserError saying what is wrong and what is accepted."""
        if self.needs_ratio or ratio is not None:
            check_ratio(ratio)

    def check_placement(self, onloaded: bool) -> None:
        """The placement, once the model is placed (``onloaded``: layer by layer, under --max-memory)."""

    def check_loaded(self, model, model_ref: str | None) -> None:
        """What else must hold beside the loaded model before any work (a UserError when it does not);
        ``model_ref``: the model as the command named it (None through the API)."""

    def check_calibration(self, model, rows: int, seqlen: int) -> None:
        """What must hold of the calibration size (``rows`` x ``seqlen`` tokens) for the loaded model, before
        the rows are drawn (a UserError when it does not)."""

    def ratio_rule(self) -> RatioRule:
        """The rule this run's plan is checked by (``run_method``), where options change it."""
        return self.rule

    def reach(self, spec: ModelSpec) -> float | None:
        """The largest ratio the method can reach on this model (None where it cannot tell before it runs)."""
        return None

    def stock_plans(self) -> bool:
        """Whether every plan of these options runs as the model's stock architecture (whole layers removed, or
        every layer at one width with no added bias): the only plans vLLM holds of a model type that its DeciLM
        model cannot (``check_engine_model``)."""
        return self.rule.unit == "layers"

    def pass_rows(self) -> int:
        """Calibration rows per forward pass (a method's --batch-size)."""
        return PASS_ROWS

    def evaluations(self, spec: ModelSpec, ratio: float | None, rows: int, engine: str | None = None) -> tuple[int, int, str]:
        """(evaluations, calibration rows per evaluation, what is counted) the run will do (``runtime.estimate``) for
        ``engine`` (--engine)."""
        return 1, rows, "one calibration pass"

    def cached_work(self, model, calib, seed: int, engine: str | None = None, model_ref: str | None = None) -> str | None:
        """For ``prune --dry-run``: a line on what the estimate of the evaluations leaves out: how much of the
        counted work is already cached, or what else the search costs (None: nothing to say). ``model_ref``: the
        model as the command named it."""
        return None

    def held(self, sizes, rows: int, seqlen: int, onload: bool) -> list:
        """What the method keeps beyond the weights and one batch's working set (``runtime.estimate.Held``),
        for ``sizes`` (``runtime.estimate.ModelSizes``) and this calibration."""
        return []


class WidthConfig(MethodConfig):
    """The width methods' common part (flap, wanda-sp): a ``batch_size`` field (rows per forward pass), the
    width reach, the input statistics they gather; they keep every query head when the engine asks."""

    query_heads = "optional"

    def check(self, ratio) -> None:
        super().check(ratio)
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {self.batch_size})")

    def reach(self, spec):
        return width_reach(spec)

    def pass_rows(self) -> int:
        return self.batch_size

    def held(self, sizes, rows, seqlen, onload):
        return [input_stats(sizes)]


def keeps_heads(engine: str | None) -> bool:
    """Whether plans for ``engine`` (--engine, ``defaults.PRUNE_ENGINES``) must keep every query head: vLLM's
    DeciLM model has one query-head count for all layers (docs/vllm.md)."""
    return engine in KEEP_HEADS_ENGINES


@dataclass
class PruneContext:
    """Everything a method may use. ``workdir`` holds resumable state; ``count_ppl`` counts evaluations.
    Built by ``PruneContext.build`` (the API's one way to make one)."""

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
    pool: Any = None  # runtime.pool.WorkerPool (--workers) for methods whose config is parallel, else None
    model_ref: str | None = None  # how the user named the model (embedded name, folder, hub id)
    engine: str | None = None  # --engine: the engine the plan must run in (defaults.PRUNE_ENGINES); None: any

    @property
    def keep_heads(self) -> bool:
        """Whether the plan must keep every query head (--engine vllm)."""
        return keeps_heads(self.engine)

    @classmethod
    def build(cls, model, calib: torch.Tensor | None, *, tokenizer=None, ratio: float | None = None, seed: int = 0,
              workdir: str | Path, progress: bool = True, pool=None, model_ref: str | None = None,
              engine: str | None = None) -> "PruneContext":
        adapter = get_adapter(model)
        return cls(model, tokenizer, adapter, adapter.spec(), calib, ratio, seed, Path(workdir), progress, pool=pool,
                   model_ref=model_ref, engine=engine)

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

    @property
    def ratio_rule(self) -> RatioRule:
        """How the method meets a target ratio, as `methods` and --help say it."""
        return self.config_cls.rule

    @property
    def parallel(self) -> bool:
        return self.config_cls.parallel


_REGISTRY: dict[str, MethodSpec] = {}
_LOADED = False


def register_method(name: str, summary: str, config_cls: type):
    """Registers ``fn(ctx, cfg) -> PruningPlan`` as method ``name``; ``config_cls`` (a ``MethodConfig``
    dataclass) holds its options and says what the library needs to know of it."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
        raise TypeError(f"the config of method {name} must be a MethodConfig dataclass (got {config_cls!r})")

    def deco(fn):
        _REGISTRY[name] = MethodSpec(name, summary, config_cls, fn)
        return fn

    return deco


def check_engine(spec: MethodSpec, cfg, engine: str | None) -> None:
    """A UserError, before any work, when the method cannot make plans that ``engine`` (--engine) runs."""
    if engine is not None and engine not in PRUNE_ENGINES:
        raise UserError(f"unknown --engine {engine!r}; use one of {', '.join(PRUNE_ENGINES)}")
    if keeps_heads(engine) and cfg.query_heads == "narrowed":
        raise UserError(f"--engine {engine} needs every query head kept, and {spec.name} narrows heads per layer (it "
                        f"cannot keep them yet); methods that can: {', '.join(head_keeping_methods())}")


def check_engine_model(spec: MethodSpec, cfg, adapter, engine: str | None) -> None:
    """A UserError, once the model is loaded and before any work, when ``engine`` cannot hold any plan of this
    method on this model type: vLLM holds uneven plans only of the types its DeciLM model can (``VllmArch``)."""
    if engine != "vllm":
        return
    mt, arch = adapter.config.model_type, adapter.vllm_arch()
    if arch is None:
        raise UserError(f"--engine vllm: no vLLM export for model_type={mt!r}")
    if not arch.deci and not cfg.stock_plans():
        stock = [m.name for m in all_methods().values() if _default_stock(m)]
        raise UserError(f"--engine vllm on {mt}: vLLM holds only its stock plans (whole layers removed, or every "
                        f"layer at one width with no added bias; uneven plans: {arch.why_not}), and {spec.name} with "
                        f"these options makes uneven plans; methods that make stock plans (with their default options): "
                        f"{', '.join(stock)}")


def _default_stock(spec: MethodSpec) -> bool:
    try:
        return spec.config_cls().stock_plans()
    except TypeError:  # a config without defaults for every option
        return False


def head_keeping_methods() -> list[str]:
    """The methods that make plans keeping every query head, when asked (``prune --engine vllm``) or always."""
    return [m.name for m in all_methods().values() if m.config_cls.query_heads != "narrowed"]


def check_reach(spec: MethodSpec, model: ModelSpec, ratio: float | None, cfg) -> None:
    """A UserError, before any work, when the target ratio is beyond what the method can remove on this model."""
    top = cfg.reach(model) if ratio is not None else None
    if top is not None and ratio > top + 1e-12:
        raise UserError(f"target ratio {ratio} is out of reach for {spec.name} on this model: the most it can "
                        f"remove is {top:.4f}")


def run_method(spec: MethodSpec, ctx: PruneContext, cfg) -> PruningPlan:
    """The method's plan, checked against its promise: with a target ratio, the plan meets it by the rule of
    this run (``cfg.ratio_rule()``), or this is a UserError that says what was reached. The plan carries what
    the method recorded (``PruningPlan.record``: result.json's ``method_details`` and ``ppl_evaluations``)."""
    plan = spec.fn(ctx, cfg)
    if ctx.ratio is not None:
        check_ratio_reached(plan, ctx.spec, ctx.ratio, cfg.ratio_rule(), spec.name)
    plan.method = spec.name
    plan.record = {"ppl_evaluations": ctx.ppl_evaluations, **({"method_details": ctx.extra} if ctx.extra else {})}
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


def method_for(cfg) -> MethodSpec:
    """The method whose config ``cfg`` is (dispatch on the config's type)."""
    for m in all_methods().values():
        if type(cfg) is m.config_cls:
            return m
    names = ", ".join(m.config_cls.__name__ for m in all_methods().values())
    raise UserError(f"{type(cfg).__name__} is not a method config; give one of {names}")


def make_config(spec: MethodSpec, options: dict):
    """Builds the method's config from the options that name its fields (others are ignored)."""
    names = {f.name for f in fields(spec.config_cls)}
    return spec.config_cls(**{k: v for k, v in options.items() if k in names and v is not None})
