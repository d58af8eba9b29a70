"""GGUF export and llama.cpp: the file llama.cpp loads computes what the PyTorch model computes.

- Tiny random llama / mistral / qwen2 with uneven plans (deci: a first layer without attention, a layer that
  keeps attention and loses its MLP, uneven heads and channels, FLAP-style biases), and stock plans of
  llama, qwen2, qwen3, gemma3: f32 logits equal PyTorch's within 1e-4 of the logit scale, 32 greedy tokens
  identical. The n_ff == 0 behaviour of llama.cpp's deci graph is shown directly (without the minimal FFN the
  attention of that layer is lost).
- SmolLM2 with blockpruner (saved order), flap (bias compensation), tell and self-pruner plans (slow).
- q8_0 perplexity within 2% of f32 on wiki:test; the rows are the PyTorch path's rows; the tokenizer fields
  against the original GGUF of the embedded model (slow).
- Bad input: a plan llama.cpp cannot hold, corrupt / truncated files to eval and bench, an unknown --type,
  files of different types to bench: one line, exit 2, nothing left behind.
"""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_model
from secateurs.cli import main
from secateurs.export import gguf as gx
from secateurs.models import get_adapter
from secateurs.plan import LayerPlan, PruningPlan
from secateurs.surgery import apply_plan

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make setup`")
from secateurs.eval import llamacpp as lx  # noqa: E402

TOL = 1e-4  # max |logit difference| / max |logit|: f32 weights and an f32 KV cache in llama.cpp, f32 in PyTorch
TOL_GELU = 2e-3  # gemma3: ggml's CPU GELU reads an f16 table (GGML_GELU_FP16 in ggml-cpu/vec.h)
N_GREEDY = 32
ROOT = Path(__file__).resolve().parents[1]


def uneven_plan(spec, bias=True) -> PruningPlan:
    """Layer 0 loses attention (first block without attention), layer 1 keeps attention and loses its MLP,
    layer 2 is narrowed with bias compensation, layer 3 stays dense."""
    g = torch.Generator().manual_seed(5)
    plan = PruningPlan.dense(spec)
    plan.layers[0] = LayerPlan(attn=False)
    plan.layers[1] = LayerPlan(mlp=False)
    plan.layers[2] = LayerPlan(heads=[0, 1], channels=list(range(0, spec.intermediate, 2)),
                               attn_bias=(torch.randn(spec.hidden, generator=g) * 0.1).tolist() if bias else None,
                               mlp_bias=(torch.randn(spec.hidden, generator=g) * 0.1).tolist() if bias else None)
    return plan


def compare(model, path, ids, n_greedy=N_GREEDY):
    """(relative max logit difference, PyTorch greedy tokens, llama.cpp greedy tokens)."""
    llm = lx.open_model(path, n_ctx=len(ids) + n_greedy + 8, threads=1, logits_all=True, kv_f32=True)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float().numpy()
    got = lx.logits(llm, ids)
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    return rel, torch_greedy(model, ids, n_greedy), lx.greedy(llm, ids, n_greedy)


@torch.no_grad()
def torch_greedy(model, ids, n):
    """``n`` greedy tokens, a full forward pass per step (no EOS handling: llama.cpp's loop has none either)."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


IDS = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(7)).tolist()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_uneven_plans_become_deci_and_match(arch, tmp_path):
    model = tiny_model(arch)
    spec = get_adapter(model).spec()
    apply_plan(model, uneven_plan(spec), spec)
    r = gx.export_gguf(model, None, tmp_path / "m.gguf", "f32")
    assert r["arch"] == "deci"
    layers = r["layers"]
    assert (layers[0]["n_head"], layers[0]["kept_heads"]) == (1, 0)  # the all-zero head of a first block
    assert (layers[1]["n_ff"], layers[1]["kept_channels"]) == (1, 0)  # the minimal zero FFN
    assert (layers[2]["n_head"], layers[2]["n_head_kv"], layers[2]["n_ff"]) == (2, 1, spec.intermediate // 2)
    names = {t.name for t in __import__("gguf").GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert {"blk.2.attn_output.bias", "blk.2.ffn_down.bias"} <= names  # FLAP's compensation, where deci reads it
    if arch == "qwen2":
        assert {"blk.1.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"} <= names
    rel, ref, got = compare(model, tmp_path / "m.gguf", IDS)
    assert rel < TOL
    assert got == ref


@pytest.mark.parametrize("arch,stock", [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3"),
                                        ("gemma3_text", "gemma3")])
def test_stock_plans_keep_the_stock_architecture(arch, stock, tmp_path):
    """Dense, one whole layer removed, equal widths (for qwen2, whose llama.cpp graph needs heads x head size
    = hidden size, equal narrowed widths become deci)."""
    for k, plan_of in enumerate([
        lambda spec: PruningPlan.dense(spec),
        lambda spec: PruningPlan.from_removed_blocks(spec, [(1, "attn"), (1, "mlp")]),  # a whole layer
        lambda spec: PruningPlan([LayerPlan(heads=[0, 1, 2, 3] if spec.n_kv == 4 else [0, spec.group_size],
                                            channels=list(range(40))) for _ in range(spec.n_layers)], spec.as_dict()),
    ]):
        model = tiny_model(arch)
        spec = get_adapter(model).spec()
        apply_plan(model, plan_of(spec), spec)
        r = gx.export_gguf(model, None, tmp_path / f"{k}.gguf", "f32")
        assert r["arch"] == ("deci" if arch == "qwen2" and k == 2 else stock)
        rel, ref, got = compare(model, tmp_path / f"{k}.gguf", IDS, n_greedy=8)
        assert rel < (TOL_GELU if arch == "gemma3_text" else TOL), (k, rel)
        assert got == ref


def test_gemma3_whole_layer_removal_keeps_each_layer_attention_type(tmp_path):
    """Removing layer 3 (the global one of the tiny pattern) leaves three sliding layers: the written pattern
    must say so, or llama.cpp's default every-6th-is-global rule would apply."""
    model = tiny_model("gemma3_text")
    spec = get_adapter(model).spec()
    apply_plan(model, PruningPlan.from_removed_blocks(spec, [(0, "attn"), (0, "mlp")]), spec)
    gx.export_gguf(model, None, tmp_path / "g.gguf", "f32")
    r = __import__("gguf").GGUFReader(str(tmp_path / "g.gguf"))
    assert list(r.fields["gemma3.attention.sliding_window_pattern"].contents()) == [True, True, False]
    ids = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(1)).tolist()  # beyond the window of 8
    rel, ref, got = compare(model, tmp_path / "g.gguf", ids, n_greedy=8)
    assert rel < TOL_GELU and got == ref


def test_llama_cpp_drops_attention_of_a_layer_without_ffn(tmp_path, monkeypatch):
    """Why the minimal FFN exists: written with n_ff = 0, llama.cpp computes the model *without* that layer's
    attention. If llama.cpp fixes its deci graph this test says so (and the workaround may go)."""
    model = tiny_model("llama")
    spec = get_adapter(model).spec()
    plan = PruningPlan.from_removed_blocks(spec, [(1, "mlp")])
    pruned = apply_plan(copy.deepcopy(model), plan, spec)
    monkeypatch.setattr(gx, "ZERO_FFN", 0)
    gx.export_gguf(pruned, None, tmp_path / "naive.gguf", "f32")
    llm = lx.open_model(tmp_path / "naive.gguf", n_ctx=32, threads=1, logits_all=True, kv_f32=True)
    got = lx.logits(llm, IDS)
    with torch.no_grad():
        kept = pruned(torch.tensor([IDS])).logits[0].numpy()
        lost = apply_plan(copy.deepcopy(model), PruningPlan.from_removed_blocks(spec, [(1, "mlp"), (1, "attn")]),
                          spec)(torch.tensor([IDS])).logits[0].numpy()
    scale = np.abs(kept).max()
    assert np.abs(got - kept).max() / scale > 100 * TOL  # wrong for the pruned model...
    assert np.abs(got - lost).max() / scale < TOL  # ...because it is the model without that attention


def test_quantized_exports_pad_channels_and_run(tmp_path):
    model = tiny_model("llama")
    spec = get_adapter(model).spec()
    apply_plan(model, uneven_plan(spec), spec)
    r = gx.export_gguf(model, None, tmp_path / "q.gguf", "q8_0", threads=1)
    assert r["layers"][2]["n_ff"] % 32 == 0 and r["layers"][2]["kept_channels"] == spec.intermediate // 2
    info = lx.read_info(tmp_path / "q.gguf")
    assert info.type_name == "q8_0" and [L["channels"] for L in info.layers][2] == spec.intermediate // 2
    rel, _, _ = compare(model, tmp_path / "q.gguf", IDS, n_greedy=1)
    assert rel < 0.05  # 8-bit weights: close, not equal
    assert not list(tmp_path.glob("*.partial"))


def test_refused_plans_write_nothing(tmp_path, capsys):
    model = tiny_model("gemma3_text")
    spec = get_adapter(model).spec()
    apply_plan(model, uneven_plan(spec, bias=False), spec)
    with pytest.raises(gx.UserError, match="gemma3_text.*exportable: any plan of llama, mistral and qwen2"):
        gx.export_gguf(model, None, tmp_path / "g.gguf", "f32")
    assert not list(tmp_path.iterdir())
