"""tell: the transfer-entropy estimator (closed forms on synthetic Gaussians, stability, a known answer on a
model), the cost model, the per-block ratio assignment, and the method end to end on tiny models."""
import copy
import json
import math

import pytest
import torch

import secateurs
from conftest import busy_machine, private_cache, tiny_model
from secateurs.errors import UserError
from secateurs.importance.activations import capture
from secateurs.importance.cost import CostModel, load_or_measure, measured_speedup, probe_plan
from secateurs.importance.interaction import block_importance, collect_streams, gaussian_cmi, whiten
from secateurs.methods import PruneContext
from secateurs.methods.tell import TellConfig
from secateurs.models import get_adapter
from secateurs.models.base import all_blocks
from secateurs.plan import UNIT_KINDS, WIDTH, PruningPlan, removed_params
from secateurs.search.assign import assign_ratios, load_weights
from secateurs.surgery import apply_plan


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- estimator -----------------------------------------------------------------------------------------------
def test_mi_independent_pairs_closed_form():
    """Independent pairs with correlations rho_i: MI = -0.5 * sum log(1 - rho_i^2)."""
    n, rho = 40000, torch.tensor([0.9, 0.6, 0.3, 0.0], dtype=torch.float64)
    a = torch.randn(n, 4, generator=_gen(), dtype=torch.float64)
    b = rho * a + (1 - rho**2).sqrt() * torch.randn(n, 4, generator=_gen(1), dtype=torch.float64)
    truth = float(-0.5 * torch.log(1 - rho**2).sum())
    assert gaussian_cmi(whiten(a), whiten(b)) == pytest.approx(truth, abs=0.01)


def _gauss_cmi_from_cov(cov, it, idd, ix):
    ld = lambda idx: float(torch.logdet(cov[idx][:, idx])) if idx else 0.0  # noqa: E731
    return 0.5 * (ld(it + ix) + ld(idd + ix) - ld(ix) - ld(it + idd + ix))


def test_cmi_matches_closed_form_of_a_linear_gaussian_system():
    """X -> D -> T with X also feeding T: the estimate matches the CMI of the true covariance."""
    n = 50000
    x = torch.randn(n, 3, generator=_gen(2), dtype=torch.float64)
    a = torch.randn(3, 2, generator=_gen(3), dtype=torch.float64)
    d = x @ a + 0.7 * torch.randn(n, 2, generator=_gen(4), dtype=torch.float64)
    b = torch.randn(3, 2, generator=_gen(5), dtype=torch.float64)
    c = torch.randn(2, 2, generator=_gen(6), dtype=torch.float64)
    t = x @ b + 0.5 * (d @ c) + torch.randn(n, 2, generator=_gen(7), dtype=torch.float64)
    # true covariance of (T, D, X)
    sx = torch.eye(3, dtype=torch.float64)
    sd = a.T @ a + 0.49 * torch.eye(2, dtype=torch.float64)
    sdx = a.T  # cov(D, X)
    stx = b.T + 0.5 * c.T @ a.T  # cov(T, X)
    std_ = b.T @ a + 0.5 * c.T @ sd  # cov(T, D)
    st = (b.T @ b + 0.25 * c.T @ sd @ c + 0.5 * (b.T @ a @ c + c.T @ a.T @ b) + torch.eye(2, dtype=torch.float64))
    cov = torch.cat([torch.cat([st, std_, stx], 1), torch.cat([std_.T, sd, sdx], 1), torch.cat([stx.T, sdx.T, sx], 1)], 0)
    truth = _gauss_cmi_from_cov(cov, [0, 1], [2, 3], [4, 5, 6])
    assert truth > 0.05
    assert gaussian_cmi(whiten(t), whiten(d), whiten(x)) == pytest.approx(truth, abs=0.01)


def test_cmi_zero_when_conditionally_independent():
    n = 30000
    x = torch.randn(n, 4, generator=_gen(8), dtype=torch.float64)
    d = x[:, :2] * 2 + torch.randn(n, 2, generator=_gen(9), dtype=torch.float64)
    t = x[:, 2:] - x[:, :2] + torch.randn(n, 2, generator=_gen(10), dtype=torch.float64)
    assert gaussian_cmi(whiten(t), whiten(d), whiten(x)) < 0.002
    assert gaussian_cmi(whiten(t), whiten(d)) > 0.1  # but not independent without the condition


def test_noise_gives_the_gaussian_channel_closed_form():
    """T = X + D exactly (the block's own output): with noise s2 on whitened T, I = 0.5 log(1 + var(D|X)/s2)
    where whitened T = (X + D) / sqrt(2), so var(D|X) = 1/2 in T's units."""
    n = 40000
    x = torch.randn(n, 1, generator=_gen(11), dtype=torch.float64)
    d = torch.randn(n, 1, generator=_gen(12), dtype=torch.float64)
    for s2 in (0.01, 0.1):
        est = gaussian_cmi(whiten(x + d), whiten(d), whiten(x), noise=s2)
        assert est == pytest.approx(0.5 * math.log(1 + 0.5 / s2), rel=0.01)


def test_estimator_is_stable_under_scale_offset_and_degenerate_inputs():
    n = 20000
    x = torch.randn(n, 3, generator=_gen(13), dtype=torch.float64)
    d = x[:, :1] + torch.randn(n, 1, generator=_gen(14), dtype=torch.float64)
    t = d + x[:, 1:2] + 0.5 * torch.randn(n, 1, generator=_gen(15), dtype=torch.float64)
    ref = gaussian_cmi(whiten(t), whiten(d), whiten(x))
    # float32 input with a huge scale and offset, and a duplicated (rank-deficient) column of X
    x2 = torch.cat([x, x[:, :1]], 1).float() * 1e6 + 1e4
    got = gaussian_cmi(whiten(t.float() * 1e-4 - 3), whiten(d.float() * 1e5), whiten(x2))
    assert math.isfinite(got) and got == pytest.approx(ref, rel=1e-3)
    assert whiten(x2).shape[1] == 3  # the zero-variance direction was dropped
    assert gaussian_cmi(whiten(t), whiten(torch.zeros(n, 2)), whiten(x)) == 0.0  # a silent block adds nothing


def test_block_importance_known_answer_on_a_model():
    """A block whose output projection is zero adds nothing to the stream: importance exactly 0; every other
    block of a random model adds something. The streams are the model's own hidden states."""
    model = tiny_model("llama", num_hidden_layers=3)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    ad = get_adapter(model)
    rows = torch.randint(0, 128, (8, 40), generator=_gen(16))
    streams = collect_streams(model, ad, rows, batch_size=3, max_tokens=None)
    cap = capture(model, ad, rows)
    assert len(streams) == 7 and streams[0].shape == (8 * 39, 64)
    torch.testing.assert_close(streams[2], cap.hidden[1][:, 1:].reshape(-1, 64))
    torch.testing.assert_close(streams[-1], cap.hidden[-1][:, 1:].reshape(-1, 64))
    for target in ("final", "output"):
        imp = block_importance(streams, k=8, target=target)
        zero = {2, 5}  # attn1, mlp2 in block order
        assert all(imp[b] == 0.0 for b in zero)
        assert all(imp[b] > 1e-3 for b in range(6) if b not in zero)
    sub = collect_streams(model, ad, rows, max_tokens=80, seed=1)
    assert sub[0].shape[0] == 8 * 10


# --- assignment -----------------------------------------------------------------------------------------------
def test_load_weights():
    w = load_weights([0.1, 1.0, 10.0, 1.0])
    assert sum(w) / 4 == pytest.approx(1.0)
    assert w[0] > w[1] > w[2] and w[1] == pytest.approx(w[3])
    assert load_weights([5, 1, 2], "uniform") == [1.0, 1.0, 1.0]
    assert load_weights([0.1, 10.0], temperature=0.0) == [1.0, 1.0]
    # per kind: each block is compared with its own kind only
    g = load_weights([1.0, 10.0, 100.0, 1000.0], groups=["attn", "mlp", "attn", "mlp"])
    assert g[0] == pytest.approx(g[1]) and g[2] == pytest.approx(g[3]) and g[0] > g[2]


def _param_budget(sizes):
    total = sum(sizes)
    return lambda r: sum(s * x for s, x in zip(sizes, r)) / total


def test_assignment_meets_budget_and_follows_importance():
    sizes = [10, 20, 10, 20, 10, 20]
    importance = [0.01, 2.0, 1.0, 0.5, 3.0, 0.02]
    w = load_weights(importance)
    r = assign_ratios(w, _param_budget(sizes), 0.3, threshold=0.6)
    assert _param_budget(sizes)(r) == pytest.approx(0.3, abs=1e-6)
    order = sorted(range(6), key=lambda b: importance[b])
    assert all(r[a] >= r[b] for a, b in zip(order, order[1:]))  # less informative -> more load
    assert r[0] == 1.0 and r[4] < 0.6  # the least informative block is removed whole, the most is narrowed
    assert all(x < 0.6 for x in r if x < 1.0)
    u = assign_ratios(load_weights(importance, "uniform"), _param_budget(sizes), 0.3, threshold=0.6)
    assert u == pytest.approx([0.3] * 6, abs=1e-6)


def test_assignment_with_a_quantized_budget_and_impossible_target():
    sizes = [7, 7, 7, 7]
    quant = lambda r: sum(math.floor(x * 4) / 4 for x in r) / 4  # noqa: E731  (whole quarters only)
    r = assign_ratios([1.0, 1.0, 1.0, 1.0], quant, 0.25, threshold=0.9)
    assert quant(r) >= 0.25
    with pytest.raises(UserError, match="cannot be reached"):
        assign_ratios([1.0, 2.0], lambda r: 0.5 * sum(r) / 2, 0.9)
    with pytest.raises(UserError, match="threshold"):
        assign_ratios([1.0], _param_budget(sizes[:1]), 0.2, threshold=0.0)
    # uniform weights cross the threshold together: removing every block is refused, not returned
    with pytest.raises(UserError, match="every block removed"):
        assign_ratios([1.0, 1.0], _param_budget([5, 5]), 0.7, threshold=0.6)
    assert assign_ratios([1.0, 1.0], _param_budget([5, 5]), 0.7, threshold=1.0) == pytest.approx([0.7, 0.7], abs=1e-6)


# --- cost model -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_removed_params_account_for_the_plan(arch):
    spec = get_adapter(tiny_model(arch)).spec()
    for kind in UNIT_KINDS:
        plan = probe_plan(spec, kind)
        plan.validate(spec)
        removed = sum(v for i, lp in enumerate(plan.layers) for v in removed_params(spec, i, lp).values())
        assert removed == spec.total_params - plan.params(spec) > 0
    cm = CostModel("x", 16, 100.0, {"attn_width": 1e-4, "mlp_width": 2e-4, "attn_block": 3e-4, "mlp_block": 4e-4})
    plan = probe_plan(spec, "mlp_block")
    removed = spec.total_params - plan.params(spec)
    assert cm.predict_ms(spec, plan) == pytest.approx(100.0 - 4e-4 * removed)
    assert cm.speedup(spec, plan) > 1.0
    assert cm.block_ms(spec, 0, "attn") == pytest.approx(3e-4 * spec.attn_block_params[0])


def test_cpu_clock_times_one_thread_and_restores_threads():
    from secateurs.importance.cost import prefill_time

    model = tiny_model("llama")
    before = torch.get_num_threads()
    assert prefill_time(model, 16, "cpu") > 0 and prefill_time(model, 16, "wall") > 0
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="clock"):
        prefill_time(model, 16, "sundial")


def test_cost_benchmark_runs_floors_and_caches(tmp_path, monkeypatch):
    import secateurs.eval.load as load

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    monkeypatch.setattr(load, "runnable", lambda: 1)  # a quiet machine: the cached costs are final
    model = tiny_model("llama")
    spec = get_adapter(model).spec()
    cm, path = load_or_measure(model, spec, prompt_len=16, reps=1)
    assert path.startswith(str(tmp_path / "costs")) and json.loads(open(path).read())["prompt_len"] == 16
    assert set(cm.ms_per_param) == set(UNIT_KINDS) and all(v >= 0 for v in cm.ms_per_param.values())
    assert cm.ms_per_param["attn_block"] >= cm.ms_per_param["attn_width"]
    assert cm.ms_per_param["mlp_block"] >= cm.ms_per_param["mlp_width"]
    assert all(len(cm.raw[k]["pairs"]) == 1 for k in UNIT_KINDS)
    again, path2 = load_or_measure(model, spec, prompt_len=16, reps=1)
    assert path2 == path and again == cm  # read from the cache (the same numbers), not measured again
    m = measured_speedup(model, probe_plan(spec, "mlp_block"), spec, prompt_len=16, reps=1)
    assert m["dense_ms"] > 0 and m["pruned_ms"] > 0


def test_cost_cache_keeps_a_dotted_device_name(tmp_path, monkeypatch):
    """A CPU model name with a dot (``2.20GHz``) stays whole in the cache file's name: two models, two files."""
    import secateurs.importance.cost as cost

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    monkeypatch.setattr(cost, "device_name", lambda device: "cpu-x86_64-Xeon_CPU_2.20GHz-1t")
    paths = set()
    for kind in ("llama", "qwen2"):
        model = tiny_model(kind)
        p = cost._cache_path(model, get_adapter(model).spec(), 16, 1, "cpu", ".json")
        assert p.name.startswith("cpu-x86_64-Xeon_CPU_2.20GHz-1t-") and p.name.endswith(".json")
        paths.add(p)
    assert len(paths) == 2


def test_costs_record_their_steadiness_and_a_busy_measurement_is_provisional(tmp_path, monkeypatch):
    """Each kind's saving is a fraction of the dense time with its spread and pair count, and the load while
    measuring; costs measured on a busy machine are measured again once it is quiet, quiet ones are kept."""
    import secateurs.eval.load as load

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    model = tiny_model("llama")
    spec = get_adapter(model).spec()
    monkeypatch.setattr(load, "runnable", lambda: 2 * load.cores() + 1)
    busy, path = load_or_measure(model, spec, prompt_len=16, reps=2, clock="cpu")
    st = busy.steadiness()
    assert st["load"]["loaded"] is True and set(st["kinds"]) == set(UNIT_KINDS)
    for k, v in st["kinds"].items():
        assert 2 <= v["pairs"] <= 8 and v["spread"] >= 0 and -1 < v["fraction_saved"] < 1
        assert busy.raw[k]["saved_ms"] == pytest.approx(v["fraction_saved"] * busy.dense_ms)
    assert load_or_measure(model, spec, prompt_len=16, reps=2, clock="cpu")[0] == busy  # still busy: kept
    monkeypatch.setattr(load, "runnable", lambda: 1)
    quiet, path2 = load_or_measure(model, spec, prompt_len=16, reps=2, clock="cpu")
    assert path2 == path and quiet.load["loaded"] is False  # measured again, now quiet
    monkeypatch.setattr(load, "runnable", lambda: 2 * load.cores() + 1)
    assert load_or_measure(model, spec, prompt_len=16, reps=2, clock="cpu")[0] == quiet  # a quiet one is kept


def test_same_speedup_plan_under_load(tmp_path, monkeypatch):
    """The same `tell --speedup` command, first on the machine as it is, then under an artificial load (a busy
    loop per core and one more): the same plan. The unit costs and the speedup checks are measured once per
    device and model, in pairs of ratios (``importance/cost.py``); the loaded run finds them cached and times
    nothing, where its own timings would have differed by several percent."""
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama", hidden_size=128, intermediate_size=384)
    calib = torch.randint(0, 128, (4, 32), generator=_gen(0))
    cfg = TellConfig(speedup=1.3, levels="0.5", latency_len=32, latency_reps=2, latency_clock="cpu")

    def run(name):
        plan = secateurs.prune(model, None, cfg, calib=calib, workdir=tmp_path / name, progress=False)
        return plan.to_dict()["layers"], plan.record["method_details"]

    quiet, qd = run("quiet")
    with busy_machine():
        loaded, ld = run("loaded")
    assert loaded == quiet
    assert all(r["cached"] for r in ld["speedup_rounds"]) and not qd["speedup_rounds"][0]["cached"]
    assert ld["cost_model"]["steadiness"] == qd["cost_model"]["steadiness"]
    assert all(v["pairs"] >= 2 for v in qd["cost_model"]["steadiness"]["kinds"].values())


# --- the method --------------------------------------------------------------------------------------------------
def _ctx(model, tmp_path, ratio, seed=0):
    calib = torch.randint(0, 128, (6, 48), generator=_gen(seed))
    return PruneContext.build(model, calib, ratio=ratio, seed=seed, workdir=tmp_path, progress=False)


def tell(ctx, cfg):
    """tell's plan through the API (its checks and ratio rule included), on the context's model, rows, ratio,
    seed and folder; what it recorded goes on the context, as the method itself puts it there."""
    plan = secateurs.prune(ctx.model, None, cfg, ratio=ctx.ratio, calib=ctx.calib, seed=ctx.seed, workdir=ctx.workdir,
                           progress=False)
    ctx.record(**plan.record.get("method_details", {}))
    ctx.count_ppl(plan.record["ppl_evaluations"])
    return plan


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_tell_ratio_end_to_end(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    model = tiny_model(arch)
    ctx = _ctx(model, tmp_path, 0.3)
    cfg = TellConfig(assign="importance", te_rank=4, latency_len=16, latency_reps=1, block_threshold=0.5)
    plan = tell(ctx, cfg)
    spec = ctx.spec
    biggest = max(spec.attn_block_params + spec.mlp_block_params) / spec.total_params
    assert 0.3 - 1e-9 <= plan.ratio(spec) <= 0.3 + biggest
    blocks = ctx.extra["blocks"]
    assert [(b["layer"], b["kind"]) for b in blocks] == all_blocks(spec.n_layers)
    for b, (i, kind) in zip(blocks, all_blocks(spec.n_layers)):
        assert (b["ratio_assigned"] >= 1.0) == (not getattr(plan.layers[i], kind))
        assert b["action"] in ("removed", "narrowed", "kept")
    narrowed = [lp for lp in plan.layers if lp.mlp and lp.channels is not None]
    assert narrowed and all(lp.mlp_bias and any(lp.mlp_bias) for lp in narrowed)  # real compensation
    pruned = apply_plan(copy.deepcopy(model), plan, spec)
    out = pruned(input_ids=ctx.calib[:2]).logits
    assert torch.isfinite(out).all()
    assert (tmp_path / "tell_calibration.pt").exists()
    again = tell(_ctx(model, tmp_path, 0.3), cfg)  # resumed from the cached calibration: the same plan
    assert again.to_dict() == plan.to_dict()
    other = tmp_path / "other-run"
    other.mkdir()
    ctx2 = _ctx(model, other, 0.4)  # another budget on the same calibration reuses the shared cache
    assert len(list((tmp_path / "cache" / "tell").glob("*.pt"))) == 1
    biggest = max(spec.attn_block_params + spec.mlp_block_params) / spec.total_params
    assert 0.4 - 1e-9 <= tell(ctx2, cfg).ratio(spec) <= 0.4 + biggest  # at most one whole-block jump over
    assert [b["importance"] for b in ctx2.extra["blocks"]] == [b["importance"] for b in blocks]
    ctx3 = _ctx(model, other, 0.4, seed=1)  # other calibration rows: another key
    tell(ctx3, cfg)
    assert len(list((tmp_path / "cache" / "tell").glob("*.pt"))) == 2


def test_tell_uniform_assignment_is_width_only(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    ctx = _ctx(tiny_model("llama"), tmp_path, 0.2)
    plan = tell(ctx, TellConfig(assign="uniform", te_rank=4, latency_len=16, latency_reps=1))
    assert not plan.removed_blocks()
    assert len({round(b["ratio_assigned"], 9) for b in ctx.extra["blocks"]}) == 1


def test_default_is_response_and_each_assignment_skips_work_it_does_not_use(tmp_path, monkeypatch):
    """The default assignment is response (what `secateurs methods` says). Uniform estimates no transfer entropy,
    measures no responses, and times the unit costs only with --speedup; response measures responses but no
    transfer entropy. The skipped functions are counted, not mocked away: each wrapper calls the real one."""
    import collections

    import secateurs.methods.tell as tell_mod
    from secateurs.methods import get_method

    assert TellConfig().assign == "response"
    assert get_method("tell").summary.startswith("multi-unit pruning; default: one option per block")
    calls = collections.Counter()

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        monkeypatch.setattr(tell_mod, name, wrapper)

    for name in ("collect_streams", "block_importance", "measure_responses", "plan_loss"):
        counted(name, getattr(tell_mod, name))
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    ctx = _ctx(tiny_model("llama"), tmp_path, 0.2)
    layer_params = sum(ctx.spec.attn_block_params + ctx.spec.mlp_block_params)
    fixed = CostModel("test", 16, 100.0, {k: 90.0 / layer_params for k in UNIT_KINDS})
    counted("load_or_measure", lambda *a, **k: (fixed, "fixed"))
    plan = tell(ctx, TellConfig(assign="uniform"))
    assert ctx.extra["assign"] == "uniform" and not plan.removed_blocks() and plan.ratio(ctx.spec) > 0.19
    assert ctx.extra["cost_model"] is None and ctx.extra["allocation"] is None
    assert all(b["importance"] is None and b["cost_ms_whole"] is None for b in ctx.extra["blocks"])
    assert sum(calls.values()) == 0  # no transfer entropy, no responses, no cost probes
    (tmp_path / "x").mkdir()
    tell(_ctx(tiny_model("llama"), tmp_path / "x", None), TellConfig(assign="uniform", speedup=1.2, latency_len=16,
                                                                     latency_reps=1, speedup_rounds=0))
    assert dict(calls) == {"load_or_measure": 1}  # --speedup needs the unit costs, nothing else
    (tmp_path / "y").mkdir()
    tell(_ctx(tiny_model("llama"), tmp_path / "y", 0.2), TellConfig(assign="importance", te_rank=4))
    assert calls["collect_streams"] == 1 and calls["block_importance"] == 1 and calls["measure_responses"] == 0
    (tmp_path / "z").mkdir()
    tell(_ctx(tiny_model("llama"), tmp_path / "z", 0.2), TellConfig(levels="0.5"))  # the default: response
    assert calls["measure_responses"] == 1 and calls["collect_streams"] == 1 and calls["load_or_measure"] == 1


def test_tell_speedup_records_measured_rounds(tmp_path, monkeypatch):
    """The speedup budget runs the assign / measure / rescale loop; the timing itself is not asserted."""
    import secateurs.methods.tell as tell_mod

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    ctx = _ctx(tiny_model("llama"), tmp_path, None)
    layer_params = sum(ctx.spec.attn_block_params + ctx.spec.mlp_block_params)
    fixed = CostModel("test", 16, 100.0, {k: 90.0 / layer_params for k in UNIT_KINDS})  # layers: 90% of the time
    monkeypatch.setattr(tell_mod, "load_or_measure", lambda *a, **k: (fixed, "fixed"))
    cfg = TellConfig(speedup=1.2, te_rank=4, latency_len=16, latency_reps=1, speedup_rounds=1)
    plan = tell(ctx, cfg)
    rounds = ctx.extra["speedup_rounds"]
    assert 1 <= len(rounds) <= 2 and rounds[0]["cost_model_goal"] == 1.2
    assert rounds[0]["predicted"] >= 1.2 - 1e-6 and plan.ratio(ctx.spec) > 0


@pytest.mark.parametrize("ratio,speedup,msg", [
    (None, None, "exactly one budget"), (0.2, 1.3, "exactly one budget"),
    (None, 0.9, "greater than 1"), (None, 1.0, "greater than 1"),
])
def test_budget_validation(ratio, speedup, msg):
    with pytest.raises(UserError, match=msg):
        TellConfig(speedup=speedup).check(ratio)
    TellConfig(speedup=1.3).check(None)
    TellConfig().check(0.25)
    with pytest.raises(UserError, match="block-threshold"):
        TellConfig(block_threshold=1.5).check(0.25)


def test_response_loss_validation():
    TellConfig(response_loss="kl").check(0.25)
    for assign in ("uniform", "importance"):
        with pytest.raises(UserError, match=f"--response-loss kl applies to --assign response .* --assign {assign} measures none"):
            TellConfig(response_loss="kl", assign=assign).check(0.25)
        TellConfig(response_loss="nll", assign=assign).check(0.25)
    with pytest.raises(UserError, match="--response-loss must be one of auto, nll, kl"):
        TellConfig(response_loss="mse").check(0.25)
    for assign in ("uniform", "importance"):  # auto (the default) measures nothing there, and is no error
        TellConfig(assign=assign).check(0.25)


def test_response_loss_auto_chooses_kl_where_it_fits(monkeypatch):
    """auto: kl where the dense log-probabilities fit the limit, nll beyond it; a given loss stays as given."""
    import secateurs.methods.tell as tell_mod
    from secateurs.importance.response import kl_cache_bytes

    model = tiny_model("llama")
    vocab = model.get_output_embeddings().weight.shape[0]
    assert TellConfig().response_loss == "auto"
    assert TellConfig().loss_for(model, 4, 24)[0] == "kl"
    assert TellConfig(response_loss="nll").loss_for(model, 4, 24) == ("nll", "--response-loss nll")
    monkeypatch.setattr(tell_mod, "KL_CACHE_LIMIT", kl_cache_bytes(4, 24, vocab) - 1)
    loss, why = TellConfig().loss_for(model, 4, 24)
    assert loss == "nll" and f"4 x 23 positions x {vocab:,} tokens" in why and "over its" in why
    assert TellConfig().loss_for(model, 4, 23)[0] == "kl"  # one position fewer fits
    with pytest.raises(UserError, match="more than its limit"):  # kl asked for: refused, not replaced
        TellConfig(response_loss="kl").check_calibration(model, 4, 24)


def test_kl_top_fits_where_the_whole_vocabulary_does_not(monkeypatch):
    """--kl-top K: the cache counted at K tokens a position, so auto chooses kl where the whole vocabulary's
    would not fit; refused with nll or below 0."""
    import secateurs.methods.tell as tell_mod
    from secateurs.importance.response import kl_cache_bytes

    model = tiny_model("llama")
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(tell_mod, "KL_CACHE_LIMIT", kl_cache_bytes(4, 24, vocab) - 1)
    assert TellConfig().loss_for(model, 4, 24)[0] == "nll"
    assert TellConfig(kl_top=8).loss_for(model, 4, 24)[0] == "kl"
    TellConfig(response_loss="kl", kl_top=8).check_calibration(model, 4, 24)
    for bad in (TellConfig(response_loss="nll", kl_top=8), TellConfig(kl_top=-1)):
        with pytest.raises(UserError, match="--kl-top must be 0"):
            bad.check(0.25)


def test_cli_rejects_bad_budget_before_loading(tmp_path, capsys):
    from secateurs.cli import main

    assert main(["prune", "no-such-model", "--method", "tell", "--out", str(tmp_path / "o")]) == 2
    assert "exactly one budget" in capsys.readouterr().err
    assert main(["prune", "no-such-model", "--method", "tell", "--speedup", "0.8", "--out", str(tmp_path / "o")]) == 2
    assert "greater than 1" in capsys.readouterr().err


@pytest.mark.parametrize("assign", ["importance", "response", "uniform"])
def test_explain_table(assign, tmp_path, capsys, monkeypatch):
    """explain prints one row per block: for the response assignment the measured response, the importance
    (transfer entropy, with --te), the cost, the chosen option and why; then every measured option."""
    import secateurs.methods.tell as tell_mod
    from secateurs.cli import main

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    ctx = _ctx(tiny_model("llama"), tmp_path, None)
    layer_params = sum(ctx.spec.attn_block_params + ctx.spec.mlp_block_params)
    fixed = CostModel("test", 16, 100.0, {k: 90.0 / layer_params for k in UNIT_KINDS})
    monkeypatch.setattr(tell_mod, "load_or_measure", lambda *a, **k: (fixed, "fixed"))
    plan = tell(ctx, TellConfig(assign=assign, te=True, speedup=1.2, te_rank=4, latency_len=16, latency_reps=1,
                                speedup_rounds=0))
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"method": "tell", "model": "tiny", "ratio_achieved": plan.ratio(ctx.spec),
                                                 "method_details": ctx.extra}))
    assert main(["explain", str(run)]) == 0
    out = capsys.readouterr().out
    assert "importance" in out and "cost model" in out
    assert "speedup round:" in out and " pairs, spread " in out  # how steady the check was
    rows = [line for line in out.splitlines() if line.startswith(("attn", "mlp"))]
    assert len(rows) == 2 * ctx.spec.n_layers
    if assign == "response":
        assert "exact knapsack" in out and "price at the margin" in out
        for b, row in zip(ctx.extra["blocks"], rows):
            assert row.split()[:2] == [b["block"], f"{b['params']:,}"] and b["option"] in row
            assert f"{b['importance']:.3f}" in row and f"{b['cost_ms_whole']:.2f}" in row
            assert f"{b['response_whole']:.4f}" in row and (b["why"] or "") in row
        listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and ": " in line and "@" in line]
        assert listed == [b["block"] for b in ctx.extra["blocks"]]
    assert main(["explain", str(tmp_path / "missing")]) == 2
    (run / "result.json").write_text(json.dumps({"method": "uniform-drop"}))
    assert main(["explain", str(run)]) == 2
    assert "no per-block details" in capsys.readouterr().err


@pytest.mark.slow
def test_tell_cli_on_smollm(tmp_path, monkeypatch, capsys):
    """The real model through the CLI, small settings: --ratio lands on the target, explain reads the run."""
    from secateurs.cli import main

    private_cache(tmp_path, monkeypatch)  # real weights, private tell cache
    out = tmp_path / "run"
    assert main(["prune", "smollm2-135m", "--method", "tell", "--assign", "importance", "--ratio", "0.25",
                 "--nsamples", "4", "--seqlen", "64", "--eval", "", "--te-rank", "8", "--latency-len", "32",
                 "--latency-reps", "1", "--quiet", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert 0.25 <= result["ratio_achieved"] < 0.27
    assert math.isfinite(result["ppl_calib_after"])
    blocks = result["method_details"]["blocks"]
    assert len(blocks) == 60 and len({b["importance"] for b in blocks}) > 50
    capsys.readouterr()
    assert main(["explain", str(out)]) == 0
    assert "mlp29" in capsys.readouterr().out


def test_dry_run_counts_the_response_replays():
    """--dry-run's estimate: one replay per block option and stage, each half a pass; uniform: one pass."""
    spec = get_adapter(tiny_model("llama")).spec()
    blocks = 2 * spec.n_layers
    n, rows, what = TellConfig(response_loss="nll").evaluations(spec, 0.2, 8)  # response, 3 levels, compensation on
    assert (n, rows) == (1 + blocks * 4 // 2, 8) and "half a pass" in what
    n2, _, _ = TellConfig(compensation="both", stages=2, refine=5, response_loss="nll").evaluations(spec, 0.2, 8)
    assert n2 == 1 + 2 * blocks * 7 // 2 + 5
    assert TellConfig(assign="uniform").evaluations(spec, 0.2, 8)[0] == 1
    n3, _, what3 = TellConfig(response_loss="kl").evaluations(spec, 0.2, 8)  # and one pass for the dense log-probs
    assert n3 == n + 1 and "dense log-probabilities" in what3
    assert TellConfig().evaluations(spec, 0.2, 8)[0] == n3  # the default, auto: kl where it fits (an upper bound)


def test_dry_run_says_how_many_responses_are_new(tmp_path, monkeypatch):
    """Before a run every first-stage response is new; after it, none; a further level adds only its own."""
    import re

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    ctx = _ctx(model, tmp_path, 0.2)
    blocks = 2 * ctx.spec.n_layers

    def new(cfg):
        line = cfg.cached_work(model, ctx.calib, ctx.seed)
        return int(re.search(r"at most (\d+) of the first stage's (\d+)", line).group(1))

    assert new(TellConfig(levels="0.5")) == 2 * blocks + 1  # two options per block and the dense loss
    tell(ctx, TellConfig(levels="0.5"))
    assert new(TellConfig(levels="0.5")) == 0
    assert blocks // 2 <= new(TellConfig(levels="0.25,0.5")) <= blocks  # the new level's, where it changes a block
    assert TellConfig(assign="uniform").cached_work(model, ctx.calib, ctx.seed) is None


def test_ratio_rule_follows_the_assignment(tmp_path, monkeypatch):
    """--assign response takes whole options per block: it lands at or above --ratio (checked by run_method with
    the run's own rule); uniform lands within the width tolerance."""
    from secateurs.methods import get_method, run_method

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    spec_m = get_method("tell")
    assert "at or above" in spec_m.ratio_rule.describe() and "within 0.005" in spec_m.ratio_rule.describe()
    assert TellConfig().ratio_rule().met(0.23, 0.2) and not TellConfig().ratio_rule().met(0.19, 0.2)
    assert not TellConfig(assign="uniform").ratio_rule().met(0.23, 0.2)
    ctx = _ctx(tiny_model("llama"), tmp_path, 0.3)
    plan = run_method(spec_m, ctx, TellConfig(levels="0.5"))  # the default assignment, through the rule check
    assert plan.ratio(ctx.spec) >= 0.3


# --- --engine vllm: every query head kept ----------------------------------------------------------------------
def _fixed_costs(monkeypatch, spec):
    """A fixed cost model (layers: 90% of a 100 ms prefill), so that --speedup times only its speedup checks."""
    import secateurs.methods.tell as tell_mod

    layer_params = sum(spec.attn_block_params + spec.mlp_block_params)
    fixed = CostModel("test", 16, 100.0, {k: 90.0 / layer_params for k in UNIT_KINDS})
    monkeypatch.setattr(tell_mod, "load_or_measure", lambda *a, **k: (fixed, "fixed"))


def _tell_vllm(model, tmp_path, cfg, ratio=None, calib=None, engine="vllm"):
    calib = torch.randint(0, 128, (6, 48), generator=_gen(0)) if calib is None else calib
    return secateurs.prune(model, None, cfg, ratio=ratio, calib=calib, workdir=tmp_path, progress=False, engine=engine)


@pytest.mark.parametrize("assign", ["response", "uniform", "importance"])
@pytest.mark.parametrize("budget", ["ratio", "speedup"])
def test_engine_vllm_keeps_every_query_head(assign, budget, tmp_path, monkeypatch):
    """With --engine vllm every layer keeps all its query heads or loses its attention whole, in every assignment
    and for both budgets; the MLPs are still narrowed with compensation; the settings record the engine."""
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    spec = get_adapter(model).spec()
    _fixed_costs(monkeypatch, spec)
    speedup = {"speedup": 1.25, "speedup_rounds": 0} if budget == "speedup" else {}
    cfg = TellConfig(assign=assign, levels="0.25,0.5", te_rank=4, latency_len=16, latency_reps=1, **speedup)
    plan = _tell_vllm(model, tmp_path / "run", cfg, ratio=0.3 if budget == "ratio" else None)
    assert all(lp.heads is None and lp.attn_bias is None for lp in plan.layers)
    narrowed = [lp for lp in plan.layers if lp.mlp and lp.channels is not None]
    assert narrowed and all(lp.mlp_bias and any(lp.mlp_bias) for lp in narrowed)
    assert plan.meta["settings"]["engine"] == "vllm"
    details = plan.record["method_details"]
    if budget == "ratio":
        assert plan.ratio(spec) >= 0.3 - WIDTH.tolerance
    else:
        assert details["predicted_speedup"] >= 1.25 - 1e-6
    if assign == "response":
        attn = [o["option"] for st in details["allocation"]["stages"] for name, b in st["blocks"].items()
                if name.startswith("attn") for o in b["options"]]
        assert set(attn) == {"keep", "remove"}
        assert not any(b["option"].startswith("heads") for b in details["blocks"])


def test_engine_vllm_with_both_compensations(tmp_path, monkeypatch):
    """--compensation both with --engine vllm: the MLP width options are measured with and without compensation,
    attention is only kept or removed, and the plan keeps every query head (vLLM's bias switch holds either)."""
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    _fixed_costs(monkeypatch, get_adapter(model).spec())
    cfg = TellConfig(levels="0.25,0.5", compensation="both", te_rank=4, latency_len=16, latency_reps=1)
    plan = _tell_vllm(model, tmp_path / "run", cfg, ratio=0.3)
    assert all(lp.heads is None and lp.attn_bias is None for lp in plan.layers)
    options = {o["option"] for st in plan.record["method_details"]["allocation"]["stages"]
               for name, b in st["blocks"].items() for o in b["options"]}
    assert {"keep", "remove"} <= options and not any(o.startswith("heads") for o in options)
    mlp = {o for o in options if o.startswith("channels")}
    assert mlp == {"channels-25%", "channels-25% no-bias", "channels-50%", "channels-50% no-bias"}, options


def test_engine_vllm_stages_refine_and_explain(tmp_path, monkeypatch, capsys):
    """--stages and --refine keep every head too; explain lists no head-narrowing option and says why."""
    from secateurs.cli import main

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    plan = _tell_vllm(model, tmp_path / "run", TellConfig(levels="0.5", stages=2, refine=3), ratio=0.3)
    assert all(lp.heads is None for lp in plan.layers)
    details = plan.record["method_details"]
    assert len(details["allocation"]["stages"]) == 2 and details["allocation"]["refine"]
    run = tmp_path / "out"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"method": "tell", "model": "tiny", "ratio_achieved": plan.ratio(
        get_adapter(model).spec()), "settings": plan.meta["settings"], "method_details": details}))
    assert main(["explain", str(run)]) == 0
    out = capsys.readouterr().out
    assert "--engine vllm: every query head kept" in out and "channels-50%" in out
    assert "heads-" not in out


def test_engine_vllm_shares_the_response_cache(tmp_path, monkeypatch):
    """A response is kept under the block plan it measured: a run with --engine vllm after one without measures
    nothing new (its options are a subset); in a fresh cache the other order measures only the attention widths.
    --dry-run counts the new responses of each option set apart."""
    import re

    model = tiny_model("llama")
    spec = get_adapter(model).spec()
    L = spec.n_layers
    calib = torch.randint(0, 128, (6, 48), generator=_gen(0))
    cfg = TellConfig(levels="0.5")

    def run(name, engine):
        plan = _tell_vllm(model, tmp_path / name, cfg, ratio=0.3, calib=calib, engine=engine)
        return plan, plan.record["method_details"]["allocation"]["evaluations_measured"]

    def new(engine):
        line = cfg.cached_work(model, calib, 0, engine)
        return int(re.search(r"at most (\d+) of the first stage's (\d+)", line).group(1))

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache-a"))
    assert run("free", None)[1] == 4 * L + 1  # every block's width and removal, and the dense loss
    kept, measured = run("kept", "vllm")
    assert measured == 0 and all(lp.heads is None for lp in kept.layers)
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache-b"))
    assert new("vllm") == 3 * L + 1
    again, measured = run("kept-first", "vllm")
    assert measured == 3 * L + 1 and again.to_dict()["layers"] == kept.to_dict()["layers"]
    assert (new("vllm"), new(None)) == (0, L)  # the attention widths alone are missing
    assert run("free-after", None)[1] == L
    n, _, what = cfg.evaluations(spec, 0.3, 6, "vllm")
    assert n == 2 + -(-3 * L // 2) and f"{L} attn blocks x 1 option(s)" in what  # + the kl pass (auto)
