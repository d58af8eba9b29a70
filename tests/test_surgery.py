"""Physical surgery equals masking: the pruned model's logits equal the dense model's with the same units
zeroed out (or blocks skipped), for every supported architecture; generation with cache equals without."""
import copy

import pytest
import torch

from conftest import ARCHS, tiny_model
from secateurs.models import get_adapter, unique_param_count
from secateurs.plan import LayerPlan, PruningPlan
from secateurs.surgery import apply_plan

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


def masked_reference(model, plan):
    """The dense model with the plan's removed units zeroed: a removed head's o_proj columns, a removed
    channel's down_proj column, a removed block's output projection (its branch then adds nothing), and
    bias compensation as an added output bias (a forward hook)."""
    ref = copy.deepcopy(model)
    ad = get_adapter(ref)
    spec = ad.spec()
    hd = spec.head_dim
    with torch.no_grad():
        for layer, lp in zip(ad.layers(), plan.layers):
            o, down = ad.proj(layer, ad.o), ad.proj(layer, ad.down)
            keep_h = set(lp.kept_heads(spec))
            for h in range(spec.n_heads):
                if h not in keep_h:
                    o.weight[:, h * hd:(h + 1) * hd] = 0
            if not lp.attn and o.bias is not None:
                o.bias.zero_()
            keep_c = set(lp.kept_channels(spec))
            for c in range(spec.intermediate):
                if c not in keep_c:
                    down.weight[:, c] = 0
            if not lp.mlp and down.bias is not None:
                down.bias.zero_()
            for lin, b in ((o, lp.attn_bias), (down, lp.mlp_bias)):
                if b:
                    bias = torch.tensor(b)
                    lin.register_forward_hook(lambda mod, inp, out, bias=bias: out + bias)
    return ref


def plans(spec):
    n = spec.n_layers
    depth = PruningPlan.from_removed_blocks(spec, [(0, "attn"), (1, "mlp"), (2, "attn"), (2, "mlp")])
    width = PruningPlan.dense(spec)
    width.layers[0].heads = [0, 2]  # one query head from each KV group
    width.layers[1].heads = [2, 3]  # one whole KV group
    width.layers[1].channels = list(range(0, spec.intermediate, 3))
    width.layers[3].channels = [1, 5, 7]
    width.layers[3].mlp_bias = [0.01 * i for i in range(spec.hidden)]
    width.layers[0].attn_bias = [0.02] * spec.hidden
    mixed = PruningPlan.dense(spec)
    mixed.layers[0].attn = False
    mixed.layers[1].heads = [1, 3]
    mixed.layers[2].mlp = False
    mixed.layers[3].channels = list(range(10, 40))
    return {"depth": depth, "width": width, "mixed": mixed, "dense": PruningPlan.dense(spec)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["depth", "width", "mixed"])
def test_pruned_logits_equal_masked_dense(arch, kind):
    model = tiny_model(arch)
    spec = get_adapter(model).spec()
    plan = plans(spec)[kind]
    ref = masked_reference(model, plan)
    pruned = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        want = ref(IDS).logits
        got = pruned(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # physical: the parameter count is the plan's accounting, and fewer than dense
    assert unique_param_count(pruned) == plan.params(spec) < spec.total_params


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_with_cache_equals_without(arch):
    model = tiny_model(arch)
    spec = get_adapter(model).spec()
    pruned = apply_plan(copy.deepcopy(model), plans(spec)["mixed"])  # layer 0 has no attention
    prompt = IDS[:1, :12]
    with torch.no_grad():
        a = pruned.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
        b = pruned.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(a, b)
    assert a.shape[1] == 22


def test_removed_blocks_do_no_compute():
    model = tiny_model("llama")
    spec = get_adapter(model).spec()
    pruned = apply_plan(model, plans(spec)["depth"])
    layers = pruned.model.layers
    assert len(layers) == 3 and pruned.config.num_hidden_layers == 3
    assert not hasattr(layers[0], "self_attn") and hasattr(layers[0], "mlp")
    assert not hasattr(layers[1], "mlp") and hasattr(layers[1], "self_attn")
    assert [l.self_attn.layer_idx for l in layers if hasattr(l, "self_attn")] == [1, 2]


def test_gemma_layer_types_follow_removed_layers():
    model = tiny_model("gemma3_text")
    spec = get_adapter(model).spec()
    plan = PruningPlan.from_removed_blocks(spec, [(1, "attn"), (1, "mlp")])
    pruned = apply_plan(model, plan)
    assert pruned.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
