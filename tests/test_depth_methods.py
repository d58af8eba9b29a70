"""Depth pruning: the greedy block-removal search (BlockPruner, SLEB) and ShortGPT.

- the fast search gives bitwise the same step losses, hence the same removal order, as the straightforward
  search, on every architecture, for block and layer candidates, with and without cached states, also when
  candidates are abandoned early;
- an interrupted search resumes from its state file and ends exactly as an uninterrupted one;
- ratio accounting: the plan is the shortest prefix of the order that reaches the ratio, the ratios written
  in order.json are the plan's, ``--from-order`` rebuilds plans without searching;
- ShortGPT's Block Influence matches the model's own hidden states and the lowest-BI layers go.
"""
import json

import pytest
import torch

from conftest import ARCHS, prune, tiny_model
from secateurs.errors import UserError
from secateurs.methods import PruneContext
from secateurs.models import get_adapter
from secateurs.plan import PruningPlan
from secateurs.search.greedy import (Replayer, SearchSettings, block_candidates, greedy_search, layer_candidates,
                                     removal_ratio)

ROWS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))


def _search(model, cands, exact, steps, rows=ROWS, batch_size=1, cache_mb=64, state_path=None, on_step=None, ratio=None,
            head_chunk=16):
    ad = get_adapter(model)
    with torch.inference_mode():
        r = Replayer(model, ad, rows, batch_size, head_chunk)
        s = SearchSettings(cands, target_ratio=ratio, max_steps=steps, exact=exact, cache_mb=cache_mb)
        return greedy_search(r, ad.spec(), s, state_path=state_path, on_step=on_step), r


def _order(state):
    return [(st["removed"], st["loss"]) for st in state["steps"]]


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_search_equals_exact(arch):
    model = tiny_model(arch)
    cands = block_candidates(4, "mix")
    exact, r_exact = _search(model, cands, True, 6)
    fast, r_fast = _search(model, cands, False, 6)
    assert _order(fast) == _order(exact)  # same blocks, bitwise the same losses
    assert r_fast.blocks_run < r_exact.blocks_run
    assert r_fast.head_work <= r_exact.head_work
    # without any cache memory (only the pinned current states), with the head in one chunk, in batches of 2: the same
    assert _order(_search(model, cands, False, 6, cache_mb=0, head_chunk=0)[0]) == _order(_search(model, cands, True, 6, head_chunk=0)[0])
    assert [s["removed"] for s in _search(model, cands, False, 6, batch_size=2)[0]["steps"]] == [s["removed"] for s in exact["steps"]]


def test_fast_search_equals_exact_with_abandoned_candidates():
    """A model that is good on its rows only without its (huge) last MLP block: most candidates are dropped
    after their first row, and the order is still the exact one."""
    model = tiny_model("llama")
    ad = get_adapter(model)
    with torch.no_grad():
        model.model.norm.weight.mul_(10)
        ad.layers()[3].mlp.down_proj.weight.mul_(1000)
    rows = torch.full((6, 16), 5)
    rows[:, ::3] = 7
    cands = block_candidates(4, "mix")
    exact, r_exact = _search(model, cands, True, 6, rows=rows)
    fast, r_fast = _search(model, cands, False, 6, rows=rows)
    assert sum(st["evaluations_abandoned"] for st in fast["steps"]) >= 5
    assert r_fast.head_work < r_exact.head_work  # dropped candidates ran parts of their heads only
    assert exact["steps"][0]["removed"] == "mlp3"
    assert _order(fast) == _order(exact)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_fast_layer_search_equals_exact(arch):
    model = tiny_model(arch)
    cands = layer_candidates(4, keep_ends=False)
    assert _order(_search(model, cands, False, 3)[0]) == _order(_search(model, cands, True, 3)[0])


def test_candidate_sets():
    assert block_candidates(2, "mix") == [(0,), (1,), (2,), (3,)]
    assert block_candidates(2, "attn") == [(0,), (2,)]
    assert block_candidates(2, "mlp") == [(1,), (3,)]
    assert layer_candidates(4, keep_ends=True) == [(2, 3), (4, 5)]


class Stop(Exception):
    pass


def test_resume_after_interruption(tmp_path):
    model = tiny_model("qwen2")
    cands = block_candidates(4, "mix")
    whole, _ = _search(model, cands, False, 5)
    path = tmp_path / "order.json"

    def interrupt(state):
        if len(state["steps"]) == 2:
            raise Stop

    with pytest.raises(Stop):
        _search(model, cands, False, 5, state_path=path, on_step=interrupt)
    assert len(json.loads(path.read_text())["steps"]) == 2
    seen = []
    resumed, r = _search(model, cands, False, 5, state_path=path, on_step=lambda st: seen.append(len(st["steps"])))
    assert seen == [3, 4, 5]  # the two finished steps were not searched again
    assert _order(resumed) == _order(whole)
    assert json.loads(path.read_text())["steps"] == resumed["steps"]
    # a state file of another candidate set is refused
    with pytest.raises(UserError, match="another model or candidate set"):
        _search(model, block_candidates(4, "attn"), False, 5, state_path=path)


def _ctx(model, tmp_path, ratio, rows=ROWS):
    return PruneContext.build(model, rows, ratio=ratio, workdir=tmp_path, progress=False)


def _prune(method, ctx, **options):
    """Through the API, on the context's model, rows, ratio and folder; its evaluations counted on it."""
    plan = prune(ctx.model, method, ctx.ratio, ctx.calib, ctx.workdir, **options)
    ctx.count_ppl(plan.record["ppl_evaluations"])
    return plan


def test_blockpruner_ratio_and_from_order(tmp_path):
    model = tiny_model("llama")
    ctx = _ctx(model, tmp_path / "a", 0.2)
    ctx.workdir.mkdir()
    plan = _prune("blockpruner", ctx)
    spec = ctx.spec
    order = json.loads((ctx.workdir / "order.json").read_text())
    steps = order["steps"]
    # the shortest prefix that reaches the ratio
    assert plan.ratio(spec) >= 0.2
    assert len(plan.removed_blocks()) == len(steps)
    shorter = PruningPlan.from_removed_blocks(spec, [(int(b[-1]), b[:-1]) for st in steps[:-1] for b in st["blocks"]])
    assert shorter.ratio(spec) < 0.2
    # the ratios written down are the plan's
    removed = []
    for st in steps:
        removed += [(int(b[-1]), b[:-1]) for b in st["blocks"]]
        assert st["ratio"] == PruningPlan.from_removed_blocks(spec, removed).ratio(spec)
    assert ctx.ppl_evaluations == sum(st["evaluations_full"] + st["evaluations_abandoned"] for st in steps)
    # a longer search (--steps) gives the same first steps; --from-order rebuilds plans for other ratios
    ctx2 = _ctx(model, tmp_path / "b", None)
    ctx2.workdir.mkdir()
    _prune("blockpruner", ctx2, steps=6)
    long = json.loads((ctx2.workdir / "order.json").read_text())["steps"]
    assert [s["removed"] for s in long[: len(steps)]] == [s["removed"] for s in steps]
    ctx3 = _ctx(model, tmp_path / "c", 0.2)
    assert _prune("blockpruner", ctx3, from_order=str(ctx2.workdir / "order.json")).removed_blocks() == plan.removed_blocks()
    assert ctx3.ppl_evaluations == 0
    ctx3.ratio = None
    assert len(_prune("blockpruner", ctx3, from_order=str(ctx2.workdir / "order.json"), steps=6).removed_blocks()) == 6
    # beyond the saved order, another model, a missing file, no stopping rule: clear errors
    ctx3.ratio = 0.95
    with pytest.raises(UserError, match="short of the target"):
        _prune("blockpruner", ctx3, from_order=str(ctx2.workdir / "order.json"))
    other = _ctx(tiny_model("llama", hidden_size=32), tmp_path / "d", 0.2)
    with pytest.raises(UserError, match="another model"):
        _prune("blockpruner", other, from_order=str(ctx2.workdir / "order.json"))
    with pytest.raises(UserError, match="cannot read"):
        _prune("blockpruner", ctx3, from_order=str(tmp_path / "nope.json"))
    ctx3.ratio = None
    with pytest.raises(UserError, match="--ratio"):
        _prune("blockpruner", ctx3)


def test_blockpruner_attn_only_out_of_reach(tmp_path):
    ctx = _ctx(tiny_model("llama"), tmp_path, 0.9)
    with pytest.raises(UserError, match="out of reach"):
        _prune("blockpruner", ctx, blocks="attn")


def test_sleb_keeps_ends_and_stops_at_ratio(tmp_path):
    model = tiny_model("llama", num_hidden_layers=6)
    ctx = _ctx(model, tmp_path, 0.15)
    plan = _prune("sleb", ctx)
    spec = ctx.spec
    removed_layers = sorted({l for l, _ in plan.removed_blocks()})
    assert all(not plan.layers[l].attn and not plan.layers[l].mlp for l in removed_layers)  # whole layers
    assert 0 not in removed_layers and 5 not in removed_layers
    assert plan.ratio(spec) >= 0.15
    assert removal_ratio(spec, [p for l in removed_layers[:-1] for p in (2 * l, 2 * l + 1)]) < 0.15 or len(removed_layers) == 1
    # --from-order: a plan of a smaller ratio from the saved order, without searching; another method's order refused
    ctx2 = _ctx(model, tmp_path / "again", 0.05)
    small = _prune("sleb", ctx2, from_order=str(tmp_path / "order.json"))
    order = json.loads((tmp_path / "order.json").read_text())
    assert ctx2.ppl_evaluations == 0
    assert [f"layer{l}" for l in sorted({l for l, _ in small.removed_blocks()})] == [order["steps"][0]["removed"]]
    (tmp_path / "bp.json").write_text(json.dumps({**order, "method": "blockpruner"}))
    with pytest.raises(UserError, match="order of blockpruner, not of sleb"):
        _prune("sleb", ctx2, from_order=str(tmp_path / "bp.json"))


def test_shortgpt_block_influence(tmp_path):
    from secateurs.importance.block_influence import block_influence

    model = tiny_model("mistral", num_hidden_layers=6)
    ad = get_adapter(model)
    bi = block_influence(model, ad, ROWS, batch_size=3)
    with torch.no_grad():
        hs = model(input_ids=ROWS, output_hidden_states=True).hidden_states  # the last one is after the final norm
    for l in range(5):
        cos = torch.nn.functional.cosine_similarity(hs[l], hs[l + 1], dim=-1)
        assert bi[l] == pytest.approx(1 - cos.mean().item(), abs=1e-5)
    ctx = _ctx(model, tmp_path, 0.12)
    plan = _prune("shortgpt", ctx)
    removed = sorted({l for l, _ in plan.removed_blocks()})
    lowest = sorted(range(6), key=lambda l: (bi[l], l))[: len(removed)]
    assert removed == sorted(lowest)
    assert plan.ratio(ctx.spec) >= 0.12
    assert PruningPlan.from_removed_blocks(ctx.spec, [(l, k) for l in lowest[:-1] for k in ("attn", "mlp")]).ratio(ctx.spec) < 0.12


@pytest.mark.slow
def test_cli_on_smollm(tmp_path, capsys):
    """From the command line on the real model: one search step, the order and result agree; a prefix the
    order cannot give, and a search without a stopping rule, are clear user errors."""
    from secateurs.cli import main

    common = ["--nsamples", "1", "--seqlen", "16", "--eval", "", "--quiet"]
    out = tmp_path / "bp"
    assert main(["prune", "smollm2-135m", "--method", "blockpruner", "--steps", "1", *common, "--out", str(out)]) == 0
    order = json.loads((out / "order.json").read_text())
    result = json.loads((out / "result.json").read_text())
    assert len(order["steps"]) == 1 and result["removed_blocks"] == order["steps"][0]["blocks"]
    assert result["ratio_achieved"] == order["steps"][0]["ratio"]
    assert result["ppl_evaluations"] == 60
    assert main(["prune", "smollm2-135m", "--method", "blockpruner", "--ratio", "0.2", "--from-order",
                 str(out / "order.json"), *common, "--out", str(tmp_path / "x")]) == 2
    assert "short of the target" in capsys.readouterr().err
    assert main(["prune", "smollm2-135m", "--method", "blockpruner", *common, "--out", str(tmp_path / "y")]) == 2
    assert "needs --ratio" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_chunked_loss_head_bounds_and_equals_the_model_nll(arch):
    """The chunked head's value only grows chunk by chunk and ends at the model's own summed NLL."""
    from secateurs.importance.activations import nll_from_hidden

    model = tiny_model(arch)
    ad = get_adapter(model)
    with torch.inference_mode():
        r = Replayer(model, ad, ROWS, batch_size=2, head_chunk=16)
        assert len(r.chunk_weights) > 2
        h = r.run(1, r.emb[1], 0, frozenset({3}))
        head, values = r.head(1, h), []
        while not head.complete:
            values.append(head.advance())
        assert all(a <= b for a, b in zip(values, values[1:])) and values[0] >= 0
        want = float(nll_from_hidden(ad, h, r.batches[1]).sum())
        assert values[-1] == pytest.approx(want, rel=1e-5)
        assert r.loss(1, h) == values[-1]  # one fixed computation
