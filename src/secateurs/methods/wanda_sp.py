"""wanda-sp: structured Wanda. Heads and MLP channels are scored by ``mean_r |W_rj| * ||X_j||_2`` on the input
columns of ``o_proj`` / ``down_proj`` (importance/width.py); every layer loses the lowest-scoring units at its
rate (a uniform rate solved from the target ratio, or a given rate per layer). Layers are pruned in order and
each is calibrated on the outputs of the layers before it *as pruned* (``importance/sequential.py``; the model
stays dense until the pipeline applies the plan)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..importance.sequential import sequential_plan
from ..importance.width import max_rate, mean_rate_for_ratio
from ..plan import PruningPlan
from ..runtime.estimate import Held, hidden_bytes
from . import PruneContext, WidthConfig, register_method


@dataclass
class WandaSpConfig(WidthConfig):
    needs_ratio = False  # --ratio or --rates (check)

    rates: str | None = field(default=None, metadata={
        "help": "per-layer rates instead of --ratio: comma-separated numbers (one per layer) or a JSON file with a list"})
    batch_size: int = field(default=4, metadata={"help": "calibration rows per forward pass"})

    def check(self, ratio) -> None:
        super().check(ratio)
        if (self.rates is None) == (ratio is None):
            raise UserError("wanda-sp needs exactly one of --ratio (uniform rate) and --rates (one rate per layer)")

    def stock_plans(self) -> bool:
        return self.rates is None  # one uniform rate: every layer keeps the same heads and channels

    def held(self, sizes, rows, seqlen, onload):
        return [Held("hidden states of the calibration rows", hidden_bytes(sizes, rows, seqlen)),
                *super().held(sizes, rows, seqlen, onload)]


def parse_rates(text: str, spec) -> list[float]:
    """``--rates``: comma-separated numbers or a JSON file holding a list (or an object with "rates")."""
    p = Path(text)
    try:
        if p.suffix == ".json" or p.is_file():
            data = json.loads(p.read_text())
            rates = data["rates"] if isinstance(data, dict) else data
        else:
            rates = [float(x) for x in text.split(",") if x.strip()]
        rates = [float(x) for x in rates]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--rates: expected comma-separated numbers or a JSON file with a list ({e})") from e
    hi = max_rate(spec)
    if len(rates) != spec.n_layers or not all(0.0 <= r <= hi for r in rates):
        raise UserError(f"--rates: expected {spec.n_layers} numbers in [0, {hi:.3f}] (got {len(rates)}: {rates[:4]}...)")
    return rates


@register_method("wanda-sp", "structured Wanda: lowest |W|*||X|| heads and channels per layer, uniform or given "
                 "per-layer rates, layers calibrated in order", WandaSpConfig)
def wanda_sp(ctx: PruneContext, cfg: WandaSpConfig) -> PruningPlan:
    if cfg.rates is not None:
        rates = parse_rates(cfg.rates, ctx.spec)
    else:
        rates = [mean_rate_for_ratio(ctx.spec, ctx.ratio)] * ctx.spec.n_layers
    plan = sequential_plan(ctx, rates, cfg.batch_size)
    ctx.record(rates=rates, kept=plan.kept_fraction(ctx.spec))
    return plan
