"""The layer-by-layer runner reproduces the model: replaying every layer from the captured inputs and
keyword arguments gives the model's own loss, for every architecture; skipping a branch in the replay equals
physically removing that block."""
import copy

import pytest
import torch

from conftest import ARCHS, tiny_model
from secateurs.eval.perplexity import row_nll
from secateurs.importance.activations import InputStats, capture, nll_from_hidden, run_layer
from secateurs.models import get_adapter
from secateurs.plan import PruningPlan
from secateurs.surgery import apply_plan

IDS = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("arch", ARCHS)
def test_replay_equals_model_and_surgery(arch):
    model = tiny_model(arch)
    ad = get_adapter(model)
    cap = capture(model, ad, IDS)
    with torch.no_grad():
        h = cap.hidden[0]
        for i, layer in enumerate(ad.layers()):
            h = run_layer(ad, layer, h, cap.kwargs[i])
        torch.testing.assert_close(nll_from_hidden(ad, h, IDS), row_nll(model, IDS), atol=1e-4, rtol=1e-5)
        # skip attention of layer 1 and the MLP of layer 2 in the replay
        h = cap.hidden[0]
        for i, layer in enumerate(ad.layers()):
            h = run_layer(ad, layer, h, cap.kwargs[i], attn=i != 1, mlp=i != 2)
        replay = nll_from_hidden(ad, h, IDS)
    pruned = apply_plan(copy.deepcopy(model), PruningPlan.from_removed_blocks(ad.spec(), [(1, "attn"), (2, "mlp")]))
    with torch.no_grad():
        torch.testing.assert_close(replay, row_nll(pruned, IDS), atol=1e-4, rtol=1e-5)


def test_input_stats():
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(4, 5, 3)
    with InputStats({"l": lin}) as st:
        lin(x)
    flat = x.reshape(-1, 3).double()
    torch.testing.assert_close(st.mean("l"), flat.mean(0))
    torch.testing.assert_close(st.var("l"), flat.var(0))
    torch.testing.assert_close(st.l2("l"), flat.norm(dim=0))


def test_flap_compensation_keeps_expected_output():
    """With the bias from compensation_bias, the mean output of a projection over the calibration inputs is
    unchanged when columns are removed (the definition of FLAP's compensation)."""
    from secateurs.importance.width import compensation_bias, flap_column_scores, head_scores

    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 5, bias=False)
    x = torch.randn(100, 8) + torch.arange(8.0)
    with InputStats({"o": lin}) as st:
        lin(x)
    keep = [0, 2, 3, 7]
    bias = torch.tensor(compensation_bias(lin.weight, st.mean("o"), keep))
    pruned_out = x[:, keep] @ lin.weight[:, keep].T + bias
    torch.testing.assert_close(pruned_out.mean(0).double(), lin(x).mean(0).double(), atol=1e-4, rtol=1e-4)
    s = flap_column_scores(lin.weight, st.var("o"))
    torch.testing.assert_close(s, x.double().var(0) * lin.weight.double().pow(2).sum(0))
    assert head_scores(s, 4).shape == (2,)
