"""Every registered method meets its budget within its stated tolerance (its config's ``rule``), or says clearly,
before any work, that it cannot (``reach``): whole-unit methods land on the first reachable ratio at or above
the target (they overshoot by less than one unit), width methods within 0.005 of it. Plans come through the
API (``secateurs.prune``), which checks the plan against the rule of its run."""
import pytest
import torch

from conftest import prune, tiny_model
from secateurs.errors import UserError
from secateurs.methods import PruneContext, all_methods, check_reach, get_method, make_config
from secateurs.models import get_adapter
from secateurs.models.base import all_blocks
from secateurs.plan import PruningPlan, RatioRule, check_ratio_reached
from secateurs.search.greedy import layer_positions, removal_ratio

ROWS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
OPTIONS = {"self-pruner": dict(proposer="classic", population=3, generations=1, crossover=1, mutation=1, fitness_rows=2),
           "tell": dict(levels="0.5")}
METHODS = list(all_methods())


def unit_share(spec, unit: str) -> float:
    """The largest ratio one unit (a layer, or a block) is worth."""
    if unit == "layers":
        return max(removal_ratio(spec, list(layer_positions(l))) for l in range(spec.n_layers))
    return max(removal_ratio(spec, [b.pos]) for b in all_blocks(spec.n_layers))


def test_every_method_states_its_rule():
    rules = {name: m.ratio_rule for name, m in all_methods().items()}
    assert {n for n, r in rules.items() if r.unit} == {"uniform-drop", "shortgpt", "sleb", "blockpruner"}
    assert all(r.tolerance == 0.005 for r in rules.values())
    assert rules["sleb"].describe() == "the first reachable ratio >= the target (whole layers)"
    assert rules["flap"].describe() == "within 0.005 of the target"


@pytest.mark.parametrize("method", METHODS)
def test_method_meets_its_budget_or_says_it_cannot(method, tmp_path):
    model = tiny_model("llama", num_hidden_layers=6)
    ad = get_adapter(model)
    spec = ad.spec()
    m = get_method(method)
    options = OPTIONS.get(method, {})
    cfg = make_config(m, options)
    top = cfg.reach(spec)
    rule = cfg.ratio_rule()
    if top is not None:  # tell cannot tell its reach before it runs
        assert 0.3 < top < 1
    for ratio in (0.1, 0.25, round((top or 0.6) - 0.01, 3)):
        if not rule.unit and ratio > 0.6:
            continue  # width plans this close to the top of a tiny model keep one head and channel per layer
        plan = prune(model, method, ratio, ROWS, tmp_path / f"{ratio}", **options)
        got = plan.ratio(spec)
        if rule.unit:
            assert ratio <= got < ratio + unit_share(spec, rule.unit), (method, ratio, got)
        else:
            assert abs(got - ratio) <= 0.005, (method, ratio, got)
    if top is None:
        return
    # beyond its reach: refused up front, saying what it can reach
    check_reach(m, spec, top, cfg)
    with pytest.raises(UserError, match=rf"out of reach for {method} on this model: the most it can remove is {top:.4f}"):
        check_reach(m, spec, min(top + 0.01, 0.99), cfg)


def test_a_plan_that_misses_is_an_error_not_a_result():
    spec = get_adapter(tiny_model("llama")).spec()
    plan = PruningPlan.from_removed_blocks(spec, [(2, "attn"), (2, "mlp")])
    got = plan.ratio(spec)
    check_ratio_reached(plan, spec, got - 0.004)  # within the width tolerance, both sides
    check_ratio_reached(plan, spec, got + 0.004)
    with pytest.raises(UserError, match=r"misses the target .* \(within 0.005 of the target\)"):
        check_ratio_reached(plan, spec, got + 0.01, method="x")
    check_ratio_reached(plan, spec, got - 0.2, RatioRule("layers"))  # whole units: at or above the target
    with pytest.raises(UserError, match="first reachable ratio >= the target"):
        check_ratio_reached(plan, spec, got + 0.001, RatioRule("layers"))


def test_uniform_drop_no_longer_stops_short_silently(tmp_path):
    model = tiny_model("llama", num_hidden_layers=6)
    m = get_method("uniform-drop")
    ctx = PruneContext.build(model, ROWS, ratio=0.9, workdir=tmp_path, progress=False)
    with pytest.raises(UserError, match="out of reach for uniform-drop: dropping every layer but the first and the last gives"):
        m.fn(ctx, make_config(m, {}))
