"""The multiple-choice knapsack is exactly optimal: against brute force on random small instances."""
import random

import pytest

from secateurs.errors import UserError
from secateurs.search.knapsack import brute_force, solve


def _instance(rng, n_groups, n_opts, integer=False, negative=False):
    groups = []
    for _ in range(n_groups):
        opts = [(0.0, 0.0)]  # "keep": saves nothing, costs nothing (tell's first option)
        for _ in range(rng.randint(1, n_opts - 1)):
            s = rng.randint(0, 6) if integer else rng.uniform(0, 5)
            v = rng.randint(-2, 9) if integer else rng.uniform(-0.5 if negative else 0.0, 4)
            opts.append((float(s), float(v)))
        groups.append(opts)
    return groups


@pytest.mark.parametrize("integer", [False, True])
def test_knapsack_matches_brute_force(integer):
    rng = random.Random(0 if integer else 1)
    checked = 0
    for trial in range(300):
        groups = _instance(rng, rng.randint(1, 6), 5, integer=integer, negative=trial % 3 == 0)
        most = sum(max(s for s, _ in g) for g in groups)
        need = rng.uniform(0, most * 1.1)
        ref = brute_force(groups, need)
        if ref is None:
            with pytest.raises(UserError, match="cannot be reached"):
                solve(groups, need)
            continue
        sol = solve(groups, need)
        assert sol.saving >= need - 1e-9
        assert sol.loss == pytest.approx(ref[0], abs=1e-9)  # the same optimum (ties may pick another choice)
        assert sol.loss == pytest.approx(sum(groups[i][j][1] for i, j in enumerate(sol.choice)), abs=1e-9)
        checked += 1
    assert checked > 200


def test_knapsack_prefers_cheap_savings_and_uses_negative_losses():
    groups = [[(0, 0), (10, 5.0)], [(0, 0), (10, 1.0)], [(0, 0), (3, -0.5)]]
    sol = solve(groups, 10)
    assert sol.choice == [0, 1, 1] and sol.loss == pytest.approx(0.5)  # the harmful block goes although not needed
    assert solve(groups, 0).choice == [0, 0, 1]


def test_knapsack_frontier_stays_small_on_a_tell_sized_instance():
    rng = random.Random(3)
    groups = [[(0.0, 0.0)] + sorted((rng.uniform(0, 30), rng.uniform(0, 50)) for _ in range(6)) for _ in range(60)]
    sol = solve(groups, 400.0)
    assert sol.saving >= 400.0 and max(sol.frontier_sizes) < 1_000_000


def test_local_search_improves_the_joint_loss_within_budget():
    """An interaction the additive model cannot see: groups 0 and 1 hurt much more together. The knapsack takes
    both (cheapest by the responses); the local search, on the joint loss, swaps one for group 2."""
    from secateurs.search.allocate import local_search

    rows = [[(0.0, 0.0), (1.0, 1.0)], [(0.0, 0.0), (1.0, 1.0)], [(0.0, 0.0), (1.0, 1.5)]]
    need = 2.0
    start = solve(rows, need).choice
    assert start == [1, 1, 0]

    def joint(ch):
        return sum(rows[g][j][1] for g, j in enumerate(ch)) + (5.0 if ch[0] and ch[1] else 0.0)

    choice, history = local_search(rows, start, need, joint, budget=4)
    assert joint(choice) == 2.5 and sum(rows[g][j][0] for g, j in enumerate(choice)) >= need
    assert 1 < len(history) <= 5 and history[0]["loss"] == 7.0
    assert [h["loss"] for h in history if h["accepted"]] == sorted((h["loss"] for h in history if h["accepted"]), reverse=True)
    _, none = local_search(rows, start, need, joint, budget=0)
    assert len(none) == 1  # budget 0: the start is evaluated, nothing else


def test_local_search_never_scores_a_plan_twice():
    """After an accepted swap, undoing it is the move the responses rank first; the memo skips it, so every
    evaluation of the budget is a new plan and the same budget reaches further."""
    from secateurs.search.allocate import local_search

    rows = [[(0.0, 0.0), (1.0, 1.0)], [(0.0, 0.0), (1.0, 1.0)], [(0.0, 0.0), (1.0, 1.5)], [(0.0, 0.0), (1.0, 1.6)]]
    seen = []

    def joint(ch):
        seen.append(tuple(ch))
        return sum(rows[g][j][1] for g, j in enumerate(ch)) + (5.0 if ch[0] and ch[1] else 0.0)

    start = solve(rows, 2.0).choice
    choice, history = local_search(rows, start, 2.0, joint, budget=6)
    assert len(seen) == len(set(seen)) == len(history) and len(history) == 7  # all 6 evaluations are new plans
    assert joint(choice) == 2.5
