"""The pruning plan: the one data structure every method produces and everything else consumes.

Per layer it says whether the attention block and the MLP block are kept, which query heads and which MLP
channels are kept (original indices), and any bias compensation added to the output projections.

Head units and GQA: a unit is a *query head*. Inside a layer every kept key/value group keeps the same number
of query heads, so the stock attention code (``repeat_kv`` with ``num_key_value_groups``) stays valid; a
key/value head goes when its whole group goes. This lets models with one KV head (Gemma-3-270M) be
narrowed too. ``select_heads`` turns per-head scores and a head budget into a valid selection.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError
from .files import atomic_write_text
from .models.base import Block, ModelSpec, all_blocks

FORMAT = "secateurs-plan/1"


@dataclass
class LayerPlan:
    attn: bool = True  # attention block kept
    mlp: bool = True  # MLP block kept
    heads: list[int] | None = None  # kept query heads; None = all
    channels: list[int] | None = None  # kept MLP channels; None = all
    attn_bias: list[float] | None = None  # bias compensation added to o_proj output
    mlp_bias: list[float] | None = None  # bias compensation added to down_proj output

    def kept_heads(self, spec: ModelSpec) -> list[int]:
        if not self.attn:
            return []
        return list(range(spec.n_heads)) if self.heads is None else list(self.heads)

    def kept_kv(self, spec: ModelSpec) -> list[int]:
        g = spec.group_size
        return sorted({h // g for h in self.kept_heads(spec)})

    def kept_channels(self, spec: ModelSpec) -> list[int]:
        if not self.mlp:
            return []
        return list(range(spec.intermediate)) if self.channels is None else list(self.channels)

    @property
    def is_dense(self) -> bool:
        return self.attn and self.mlp and self.heads is None and self.channels is None and not self.attn_bias and not self.mlp_bias


@dataclass
class PruningPlan:
    layers: list[LayerPlan]
    dims: dict  # the dense model's sizes (ModelSpec.as_dict), checked when the plan is applied
    method: str = ""
    meta: dict = field(default_factory=dict)
    # what the method recorded while making it (result.json's method_details, ppl_evaluations); not in plan.json
    record: dict = field(default_factory=dict, compare=False, repr=False)

    # --- construction --------------------------------------------------------------------------------
    @classmethod
    def dense(cls, spec: ModelSpec, method: str = "") -> "PruningPlan":
        return cls([LayerPlan() for _ in range(spec.n_layers)], spec.as_dict(), method)

    @classmethod
    def from_removed_blocks(cls, spec: ModelSpec, removed: list[tuple[int, str]], method: str = "") -> "PruningPlan":
        """A depth plan: ``removed`` lists (layer, 'attn'|'mlp') blocks."""
        plan = cls.dense(spec, method)
        for layer, kind in removed:
            setattr(plan.layers[layer], kind, False)
        return plan

    # --- accounting ----------------------------------------------------------------------------------
    def params(self, spec: ModelSpec) -> int:
        """Parameters of the model after this plan (papers' definition: everything, tied weights once)."""
        total = spec.total_params
        for i, lp in enumerate(self.layers):
            total -= sum(removed_params(spec, i, lp).values())
            total += added_params(spec, lp)
        return total

    def ratio(self, spec: ModelSpec) -> float:
        return 1.0 - self.params(spec) / spec.total_params

    def removed_blocks(self) -> list[Block]:
        return [b for b in all_blocks(len(self.layers)) if not getattr(self.layers[b.layer], b.kind)]

    def kept_fraction(self, spec: ModelSpec) -> list[dict]:
        """Per layer, the kept fraction of attention heads and MLP channels (0 for a removed block)."""
        return [
            {"attn": len(lp.kept_heads(spec)) / spec.n_heads, "mlp": len(lp.kept_channels(spec)) / spec.intermediate}
            for lp in self.layers
        ]

    @property
    def engine(self) -> str | None:
        """The engine the plan was made for (``prune --engine``, in its settings); None: no constraint."""
        return (self.meta.get("settings") or {}).get("engine") or None

    # --- validation ----------------------------------------------------------------------------------
    def validate(self, spec: ModelSpec) -> None:
        """Raises UserError naming what does not fit the model."""
        mine = {k: self.dims.get(k) for k in spec.as_dict()}
        if mine != spec.as_dict():
            diff = {k: (mine[k], v) for k, v in spec.as_dict().items() if mine[k] != v}
            raise UserError(f"plan does not fit this model: (plan, model) differ in {diff}")
        if len(self.layers) != spec.n_layers:
            raise UserError(f"plan has {len(self.layers)} layers, the model has {spec.n_layers}")
        for i, lp in enumerate(self.layers):
            if lp.heads is not None:
                _check_indices(lp.heads, spec.n_heads, f"layer {i} heads")
                if not lp.heads:
                    raise UserError(f"plan layer {i}: an empty head list is not allowed; remove the attention block instead")
                counts = {}
                for h in lp.heads:
                    counts[h // spec.group_size] = counts.get(h // spec.group_size, 0) + 1
                if len(set(counts.values())) > 1:
                    raise UserError(
                        f"plan layer {i}: kept query heads per key/value group must be equal (got {counts}); "
                        "use secateurs.plan.select_heads to build a valid selection"
                    )
            if lp.channels is not None:
                _check_indices(lp.channels, spec.intermediate, f"layer {i} channels")
                if not lp.channels:
                    raise UserError(f"plan layer {i}: an empty channel list is not allowed; remove the MLP block instead")
            for name in ("attn_bias", "mlp_bias"):
                b = getattr(lp, name)
                if b is not None and (len(b) != spec.hidden or not all(math.isfinite(x) for x in b)):
                    raise UserError(f"plan layer {i}: {name} must be {spec.hidden} finite numbers")

    # --- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "method": self.method, "dims": self.dims, "meta": self.meta,
                "layers": [{k: v for k, v in asdict(lp).items() if v is not None} for lp in self.layers]}

    @classmethod
    def from_dict(cls, d: dict) -> "PruningPlan":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise UserError(f"not a secateurs plan: expected a JSON object with \"format\": \"{FORMAT}\"")
        try:
            layers = []
            for i, ld in enumerate(d["layers"]):
                unknown = set(ld) - set(LayerPlan.__dataclass_fields__)
                if unknown:
                    raise UserError(f"plan layer {i}: unknown keys {sorted(unknown)}")
                layers.append(LayerPlan(**ld))
                if not isinstance(layers[-1].attn, bool) or not isinstance(layers[-1].mlp, bool):
                    raise UserError(f"plan layer {i}: attn and mlp must be true or false")
            return cls(layers, dict(d["dims"]), d.get("method", ""), dict(d.get("meta", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"corrupt plan: {e!r}; expected keys format, dims, layers") from e

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise UserError(f"cannot read plan file {path}: {e.strerror}") from e
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"plan file {path} is not valid JSON ({e.msg} at line {e.lineno})") from e
        return cls.from_dict(d)


# --- parameter accounting by unit kind (the plan's size and the cost model's predictions both use it) -------
UNIT_KINDS = ("attn_width", "mlp_width", "attn_block", "mlp_block")


def removed_params(spec: ModelSpec, i: int, lp: LayerPlan) -> dict:
    """Parameters layer ``i``'s plan removes, by unit kind: a removed block counts whole; in a kept block, its
    removed query heads, the key/value heads whose groups emptied, and its removed channels."""
    out = {}
    if not lp.attn:
        out["attn_block"] = spec.block_params(i, "attn")
    else:
        out["attn_width"] = ((spec.n_heads - len(lp.kept_heads(spec))) * spec.q_head_params
                             + (spec.n_kv - len(lp.kept_kv(spec))) * spec.kv_head_params)
    if not lp.mlp:
        out["mlp_block"] = spec.block_params(i, "mlp")
    else:
        out["mlp_width"] = (spec.intermediate - len(lp.kept_channels(spec))) * spec.channel_params
    return out


def added_params(spec: ModelSpec, lp: LayerPlan) -> int:
    """Parameters a layer plan adds: a bias for an output projection that gets compensation and had none."""
    attn = lp.attn and bool(lp.attn_bias) and not spec.o_has_bias
    mlp = lp.mlp and bool(lp.mlp_bias) and not spec.down_has_bias
    return (int(attn) + int(mlp)) * spec.hidden


# --- ratio checks ----------------------------------------------------------------------------------------
def check_ratio(ratio, name: str = "--ratio") -> float:
    """The one check of a target parameter ratio (a number, or its text): strictly between 0 and 1. Returns it
    as a float; anything else is a UserError that says what was given and what is accepted."""
    try:
        v = float(ratio)
    except (TypeError, ValueError):
        v = None
    if v is None or not 0.0 < v < 1.0:
        raise UserError(f"{name} must be a number strictly between 0 and 1 (got {ratio!r})")
    return v


@dataclass(frozen=True)
class RatioRule:
    """How a method meets a target ratio (``--ratio``), the tolerance it promises. Methods that remove whole
    units (``unit``: layers, blocks) land on the first reachable ratio at or above the target: they overshoot
    by less than one unit. Width methods land within ``tolerance`` of the target, above or below."""

    unit: str | None = None  # whole units removed ("layers", "blocks"); None: width
    tolerance: float = 0.005
    text: str = ""  # how it is said, where the default wording does not fit

    def describe(self) -> str:
        if self.text:
            return self.text
        if self.unit:
            return f"the first reachable ratio >= the target (whole {self.unit})"
        return f"within {self.tolerance} of the target"

    def met(self, achieved: float, target: float) -> bool:
        if self.unit:
            return achieved >= target - 1e-12
        return abs(achieved - target) <= self.tolerance + 1e-12


WIDTH = RatioRule()


def check_ratio_reached(plan: PruningPlan, spec: ModelSpec, target: float, rule: RatioRule = WIDTH,
                        method: str = "the method") -> None:
    """The promise every method keeps: its plan meets ``target`` by its ``rule``; otherwise a UserError that
    says what was reached (methods that cannot reach a target say so before they search, where they can)."""
    got = plan.ratio(spec)
    if not rule.met(got, target):
        raise UserError(f"{method} reached ratio {got:.4f}, which misses the target {target} by its rule "
                        f"({rule.describe()}); choose another --ratio or another method")


def _check_indices(idx: list, n: int, what: str) -> None:
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in idx):
        raise UserError(f"plan {what}: indices must be integers")
    if sorted(set(idx)) != list(idx):
        raise UserError(f"plan {what}: indices must be sorted and unique")
    if idx and (idx[0] < 0 or idx[-1] >= n):
        raise UserError(f"plan {what}: indices must be in [0, {n})")


def select_heads(scores, n_keep: int, n_kv: int) -> list[int]:
    """A valid head selection keeping about ``n_keep`` query heads (never more), best scores first.

    Every kept KV group keeps the same number ``k`` of its best query heads; ``g`` groups are kept (the
    best by the sum of their kept heads' scores). Among the (g, k) with ``g*k <= n_keep`` the selection with
    the most heads, then the highest score, wins.
    """
    scores = [float(s) for s in scores]
    n = len(scores)
    gs = n // n_kv
    n_keep = max(1, min(n, int(n_keep)))
    groups = [sorted(range(j * gs, (j + 1) * gs), key=lambda h: -scores[h]) for j in range(n_kv)]
    best, best_key = None, None
    for k in range(1, gs + 1):
        g = min(n_kv, n_keep // k)
        if g == 0:
            continue
        ranked = sorted(groups, key=lambda grp: -sum(scores[h] for h in grp[:k]))[:g]
        sel = sorted(h for grp in ranked for h in grp[:k])
        key = (len(sel), sum(scores[h] for h in sel))
        if best_key is None or key > best_key:
            best, best_key = sel, key
    return best
