"""Measured responses equal the loss of the physically pruned model; the response assignment end to end."""
import copy

import pytest
import torch

from conftest import tiny_model
from secateurs.importance.response import measure_responses, plan_loss
from secateurs.importance.width import collect_stats
from secateurs.methods import PruneContext
from secateurs.methods.tell import TellConfig, option_plan, tell, width_scores
from secateurs.models.base import Block, all_blocks
from secateurs.plan import PruningPlan
from secateurs.search.allocate import Option, set_block
from secateurs.search.greedy import Replayer
from secateurs.surgery import apply_plan


def _ctx(model, tmp_path, ratio, rows=6, seqlen=40, seed=0):
    calib = torch.randint(0, 128, (rows, seqlen), generator=torch.Generator().manual_seed(seed))
    return PruneContext.build(model, calib, ratio=ratio, seed=seed, workdir=tmp_path, progress=False)


def _surgery_loss(model, plan, spec, rows) -> float:
    """Summed next-token NLL of the physically pruned model (its own forward pass)."""
    pruned = apply_plan(copy.deepcopy(model), plan, spec)
    with torch.no_grad():
        logits = pruned(input_ids=rows, use_cache=False).logits[:, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                                   reduction="sum"))


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_responses_equal_the_pruned_models_loss(arch, tmp_path):
    model = tiny_model(arch)
    ctx = _ctx(model, tmp_path, 0.3)
    spec = ctx.spec
    ws = width_scores(ctx, collect_stats(model, ctx.adapter, ctx.calib))
    # a committed base (stage 2): attn1 narrowed with compensation, mlp2 removed
    base = PruningPlan.dense(spec)
    base.layers[1] = set_block(base.layers[1], "attn", option_plan(ctx, ws, 1, "attn", Option(0.5)))
    base.layers[2] = set_block(base.layers[2], "mlp", option_plan(ctx, ws, 2, "mlp", Option(1.0)))
    options = {Block(0, "mlp").pos: [Option(0.25), Option(0.75, False), Option(1.0)],
               Block(1, "attn").pos: [Option(0.75), Option(1.0)],
               Block(3, "attn").pos: [Option(0.5, False)]}
    variants = {pos: [set_block(base.layers[Block.at(pos).layer], Block.at(pos).kind,
                                option_plan(ctx, ws, Block.at(pos).layer, Block.at(pos).kind, o)) for o in opts]
                for pos, opts in options.items()}
    r = Replayer(model, ctx.adapter, ctx.calib, batch_size=4, head_chunk=0)
    losses = measure_responses(r, spec, base, variants)
    assert plan_loss(r, spec, base) == pytest.approx(_surgery_loss(model, base, spec, ctx.calib), rel=1e-5)
    for pos, lps in variants.items():
        for lp, got in zip(lps, losses[pos]):
            plan = copy.deepcopy(base)
            plan.layers[Block.at(pos).layer] = lp
            assert got == pytest.approx(_surgery_loss(model, plan, spec, ctx.calib), rel=1e-5)


def test_response_assignment_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    ctx = _ctx(model, tmp_path, 0.25)
    plan = tell(ctx, TellConfig(assign="response"))  # measured responses, one stage, compensation on
    spec = ctx.spec
    assert plan.ratio(spec) >= 0.25 - 1e-9
    d = ctx.extra
    assert d["assign"] == "response" and d["blocks"][0]["importance"] is None  # no transfer entropy computed
    assert d["cost_model"] is None  # a ratio budget: no unit costs timed
    stage = d["allocation"]["stages"][0]
    assert stage["evaluations"] + 1 == d["allocation"]["evaluations_measured"]  # the responses and the base loss
    for b, (i, kind) in zip(d["blocks"], all_blocks(spec.n_layers)):
        assert b["option"] in [o["option"] for o in b["options"]]
        assert (b["option"] == "remove") == (not getattr(plan.layers[i], kind))
    # the chosen options' savings add up to the plan's parameter saving (net of compensation biases)
    saved = sum(next(o["saving"] for o in b["options"] if o["option"] == b["option"]) for b in d["blocks"])
    assert saved * 1e6 == pytest.approx(spec.total_params - plan.params(spec), abs=1)
    # the same budget again: every response comes from the cache
    ctx2 = _ctx(model, tmp_path / "again", 0.25)
    (tmp_path / "again").mkdir()
    assert tell(ctx2, TellConfig(assign="response")).to_dict() == plan.to_dict()
    assert ctx2.extra["allocation"]["evaluations_measured"] == 0
    # two stages: the second measures on top of the committed half
    ctx3 = _ctx(model, tmp_path / "two", 0.25)
    (tmp_path / "two").mkdir()
    p3 = tell(ctx3, TellConfig(assign="response", stages=2))
    st = ctx3.extra["allocation"]["stages"]
    assert len(st) == 2 and st[1]["committed_saving"] > 0 and p3.ratio(spec) >= 0.25 - 1e-9


@pytest.mark.slow
def test_response_default_on_smollm(tmp_path, monkeypatch, capsys):
    """--assign response (measured responses, knapsack) through the CLI on the real model, small settings."""
    import json as _json

    from secateurs.cli import main
    from secateurs.files import cache_dir

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(cache_dir() / "models")  # real weights, private tell cache
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["prune", "smollm2-135m", "--method", "tell", "--assign", "response", "--ratio", "0.1", "--nsamples", "2", "--seqlen", "32",
                 "--levels", "0.5", "--eval", "", "--quiet", "--out", str(out)]) == 0
    result = _json.loads((out / "result.json").read_text())
    d = result["method_details"]
    assert d["assign"] == "response" and d["cost_model"] is None
    assert 0.1 <= result["ratio_achieved"] < 0.1 + 0.01
    assert d["allocation"]["evaluations_measured"] == 121  # 60 blocks x (one width level + removal), the dense loss
    assert result["ppl_evaluations"] == 121
    capsys.readouterr()
    assert main(["explain", str(out)]) == 0
    assert "mlp29" in capsys.readouterr().out


def test_response_assignment_with_local_search(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    ctx = _ctx(model, tmp_path, 0.25)
    plan = tell(ctx, TellConfig(assign="response", refine=3))
    hist = ctx.extra["allocation"]["refine"]
    assert 1 <= len(hist) <= 4 and hist[0]["accepted"] and not hist[0]["moves"]
    final = min(h["loss"] for h in hist if h["accepted"])
    r = Replayer(model, ctx.adapter, ctx.calib, batch_size=6, head_chunk=0)
    tokens = ctx.calib.shape[0] * (ctx.calib.shape[1] - 1)
    assert plan_loss(r, ctx.spec, plan) / tokens == pytest.approx(final, rel=1e-6)  # the plan is the best evaluated
    assert final <= hist[0]["loss"] and plan.ratio(ctx.spec) >= 0.25 - 1e-9
