"""Per-block pruning ratio assignment: the least informative blocks take the most load, the total meets a budget.

Input: one *load weight* per block (``load_weights``: from importance, or uniform), a threshold, and a budget
function that says what a vector of per-block ratios achieves (the parameter ratio of the plan it makes, or its
predicted speedup; it may quantize ratios to whole heads/channels, it only has to grow with the ratios).

Rule: block ``b`` gets ``r_b = s * w_b``; a block whose ratio reaches ``threshold`` is removed whole
(``r_b = 1``). The scale ``s`` is found in two bisections:

1. the smallest ``s`` whose ratios meet the budget: this fixes the set of blocks removed whole;
2. with that set fixed, the smallest scale ``t <= s`` for the width ratios of the other blocks that still meets
   the budget: it absorbs the overshoot of the last whole-block jump, so the total lands on the target.

Weights from importance (``mode="importance"``): ``w_b = exp(-temperature * z_b)`` with ``z_b`` the standardized
log importance (over all blocks, or within each kind), normalized to mean 1: a block one standard deviation
less informative than average carries ``e^temperature`` times more load. ``mode="uniform"``: all weights 1
(the control).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from ..errors import UserError


def load_weights(importance: Sequence[float], mode: str = "importance", temperature: float = 1.0,
                 groups: Sequence[str] | None = None) -> list[float]:
    """Load weight per block (module docstring). ``groups`` (e.g. the block kinds) standardizes the log
    importance within each group, so blocks are compared with their own kind only."""
    if mode == "uniform":
        return [1.0] * len(importance)
    if mode != "importance":
        raise ValueError(f"unknown assignment mode {mode!r}")
    logs = [math.log(max(float(v), 1e-12)) for v in importance]
    groups = list(groups) if groups is not None else [""] * len(logs)
    z = [0.0] * len(logs)
    for g in set(groups):
        idx = [b for b, x in enumerate(groups) if x == g]
        mean = sum(logs[b] for b in idx) / len(idx)
        std = math.sqrt(sum((logs[b] - mean) ** 2 for b in idx) / len(idx)) or 1.0
        for b in idx:
            z[b] = (logs[b] - mean) / std
    w = [math.exp(-temperature * v) for v in z]
    m = sum(w) / len(w)
    return [x / m for x in w]


def ratios_at(weights: Sequence[float], s: float, threshold: float, removed: Sequence[bool] | None = None) -> list[float]:
    """Per-block ratios at scale ``s``; ``removed`` (stage 2) fixes which blocks are removed whole."""
    out = []
    for b, w in enumerate(weights):
        x = s * w
        if removed is None:
            out.append(1.0 if x >= threshold else x)
        else:
            out.append(1.0 if removed[b] else min(x, threshold))
    return out


def _smallest(f: Callable[[float], bool], lo: float, hi: float, iters: int = 50) -> float:
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid):
            hi = mid
        else:
            lo = mid
    return hi


def assign_ratios(weights: Sequence[float], budget: Callable[[list[float]], float], target: float,
                  threshold: float = 0.6, what: str = "budget") -> list[float]:
    """Per-block ratios (1.0 = removed whole) meeting ``budget(ratios) >= target`` (module docstring)."""
    if not 0.0 < threshold <= 1.0:
        raise UserError(f"block threshold must be in (0, 1] (got {threshold})")
    if min(weights) <= 0:
        raise ValueError("load weights must be positive")
    s_max = threshold / min(weights)  # every block removed
    best = budget(ratios_at(weights, s_max, threshold))
    if best < target:
        raise UserError(f"the {what} target {target:g} cannot be reached: removing every block gives {best:.4g}")
    s = _smallest(lambda v: budget(ratios_at(weights, v, threshold)) >= target, 0.0, s_max)
    removed = [r >= 1.0 for r in ratios_at(weights, s, threshold)]
    if all(removed):
        raise UserError(f"the {what} target {target:g} needs every block removed at block threshold {threshold:g}; "
                        "raise the threshold (1.0 narrows blocks instead) or lower the target")
    t = _smallest(lambda v: budget(ratios_at(weights, v, threshold, removed)) >= target, 0.0, s)
    return ratios_at(weights, t, threshold, removed)
