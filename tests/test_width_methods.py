"""Width pruners: the per-layer rate rule, masking equals surgery, wanda-sp's layer-by-layer calibration,
FLAP's global threshold and compensation, the whole-model ratio within 0.5 points, GQA (including one KV head),
and the CLI on both embedded models."""
import copy
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ARCHS, prune, tiny_model
from secateurs.errors import UserError
from secateurs.eval.perplexity import row_nll
from secateurs.importance.width import (MaskedPlan, collect_stats, head_scores, layer_plan_at_rate, layer_plan_at_rates,
                                        layer_width_params, max_rate, valid_head_counts, wanda_column_scores)
from secateurs.models import get_adapter
from secateurs.plan import LayerPlan, PruningPlan
from secateurs.surgery import apply_plan

CALIB = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(3))


def run_method(model, name, ratio=0.3, **options):
    plan = prune(model, name, ratio, CALIB, **options)
    return plan, plan.record


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_rate_rule(n_kv):
    """A rate removes that share of the layer's width parameters, to within half a channel; the head count is
    the valid GQA count nearest the same share of heads."""
    spec = get_adapter(tiny_model("llama", num_key_value_heads=n_kv)).spec()
    g = torch.Generator().manual_seed(0)
    for rate in [0.0, 0.1, 0.25, 0.5, 0.77, max_rate(spec)]:
        lp = layer_plan_at_rate(spec, rate, torch.rand(spec.n_heads, generator=g), torch.rand(spec.intermediate, generator=g))
        plan = PruningPlan([lp] + [LayerPlan() for _ in range(spec.n_layers - 1)], spec.as_dict())
        plan.validate(spec)
        removed = spec.total_params - plan.params(spec)
        assert abs(removed - rate * layer_width_params(spec)) <= spec.channel_params / 2 + 1e-6
        n_h = len(lp.kept_heads(spec))
        assert n_h == min(valid_head_counts(spec), key=lambda c: (abs(c - (1 - rate) * spec.n_heads), c))


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_rate_rule_per_block(n_kv):
    """One rate per block (tell): the heads by the rule at the attention block's rate, the channels absorb the
    head rounding so the layer removes its budget to within half a channel (unless the head rounding alone
    exceeds it); next to a removed block the other block is pruned at its own rate."""
    spec = get_adapter(tiny_model("llama", num_key_value_heads=n_kv)).spec()
    mlp_width = spec.intermediate * spec.channel_params
    attn_width = layer_width_params(spec) - mlp_width
    g = torch.Generator().manual_seed(0)
    for r_attn, r_mlp in [(0.1, 0.3), (0.3, 0.1), (0.6, 0.2), (0.05, 0.05), (None, 0.4), (0.4, None)]:
        lp = layer_plan_at_rates(spec, r_attn, r_mlp, torch.rand(spec.n_heads, generator=g),
                                 torch.rand(spec.intermediate, generator=g))
        plan = PruningPlan([lp] + [LayerPlan() for _ in range(spec.n_layers - 1)], spec.as_dict())
        plan.validate(spec)
        assert (lp.attn, lp.mlp) == (r_attn is not None, r_mlp is not None)
        removed = spec.total_params - plan.params(spec)
        if r_attn is not None:
            n_h = len(lp.kept_heads(spec))
            assert n_h == min(valid_head_counts(spec), key=lambda c: (abs(c - (1 - r_attn) * spec.n_heads), c))
        if r_attn is not None and r_mlp is not None:
            budget = r_attn * attn_width + r_mlp * mlp_width
            if lp.channels is None:  # the head rounding alone went past the layer's budget: no channel goes
                assert removed > budget
            else:
                assert abs(removed - budget) <= spec.channel_params / 2 + 1e-6
        elif r_mlp is not None:
            assert len(lp.kept_channels(spec)) == round((1 - r_mlp) * spec.intermediate)


@pytest.mark.parametrize("arch", ARCHS)
def test_masked_plan_equals_surgery_and_restores(arch):
    model = tiny_model(arch)
    ad = get_adapter(model)
    spec = ad.spec()
    plan = PruningPlan.dense(spec)
    plan.layers[0] = LayerPlan(heads=[0, 2], channels=list(range(0, spec.intermediate, 2)), attn_bias=[0.03] * spec.hidden)
    plan.layers[2] = LayerPlan(heads=[2, 3], mlp_bias=[0.01 * i for i in range(spec.hidden)], channels=[1, 4, 9])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), MaskedPlan(ad, spec, dict(enumerate(plan.layers))):
        masked = row_nll(model, CALIB)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    pruned = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        torch.testing.assert_close(masked, row_nll(pruned, CALIB), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
@pytest.mark.parametrize("ratio", [0.2, 0.4])
def test_methods_reach_ratio_and_run(arch, method, ratio):
    model = tiny_model(arch)
    spec = get_adapter(model).spec()
    plan, _ = run_method(model, method, ratio)
    plan.validate(spec)
    assert abs(plan.ratio(spec) - ratio) <= 0.005
    assert all(lp.channels is not None for lp in plan.layers)
    assert ratio < 0.4 or any(lp.heads is not None for lp in plan.layers)
    pruned = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        assert torch.isfinite(row_nll(pruned, CALIB)).all()
        out = pruned.generate(CALIB[:1, :8], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 13)


def test_one_kv_head_gemma():
    """Gemma-3-270M has one KV head: heads are pruned inside the single group, which always stays."""
    model = tiny_model("gemma3_text", num_key_value_heads=1)
    spec = get_adapter(model).spec()
    for method in ("wanda-sp", "flap"):
        plan, _ = run_method(model, method, 0.35)
        assert abs(plan.ratio(spec) - 0.35) <= 0.005
        assert all(0 < len(lp.kept_heads(spec)) < spec.n_heads and lp.kept_kv(spec) == [0] for lp in plan.layers if lp.heads)
        pruned = apply_plan(copy.deepcopy(model), plan)
        with torch.no_grad():
            a = pruned.generate(CALIB[:1, :8], max_new_tokens=6, do_sample=False)
            b = pruned.generate(CALIB[:1, :8], max_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(a, b)


def test_wanda_sp_calibrates_on_pruned_outputs():
    """Layer 2's selection equals the one computed on a model whose layers 0 and 1 are physically pruned
    (and differs from the one-shot selection on the dense model)."""
    model = tiny_model("llama")
    ad = get_adapter(model)
    spec = ad.spec()
    rates = [0.6, 0.6, 0.5, 0.1]
    plan, _ = run_method(model, "wanda-sp", None, rates=",".join(map(str, rates)))

    def layer2(m):
        st = collect_stats(m, get_adapter(m), CALIB, layers=[2])
        layer = get_adapter(m).layers()[2]
        h = head_scores(wanda_column_scores(layer.self_attn.o_proj.weight, st.l2("attn.2")), spec.head_dim)
        c = wanda_column_scores(layer.mlp.down_proj.weight, st.l2("mlp.2"))
        return layer_plan_at_rate(spec, rates[2], h, c)

    prefix = PruningPlan.dense(spec)
    prefix.layers[:2] = plan.layers[:2]
    assert layer2(apply_plan(copy.deepcopy(model), prefix)) == plan.layers[2]
    assert layer2(model).channels != plan.layers[2].channels


def test_flap_adaptive_widths_and_compensation():
    model = tiny_model("llama", num_hidden_layers=4)
    spec = get_adapter(model).spec()
    plan, _ = run_method(model, "flap", 0.3)
    widths = {len(lp.kept_channels(spec)) for lp in plan.layers}
    assert len(widths) > 1  # one global threshold, not a uniform rate
    assert all(lp.mlp_bias is not None for lp in plan.layers if lp.channels is not None)
    assert all(lp.attn_bias is not None for lp in plan.layers if lp.heads is not None)
    plain, _ = run_method(model, "flap", 0.3, compensate=False)
    assert all(lp.mlp_bias is None and lp.attn_bias is None for lp in plain.layers)
    assert [lp.channels for lp in plain.layers] == [lp.channels for lp in plan.layers]


def test_bad_input_is_user_error():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="exactly one"):
        run_method(model, "wanda-sp", 0.3, rates="0.1,0.1,0.1,0.1")
    with pytest.raises(UserError, match="exactly one"):
        run_method(model, "wanda-sp", None)
    with pytest.raises(UserError, match="4 numbers"):
        run_method(model, "wanda-sp", None, rates="0.1,0.2")
    with pytest.raises(UserError, match="out of reach"):
        run_method(model, "flap", 0.97)
    with pytest.raises(UserError, match="out of reach"):
        run_method(model, "wanda-sp", 0.97)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "secateurs", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("model,method,ratio", [("smollm2-135m", "wanda-sp", 0.2), ("gemma3-270m", "flap", 0.2)])
def test_cli_on_embedded_models(tmp_path, model, method, ratio):
    out = tmp_path / "out"
    r = cli("prune", model, "--method", method, "--ratio", str(ratio), "--nsamples", "2", "--seqlen", "64",
            "--eval-rows", "1", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    assert abs(res["ratio_achieved"] - ratio) <= 0.005
    assert math.isfinite(res["ppl_test_after"]) and res["ppl_test_after"] > res["ppl_test_before"]
    r = cli("eval", str(out), "--ppl", "wiki:test", "--rows", "1", "--seqlen", "64", "--quiet")
    assert r.returncode == 0 and "wiki:test: ppl" in r.stdout, r.stderr
