"""Measured responses equal the loss of the physically pruned model; the response assignment end to end."""
import copy

import pytest
import torch

from conftest import private_cache, tiny_model
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

    private_cache(tmp_path, monkeypatch)  # real weights, private tell cache
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


@pytest.mark.slow
def test_kl_responses_on_smollm(tmp_path, monkeypatch):
    """--response-loss kl through the CLI on the real model, the smallest calibration: finite non-negative
    responses, exactly 0 for the dense model, a plan that meets the ratio, the loss in the settings."""
    import json as _json
    import math

    from secateurs.cli import main

    private_cache(tmp_path, monkeypatch)  # real weights, private tell cache
    out = tmp_path / "run"
    assert main(["prune", "smollm2-135m", "--method", "tell", "--response-loss", "kl", "--ratio", "0.1", "--nsamples", "2",
                 "--seqlen", "32", "--levels", "0.5", "--eval", "", "--quiet", "--out", str(out)]) == 0
    result = _json.loads((out / "result.json").read_text())
    alloc = result["method_details"]["allocation"]
    assert result["settings"]["options"]["response_loss"] == "kl" and alloc["response_loss"] == "kl"
    assert _json.loads((out / "plan.json").read_text())["meta"]["settings"]["options"]["response_loss"] == "kl"
    assert 0.1 <= result["ratio_achieved"] < 0.1 + 0.01
    assert alloc["evaluations_measured"] == 121 and alloc["stages"][0]["base_loss"] == 0.0
    dlosses = [o["dloss"] for b in alloc["stages"][0]["blocks"].values() for o in b["options"] if o["option"] != "keep"]
    assert len(dlosses) == 120 and all(math.isfinite(v) and v >= 0 for v in dlosses) and max(dlosses) > 1.0
    assert math.isfinite(result["ppl_calib_after"])


def test_response_assignment_with_local_search(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    ctx = _ctx(model, tmp_path, 0.25)
    plan = tell(ctx, TellConfig(assign="response", refine=3, response_loss="nll"))  # the NLL replayed below
    hist = ctx.extra["allocation"]["refine"]
    assert 1 <= len(hist) <= 4 and hist[0]["accepted"] and not hist[0]["moves"]
    final = min(h["loss"] for h in hist if h["accepted"])
    r = Replayer(model, ctx.adapter, ctx.calib, batch_size=6, head_chunk=0)
    tokens = ctx.calib.shape[0] * (ctx.calib.shape[1] - 1)
    assert plan_loss(r, ctx.spec, plan) / tokens == pytest.approx(final, rel=1e-6)  # the plan is the best evaluated
    assert final <= hist[0]["loss"] and plan.ratio(ctx.spec) >= 0.25 - 1e-9


# --- --response-loss kl ---------------------------------------------------------------------------------------
def _surgery_kl(model, plan, spec, rows) -> float:
    """Summed KL(dense || pruned) of the next-token distributions, from the two models' own forward passes."""
    pruned = apply_plan(copy.deepcopy(model), plan, spec)
    with torch.no_grad():
        logp, logq = (torch.log_softmax(m(input_ids=rows, use_cache=False).logits[:, :-1].double(), -1)
                      for m in (model, pruned))
    return float((logp.exp() * (logp - logq)).sum())


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_kl_responses_equal_the_pruned_models_kl(arch, tmp_path):
    """KLReplayer's loss of a plan is KL(dense || plan) summed over the NLL's positions, as the physically
    pruned model gives it; the dense plan's is exactly 0; every variant's is positive. Batches of 4 and 2 rows
    and slices of 3 positions (several per batch) give the same values."""
    from secateurs.importance import response as resp

    model = tiny_model(arch)
    ctx = _ctx(model, tmp_path, 0.3)
    spec = ctx.spec
    ws = width_scores(ctx, collect_stats(model, ctx.adapter, ctx.calib))
    options = {Block(0, "mlp").pos: [Option(0.25), Option(1.0)], Block(1, "attn").pos: [Option(0.5, False), Option(1.0)],
               Block(3, "mlp").pos: [Option(0.75)]}
    variants = {pos: [option_plan(ctx, ws, Block.at(pos).layer, Block.at(pos).kind, o) for o in opts]
                for pos, opts in options.items()}
    dense = PruningPlan.dense(spec)
    r = resp.KLReplayer(model, ctx.adapter, ctx.calib, 4, spec)
    assert len(r.dense) == 2 and sum(z.shape[0] for d in r.dense for z, _ in d) == Replayer.count_tokens(ctx.calib)
    assert plan_loss(r, spec, dense) == 0.0
    losses = measure_responses(r, spec, dense, variants)
    for pos, lps in variants.items():
        for lp, got in zip(lps, losses[pos]):
            plan = copy.deepcopy(dense)
            plan.layers[Block.at(pos).layer] = lp
            assert got > 0 and got == pytest.approx(_surgery_kl(model, plan, spec, ctx.calib), rel=1e-6)
    small = resp.KLReplayer(model, ctx.adapter, ctx.calib, 2, spec, positions=3)
    assert plan_loss(small, spec, dense) == 0.0
    again = measure_responses(small, spec, dense, variants)
    assert all(a == pytest.approx(b, rel=1e-5) for pos in losses for a, b in zip(losses[pos], again[pos]))


def _surgery_kl_top(model, plan, spec, rows, top: int) -> float:
    """The same from the two models' forward passes, over each dense distribution's ``top`` most probable tokens
    and one bucket for the rest of the mass (of both distributions)."""
    pruned = apply_plan(copy.deepcopy(model), plan, spec)
    with torch.no_grad():
        logp, logq = (torch.log_softmax(m(input_ids=rows, use_cache=False).logits[:, :-1].double(), -1)
                      for m in (model, pruned))
    ids = logp.topk(top, -1).indices
    p, q = logp.exp().gather(-1, ids), logq.exp().gather(-1, ids)
    rp, rq = 1 - p.sum(-1), 1 - q.sum(-1)
    return float((p * (p.log() - q.log())).sum() + (rp * (rp.log() - rq.log())).sum())


def test_kl_over_the_top_tokens(tmp_path):
    """--kl-top: the loss is the KL of the distributions coarsened to each dense distribution's top tokens plus
    one bucket, as the pruned model gives it; never above the full KL, equal to it with the whole vocabulary;
    the dense plan's is exactly 0; the cache is the top tokens' size."""
    from secateurs.importance import response as resp

    model = tiny_model("llama")
    ctx = _ctx(model, tmp_path, 0.3)
    spec = ctx.spec
    vocab = model.get_output_embeddings().weight.shape[0]
    ws = width_scores(ctx, collect_stats(model, ctx.adapter, ctx.calib))
    variants = {Block(0, "mlp").pos: [option_plan(ctx, ws, 0, "mlp", Option(1.0))],
                Block(1, "attn").pos: [option_plan(ctx, ws, 1, "attn", Option(0.5))]}
    dense = PruningPlan.dense(spec)
    full = measure_responses(resp.KLReplayer(model, ctx.adapter, ctx.calib, 4, spec), spec, dense, variants)
    whole = resp.KLReplayer(model, ctx.adapter, ctx.calib, 4, spec, top=vocab + 5)  # clipped to the vocabulary
    assert whole.top == vocab
    assert plan_loss(whole, spec, dense) == 0.0
    got_whole = measure_responses(whole, spec, dense, variants)
    top = resp.KLReplayer(model, ctx.adapter, ctx.calib, 2, spec, positions=3, top=8)
    assert all(v.shape[-1] == 8 and ids.dtype == torch.int32 for d in top.dense for v, ids, _ in d)
    assert plan_loss(top, spec, dense) == 0.0
    got = measure_responses(top, spec, dense, variants)
    for pos, lps in variants.items():
        for lp, f, w, t in zip(lps, full[pos], got_whole[pos], got[pos]):
            plan = copy.deepcopy(dense)
            plan.layers[Block.at(pos).layer] = lp
            assert w == pytest.approx(f, rel=1e-6)
            assert 0 < t <= f * (1 + 1e-9)
            assert t == pytest.approx(_surgery_kl_top(model, plan, spec, ctx.calib, 8), rel=1e-6)
    assert resp.kl_cache_bytes(4, 24, vocab, 8) == 4 * 23 * (8 * 8 + 8) < resp.kl_cache_bytes(4, 24, vocab)
    from secateurs.methods.tell import ResponseStore

    assert (ResponseStore(ctx, TellConfig(response_loss="kl", kl_top=8)).model_key
            != ResponseStore(ctx, TellConfig(response_loss="kl")).model_key)  # cached apart


def test_kl_response_assignment_and_its_cache(tmp_path, monkeypatch):
    """--response-loss kl end to end on a tiny model: non-negative finite responses, a plan that meets the
    ratio, the loss recorded; its responses are cached apart from nll's (neither run reuses the other's, each
    reuses its own), and the nll cache key is the one from before the option."""
    import math

    from secateurs.methods.tell import ResponseStore, model_key

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    runs = {}
    for name, loss in (("kl", "kl"), ("nll", "nll"), ("kl2", "kl"), ("nll2", "nll")):
        (tmp_path / name).mkdir()
        ctx = _ctx(model, tmp_path / name, 0.25)
        plan = tell(ctx, TellConfig(levels="0.5", response_loss=loss))
        alloc = ctx.extra["allocation"]
        runs[name] = (plan.to_dict()["layers"], alloc["evaluations_measured"], sorted(
            p.name for p in (tmp_path / name).glob("tell_responses_*.json")))
        assert alloc["response_loss"] == loss and plan.ratio(ctx.spec) >= 0.25 - 1e-9
        dlosses = [o["dloss"] for b in alloc["stages"][0]["blocks"].values() for o in b["options"]]
        assert all(math.isfinite(v) for v in dlosses)
        if loss == "kl":
            assert alloc["stages"][0]["base_loss"] == 0.0 and min(dlosses) >= 0.0 and max(dlosses) > 0
    blocks = 2 * ctx.spec.n_layers
    assert runs["kl"][1] == runs["nll"][1] == 2 * blocks + 1  # the nll run measured everything again
    assert runs["kl2"][1] == runs["nll2"][1] == 0  # and each reuses its own
    kl_file, nll_file = (runs[k][2][0].removeprefix("tell_responses_") for k in ("kl", "nll"))
    assert kl_file != nll_file
    assert sorted(p.name for p in (tmp_path / "cache" / "tell").glob("responses-*.json")) == sorted(
        f"responses-{f}" for f in (kl_file, nll_file))
    assert ResponseStore(ctx, TellConfig(response_loss="nll")).model_key == model_key(ctx, what="responses",
                                                                                      dtype="float32")


def test_response_replayer_copies_or_converts_its_own():
    """--response-dtype another than the working one: the replay runs on a copy in that dtype, the user's model
    untouched; a pool worker (``own``) converts its replica in place instead; both give the same losses."""
    from secateurs.methods.tell import response_replayer

    calib = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(3))
    model = tiny_model("llama")
    copied = response_replayer(model, calib, 2, "bfloat16")
    assert copied.model is not model and next(copied.model.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32
    spec = copied.adapter.spec()
    dense = PruningPlan.dense(spec)
    want = plan_loss(copied, spec, dense)
    own = response_replayer(model, calib, 2, "bfloat16", own=True)
    assert own.model is model and next(model.parameters()).dtype == torch.bfloat16
    assert plan_loss(own, spec, dense) == want
