"""Multiple-choice knapsack, solved exactly: one option per group, the least total loss for a required saving.

Every group (a block) has options ``(saving, loss)``: what choosing the option saves (prefill milliseconds, or
parameters) and what it costs in quality (a measured calibration-loss increase; it may be negative). The
problem is

    minimize  sum_g loss[g][j_g]   subject to   sum_g saving[g][j_g] >= need,   one option j_g per group.

Solver (``solve``): dynamic programming over Pareto frontiers (Nemhauser-Ullmann). After the first ``g``
groups, the frontier holds every achievable (saving, loss) pair that no other pair beats on both counts (at
least the saving for at most the loss). The frontier of ``g + 1`` groups is the non-dominated part of
{frontier point + option}, since any optimal choice restricted to the first ``g`` groups must be a frontier
point (otherwise the dominating point, with the same later options, would be at least as good). Savings are
capped at ``need``: every pair at or beyond it is equally feasible, so the frontier keeps only the best of
them. No discretization: the result is exactly optimal for real-valued savings and losses (ties broken
towards the larger saving, then the choice found first). The frontier is at most the number of distinct
capped savings; on the instances tell meets (60 groups of 4-7 options) it stays in the tens of thousands,
and ``max_frontier`` guards against a blow-up with a clear error rather than a silent approximation.

Optimality is checked against brute-force enumeration on random small instances (``tests/test_knapsack.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import UserError


@dataclass
class Solution:
    choice: list[int]  # option index per group
    saving: float
    loss: float
    frontier_sizes: list[int]  # frontier size after each group (the solver's work)


def _prune(saving: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated pairs: sorted by saving (descending), then loss; a pair stays when its loss
    is strictly below every pair with at least its saving."""
    order = np.lexsort((loss, -saving))
    s, l = saving[order], loss[order]
    best_before = np.concatenate(([np.inf], np.minimum.accumulate(l)[:-1]))
    keep = l < best_before
    return order[keep]


def solve(groups: Sequence[Sequence[tuple[float, float]]], need: float, max_frontier: int = 5_000_000) -> Solution:
    """The optimal choice (module docstring). Raises UserError when no choice reaches ``need``."""
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("every group needs at least one option")
    most = sum(max(s for s, _ in g) for g in groups)
    if most < need:
        raise UserError(f"the required saving {need:.6g} cannot be reached: every group at its largest option "
                        f"saves {most:.6g}")
    cap = float(need)
    sav = np.zeros(1)
    los = np.zeros(1)
    parents, options, sizes = [], [], []
    for g in groups:
        gs = np.array([float(s) for s, _ in g])
        gl = np.array([float(v) for _, v in g])
        cand_s = np.minimum(sav[:, None] + gs[None, :], cap).ravel()
        cand_l = (los[:, None] + gl[None, :]).ravel()
        keep = _prune(cand_s, cand_l)
        if len(keep) > max_frontier:
            raise RuntimeError(f"knapsack frontier grew past {max_frontier:,} points; the instance is too large "
                               "for the exact solver")
        parents.append(keep // len(g))
        options.append(keep % len(g))
        sav, los = cand_s[keep], cand_l[keep]
        sizes.append(len(keep))
    feasible = np.nonzero(sav >= cap)[0]
    # the capped frontier has exactly one point at the cap (the least loss there)
    k = int(feasible[np.argmin(los[feasible])])
    best_loss = float(los[k])
    choice = [0] * len(groups)
    for gi in range(len(groups) - 1, -1, -1):
        choice[gi] = int(options[gi][k])
        k = int(parents[gi][k])
    total_s = sum(groups[gi][j][0] for gi, j in enumerate(choice))
    total_l = sum(groups[gi][j][1] for gi, j in enumerate(choice))
    assert abs(total_l - best_loss) <= 1e-6 * max(1.0, abs(best_loss)) and total_s >= need - 1e-9 * max(1.0, need)
    return Solution(choice, float(total_s), float(total_l), sizes)


def brute_force(groups: Sequence[Sequence[tuple[float, float]]], need: float) -> tuple[float, list[int]] | None:
    """(least loss, a choice) by enumerating every choice; None when infeasible. For tests only."""
    import itertools

    best = None
    for choice in itertools.product(*[range(len(g)) for g in groups]):
        s = sum(groups[i][j][0] for i, j in enumerate(choice))
        v = sum(groups[i][j][1] for i, j in enumerate(choice))
        if s >= need and (best is None or v < best[0]):
            best = (v, list(choice))
    return best
