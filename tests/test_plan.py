import json

import pytest

from conftest import tiny_model
from secateurs.errors import UserError
from secateurs.models import get_adapter
from secateurs.plan import PruningPlan, select_heads


@pytest.fixture
def spec():
    return get_adapter(tiny_model("llama")).spec()


def test_json_round_trip(tmp_path, spec):
    plan = PruningPlan.from_removed_blocks(spec, [(1, "attn")], method="x")
    plan.layers[2].heads = [0, 2]
    plan.layers[3].channels = [1, 2, 3]
    plan.layers[3].mlp_bias = [0.5] * spec.hidden
    plan.save(tmp_path / "p.json")
    back = PruningPlan.load(tmp_path / "p.json")
    assert back.to_dict() == plan.to_dict()
    assert back.params(spec) == plan.params(spec)


def test_ratio_counts_everything_once(spec):
    # llama tiny has tied embeddings: the embedding counts once in total_params
    plan = PruningPlan.dense(spec)
    assert plan.ratio(spec) == 0.0
    plan.layers[0].attn = plan.layers[0].mlp = False
    removed = spec.attn_block_params[0] + spec.mlp_block_params[0]
    assert plan.params(spec) == spec.total_params - removed
    assert abs(plan.ratio(spec) - removed / spec.total_params) < 1e-12


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["layers"].pop(), "layers"),
    (lambda d: d["layers"][0].update(heads=[0, 9]), "indices must be in"),
    (lambda d: d["layers"][0].update(heads=[0, 1, 2]), "per key/value group"),
    (lambda d: d["layers"][0].update(channels=[3, 1]), "sorted"),
    (lambda d: d["layers"][0].update(channels=[]), "empty"),
    (lambda d: d["layers"][0].update(attn_bias=[1.0]), "attn_bias"),
    (lambda d: d["dims"].update(hidden=7), "does not fit"),
])
def test_validation_errors_are_clear(spec, mutate, message):
    d = PruningPlan.dense(spec).to_dict()
    mutate(d)
    with pytest.raises(UserError, match=message):
        PruningPlan.from_dict(d).validate(spec)


def test_corrupt_files(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        PruningPlan.load(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match="not a secateurs plan"):
        PruningPlan.load(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps({"format": "secateurs-plan/1", "dims": {}, "layers": [{"atn": True}]}))
    with pytest.raises(UserError, match="unknown keys"):
        PruningPlan.load(tmp_path / "c.json")


def test_select_heads_keeps_equal_heads_per_group():
    scores = [9, 1, 1, 1, 8, 7, 6, 0, 5, 5, 5, 5]  # 12 heads, 3 groups of 4
    sel = select_heads(scores, 6, n_kv=3)
    assert len(sel) == 6
    counts = [sum(1 for h in sel if h // 4 == g) for g in range(3)]
    assert len({c for c in counts if c}) == 1
    assert select_heads(scores, 12, 3) == list(range(12))
    assert select_heads([3, 1, 2, 0], 2, 1) == [0, 2]  # one KV head: best query heads inside it
