"""GGUF export and llama.cpp: the file llama.cpp loads computes what the PyTorch model computes.

- Tiny random llama / mistral / qwen2 with uneven plans (deci: a first layer without attention, a layer that
  keeps attention and loses its MLP, uneven heads and channels, FLAP-style biases), and stock plans of
  llama, qwen2, qwen3, gemma3: f32 logits equal PyTorch's within 1e-4 of the logit scale, 32 greedy tokens
  identical. The n_ff == 0 behaviour of llama.cpp's deci graph is shown directly (without the minimal FFN the
  attention of that layer is lost).
- SmolLM2 with blockpruner (saved order), flap (bias compensation), tell and self-pruner plans (slow).
- q8_0 perplexity within 2% of f32 on wiki:test; the rows are the PyTorch path's rows; the tokenizer fields
  against the original GGUF of the embedded model (slow).
- Streaming: a pruned or dense folder exported without loading it (one row or head per block) gives, byte
  for byte, the file of the model loaded from it (tiny folders of every architecture and f32 / f16 / bf16 /
  q8_0; SmolLM2 and a FLAP folder of it, slow); bf16 files declare element shapes; f16 is the default; every
  quantized type loads and runs.
- Bad input: a plan llama.cpp cannot hold, corrupt / truncated files to eval and bench, an unknown --type,
  files of different types to bench: one line, exit 2, nothing left behind.
"""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_bpe_tokenizer, tiny_model
from secateurs.cli import main
from secateurs.export import gguf as gx
from secateurs.export import gguf_tensors
from secateurs.models import get_adapter
from secateurs.plan import LayerPlan, PruningPlan
from secateurs.surgery import apply_plan

import llama_cpp  # noqa: E402,F401  (without it, conftest's stand-in skips only the tests that use it)
from conftest import needs_llama_cpp  # noqa: E402  (tests that run it in a subprocess or check it up front)
from secateurs.llamacpp import model as lx  # noqa: E402
from secateurs.llamacpp.perplexity import Handle  # noqa: E402

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


@needs_llama_cpp
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


@needs_llama_cpp
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


@needs_llama_cpp
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


def test_gguf_flops_are_the_pytorch_count_with_sliding_windows(tmp_path):
    """One FLOP count for both engines: a GGUF's sizes and sliding-window pattern give the count of the PyTorch
    model it was written from, past the window of 8 (three sliding layers of the tiny gemma3 remain)."""
    from secateurs.eval.bench import model_flops
    from secateurs.llamacpp.bench import flops

    model = tiny_model("gemma3_text")
    spec = get_adapter(model).spec()
    apply_plan(model, PruningPlan.from_removed_blocks(spec, [(3, "attn"), (3, "mlp")]), spec)
    gx.export_gguf(model, None, tmp_path / "g.gguf", "f32")
    info = lx.read_info(tmp_path / "g.gguf")
    assert [L["window"] for L in info.layers] == [8, 8, 8]
    for T in (4, 24):
        assert flops(info, T) == model_flops(model, T)


@needs_llama_cpp
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


@needs_llama_cpp
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


# --- streamed from a folder: the file of the model in memory, without loading it -----------------------------
def saved_folder(arch, plan_of, folder, dtype=torch.float32):
    """A tiny ``arch`` model, pruned by ``plan_of(spec)`` and saved as a pruned folder in ``dtype``."""
    from secateurs.export.checkpoint import _plain_config, save_pruned

    model = tiny_model(arch).to(dtype)
    spec = get_adapter(model).spec()
    plan = plan_of(spec)
    dense_cfg = _plain_config(model.config)
    save_pruned(apply_plan(model, plan, spec), None, plan, dense_cfg, folder)
    return folder


def whole_layer(spec):
    return PruningPlan.from_removed_blocks(spec, [(1, "attn"), (1, "mlp")])


@pytest.mark.parametrize("arch,plan_of,dtype,ftype", [
    ("llama", uneven_plan, torch.float32, "f32"),  # custom folder: deci, zero head, zero FFN, biases
    ("qwen2", uneven_plan, torch.bfloat16, "f16"),  # a bfloat16 folder
    ("gemma3_text", whole_layer, torch.float32, "bf16"),  # stock-depth folder, norm offset, sliding pattern
    ("qwen3", whole_layer, torch.float32, "f16"),  # q/k norms
    pytest.param("llama", uneven_plan, torch.float32, "q8_0", marks=needs_llama_cpp),  # padded MLPs, quantizer
])
def test_folder_export_streams_the_file_of_the_loaded_model(arch, plan_of, dtype, ftype, tmp_path, monkeypatch):
    """``export FOLDER`` reads the tensors from the folder's safetensors (the model is never loaded; here one
    row or one head per block) and writes, byte for byte, the file of the model loaded from that folder (by
    transformers where the folder is stock, else by ``secateurs.load``)."""
    import gguf
    import secateurs.sources
    from transformers import AutoModelForCausalLM

    from secateurs.export.checkpoint import load_pruned

    folder = saved_folder(arch, plan_of, tmp_path / "pruned", dtype)
    kind = json.loads((folder / "secateurs.json").read_text())["export"]
    loaded = (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32) if kind != "custom"
              else load_pruned(folder)[0])
    loaded.secateurs_plan = PruningPlan.load(folder / "plan.json")  # what secateurs.load sets (the file records it)
    gx.export_model(str(folder), str(tmp_path / "memory.gguf"), ftype, threads=1, progress=False, model=loaded)

    def no_loading(*a, **k):
        raise AssertionError("the folder was loaded")

    monkeypatch.setattr(secateurs.sources, "load_model", no_loading)
    monkeypatch.setattr(gguf_tensors, "BLOCK_BYTES", 1)
    r = gx.export_model(str(folder), str(tmp_path / "streamed.gguf"), ftype, threads=1, progress=False)
    if ftype == "f32":  # a folder written from a model named otherwise (a prune's work folder): that name recorded
        gx.export_model("the-source", str(tmp_path / "named.gguf"), ftype, progress=False, folder=folder)
        assert gguf.GGUFReader(str(tmp_path / "named.gguf")).fields["secateurs.source"].contents() == "the-source"
        (tmp_path / "named.gguf").unlink()
    assert r["arch"] == ("deci" if plan_of is uneven_plan else gx.adapter_class(arch).llamacpp[arch].even)
    assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "memory.gguf").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.gguf", "pruned", "streamed.gguf"]


def test_bf16_files_declare_the_element_shapes_and_f16_is_the_default(tiny_folder, tmp_path):
    """bf16 tensors are stored as raw bytes: the file must declare their element shapes (those of the f32 file),
    or llama.cpp refuses it; and `export` without --type writes f16, as llama.cpp's own converter."""
    import gguf

    for t in ("f32", "bf16"):
        assert main(["export", str(tiny_folder), "--type", t, "--out", str(tmp_path / f"{t}.gguf"), "--quiet"]) == 0
    assert main(["export", str(tiny_folder), "--out", str(tmp_path / "default.gguf"), "--quiet"]) == 0
    f32, bf16 = (gguf.GGUFReader(str(tmp_path / f"{t}.gguf")) for t in ("f32", "bf16"))
    assert [(t.name, list(t.shape)) for t in bf16.tensors] == [(t.name, list(t.shape)) for t in f32.tensors]
    assert {t.tensor_type.name for t in bf16.tensors} == {"BF16", "F32"}
    default = gguf.GGUFReader(str(tmp_path / "default.gguf"))
    assert default.fields["general.file_type"].contents() == gx.FILE_TYPE["f16"] == 1
    assert {t.tensor_type.name for t in default.tensors} == {"F16", "F32"}


@needs_llama_cpp
def test_bf16_and_every_quantized_type_run_in_llama_cpp(tmp_path):
    """Each --type loads in llama.cpp, says its type, and computes the model (close, not equal: fewer bits)."""
    model = tiny_model("llama")
    spec = get_adapter(model).spec()
    apply_plan(model, uneven_plan(spec), spec)
    for t, bound in (("bf16", 0.02), ("q8_0", 0.05), ("q6_k", 0.05), ("q5_k_m", 0.1), ("q4_k_m", 0.2),
                     ("q3_k_m", 0.4), ("q2_k", 0.6)):
        gx.export_gguf(model, None, tmp_path / f"{t}.gguf", t, threads=1)
        assert lx.read_info(tmp_path / f"{t}.gguf").type_name == t
        rel, _, _ = compare(model, tmp_path / f"{t}.gguf", IDS, n_greedy=1)
        assert rel < bound, (t, rel)


# --- SmolLM2: real plans of every method family -------------------------------------------------------------
ORDER = ROOT / "benchmarks" / "results" / "order-smollm2-135m-16x256-fp32.json"


def smollm_plan(name, model, tok, tmp_path):
    """A plan of ``name`` for SmolLM2 at ratio ~0.25 (small calibration: these tests check the export)."""
    from secateurs.data import calib_rows
    from secateurs.methods import PruneContext, get_method, make_config
    from secateurs.search.greedy import plan_from_order

    spec = get_adapter(model).spec()
    if name == "blockpruner":  # the saved removal order (16 x 256 tokens): no search here
        return plan_from_order(spec, json.loads(ORDER.read_text())["steps"], 0.25, None, "blockpruner")[0]
    calib = calib_rows(tok, model, "wiki", 4, 128, 0)
    ctx = PruneContext(model, tok, get_adapter(model), spec, calib, 0.25, 0, tmp_path, False)
    options = {"flap": {},
               "tell": dict(assign="importance", block_threshold=0.5, te_rank=4, te_tokens=256, latency_len=32,
                            latency_reps=1),
               "self-pruner": dict(proposer="classic", population=3, generations=1, crossover=1, mutation=1,
                                   fitness_rows=2)}[name]
    m = get_method(name)
    return m.fn(ctx, make_config(m, options))


@needs_llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize("method", ["blockpruner", "flap", "tell", "self-pruner"])
def test_smollm2_plans_match_in_llama_cpp(method, smollm, tmp_path, monkeypatch):
    from secateurs.data import eval_rows

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))  # tell's cost cache stays in the test
    dense, tok = smollm
    plan = smollm_plan(method, dense, tok, tmp_path)
    spec = get_adapter(dense).spec()
    model = apply_plan(copy.deepcopy(dense), plan, spec)
    r = gx.export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    assert r["arch"] == "deci"
    kinds = {(lp.attn, lp.mlp) for lp in plan.layers}
    if method == "blockpruner":  # both partial kinds are in this plan: layers 13 and 15 keep only attention
        assert {(True, False), (False, True)} <= kinds
        assert sum(1 for L in r["layers"] if L["n_ff"] == 1 and L["kept_channels"] == 0) == 2
    if method == "flap":
        assert any(lp.attn_bias for lp in plan.layers) and any(lp.mlp_bias for lp in plan.layers)
    ids = eval_rows(tok, model, "wiki:test", 64, 1)[0].tolist()
    rel, ref, got = compare(model, tmp_path / "m.gguf", ids)
    assert rel < TOL, rel
    assert got == ref


@pytest.mark.slow
def test_smollm2_folders_stream_the_file_of_the_loaded_model(smollm, tmp_path, monkeypatch):
    """The embedded SmolLM2 folder (loaded by transformers) and a FLAP folder of it (loaded by secateurs.load):
    the streamed export, which never loads them, writes the same bytes, tokenizer included."""
    import secateurs.sources
    from transformers import AutoModelForCausalLM

    from secateurs.export.checkpoint import _plain_config, load_pruned, save_pruned
    from secateurs.sources import embedded_folder

    dense, tok = smollm
    spec = get_adapter(dense).spec()
    plan = smollm_plan("flap", dense, tok, tmp_path)
    flap = tmp_path / "flap"
    save_pruned(apply_plan(copy.deepcopy(dense), plan, spec), tok, plan, _plain_config(dense.config), flap)
    loaded = {"smollm2-135m": AutoModelForCausalLM.from_pretrained(embedded_folder("smollm2-135m"), dtype=torch.float32),
              str(flap): load_pruned(flap, tokenizer=False)[0]}
    for ref, model in loaded.items():
        gx.export_model(ref, str(tmp_path / "memory.gguf"), "f16", progress=False, model=model, tokenizer=tok)
        with monkeypatch.context() as m:
            m.setattr(secateurs.sources, "load_model", None)  # not called: the folder is read in place
            gx.export_model(ref, str(tmp_path / "streamed.gguf"), "f16", progress=False)
        assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "memory.gguf").read_bytes(), ref
        for f in ("memory.gguf", "streamed.gguf"):
            (tmp_path / f).unlink()


@needs_llama_cpp
@pytest.mark.slow
def test_q8_0_perplexity_within_2_percent_of_f32_on_the_pytorch_rows(smollm, tmp_path, capsys):
    """Through the CLI: export f32 and q8_0 of the blockpruner plan, `secateurs eval FILE.gguf`; the rows
    llama.cpp sees are the PyTorch path's rows, f32 agrees with PyTorch, q8_0 is within 2% of f32."""
    from secateurs.data import eval_rows
    from secateurs.eval.perplexity import perplexity

    dense, tok = smollm
    spec = get_adapter(dense).spec()
    model = apply_plan(copy.deepcopy(dense), smollm_plan("blockpruner", dense, tok, tmp_path), spec)
    rows_torch = eval_rows(tok, model, "wiki:test", 256, 4)
    ppl_torch = perplexity(model, rows_torch).ppl
    ppl = {}
    for t in ("f32", "q8_0"):
        gx.export_gguf(model, tok, tmp_path / f"{t}.gguf", t, threads=1)
        assert main(["eval", str(tmp_path / f"{t}.gguf"), "--ppl", "wiki:test", "--seqlen", "256", "--rows", "4",
                     "--threads", "1", "--quiet", "--json", str(tmp_path / f"{t}.json")]) == 0
        ppl[t] = json.loads((tmp_path / f"{t}.json").read_text())["ppl"]["wiki:test"]["ppl"]
    h = Handle(str(tmp_path / "q8_0.gguf"), 256, threads=1)
    assert torch.equal(h.rows("wiki:test", 256, 4), rows_torch)
    assert abs(ppl["f32"] / ppl_torch - 1) < 1e-3, (ppl, ppl_torch)  # f16 KV cache in llama.cpp's default
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.02, ppl
    print(f"\nwiki:test 4 x 256, blockpruner 0.25: PyTorch {ppl_torch:.4f}, llama.cpp f32 {ppl['f32']:.4f}, "
          f"q8_0 {ppl['q8_0']:.4f}")


@needs_llama_cpp
@pytest.mark.slow
def test_smollm2_tokenizer_fields_equal_the_original_gguf(smollm, tmp_path):
    """The embedded SmolLM2 came from a GGUF: the exported vocabulary, merges, token types, special ids,
    add_bos, pre-tokenizer and chat template equal the original file's. (The Hugging Face tokenizer that
    transformers made from that GGUF lost the digit splitting; its vocabulary has no multi-digit tokens, so
    llama.cpp's "smollm" still splits exactly as it does.)"""
    import gguf

    from secateurs.sources import EMBEDDED

    dense, tok = smollm
    layout = gx.choose_layout(dense)
    vocab = gx_vocab().vocab_for(tok, layout.top["token_embd.weight"].shape[0])
    gx.write_file(layout, dense.config, vocab, tmp_path / "v.gguf", "f32", {"name": "x"}, tensors=False)
    mine = gguf.GGUFReader(str(tmp_path / "v.gguf")).fields
    orig = gguf.GGUFReader(str(EMBEDDED["smollm2-135m"].gguf(tmp_path))).fields
    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id",
                "padding_token_id", "add_bos_token", "model", "pre"):
        assert mine[f"tokenizer.ggml.{key}"].contents() == orig[f"tokenizer.ggml.{key}"].contents(), key
    assert mine["tokenizer.chat_template"].contents() == orig["tokenizer.chat_template"].contents()
    llm = llama_cpp.Llama(str(tmp_path / "v.gguf"), vocab_only=True, verbose=False)
    text = "In 2024, 12345 people said: hello . world !"
    ids = llm.tokenize(text.encode(), add_bos=False)
    assert ids == tok(text, add_special_tokens=False).input_ids
    assert llm.detokenize(ids).decode() == tok.decode(ids) == text  # no space clean-up on either side


def gx_vocab():
    from secateurs.export import gguf_vocab

    return gguf_vocab


@needs_llama_cpp
@pytest.mark.slow
def test_gemma3_tokenizer_in_llama_cpp_equals_hugging_face():
    """Gemma's byte-fallback BPE written as a SentencePiece vocabulary (scores from the merge ranks): llama.cpp
    tokenizes the whole wiki:test text and special tokens exactly as the Hugging Face tokenizer."""
    import tempfile

    from secateurs.data import load_texts
    from secateurs.sources import load_model

    model, tok = load_model("gemma3-270m", progress=False)
    layout = gx.choose_layout(model)
    vocab = gx_vocab().vocab_for(tok, layout.top["token_embd.weight"].shape[0])
    assert (vocab.model, vocab.add_bos) == ("llama", True)
    with tempfile.TemporaryDirectory() as tmp:
        gx.write_file(layout, model.config, vocab, Path(tmp) / "v.gguf", "f32", {"name": "x"}, tensors=False)
        llm = llama_cpp.Llama(str(Path(tmp) / "v.gguf"), vocab_only=True, verbose=False)
        text = "\n\n".join(load_texts("wiki:test"))
        assert llm.tokenize(text.encode(), add_bos=False) == tok(text, add_special_tokens=False).input_ids
        chat = "<start_of_turn>user\nHello  world\t2024<end_of_turn>\n"
        assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok(chat, add_special_tokens=False).input_ids


# --- the commands and bad input -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random llama with a real byte-level BPE tokenizer (trained on wiki text), saved as a folder."""
    tok = tiny_bpe_tokenizer(320, ["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>")
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model = tiny_model("llama", vocab_size=320, bos_token_id=0, eos_token_id=0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def one_line_exit_2(capsys, argv, *match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("secateurs: error:"), err
    for m in match:
        assert m in err, err
    return err


@needs_llama_cpp
def test_cli_export_prune_eval_bench(tiny_folder, tmp_path, capsys):
    dense = tmp_path / "dense.gguf"
    assert main(["export", str(tiny_folder), "--type", "f32", "--out", str(dense), "--quiet"]) == 0
    assert "llama.cpp architecture llama" in capsys.readouterr().out
    info = lx.read_info(dense)
    assert (info.arch, info.type_name, info.model_type) == ("llama", "f32", "llama")
    llm = llama_cpp.Llama(str(dense), vocab_only=True, verbose=False)
    from secateurs.data import load_texts
    from transformers import AutoTokenizer

    text = "\n\n".join(load_texts("wiki:test")[:50])
    assert llm.tokenize(text.encode(), add_bos=False) == AutoTokenizer.from_pretrained(tiny_folder)(text).input_ids
    out = tmp_path / "run"
    assert main(["prune", str(tiny_folder), "--method", "blockpruner", "--steps", "3", "--blocks", "mlp",
                 "--nsamples", "2", "--seqlen", "32", "--eval", "", "--quiet", "--export", "gguf", "--export-type", "f32",
                 "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["gguf"]["arch"] == "deci" and result["gguf"]["file"] == "model.gguf"
    assert result["settings"]["export"] == "gguf" and (out / "model.gguf").exists()
    assert "`model.gguf` in this folder (GGUF f32)" in (out / "README.md").read_text()  # the model card says so
    capsys.readouterr()
    assert main(["eval", str(out / "model.gguf"), "--ppl", "wiki:test", "--seqlen", "32", "--rows", "2", "--threads", "1",
                 "--quiet", "--json", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["settings"]["engine"] == "llama.cpp" and e["ppl"]["wiki:test"]["rows"] == 2
    assert main(["bench", str(out / "model.gguf"), "--against", str(dense), "--prompt-len", "16", "--decode-tokens", "4",
                 "--reps", "1", "--warmup", "0", "--threads", "1", "--json", str(tmp_path / "b.json")]) == 0
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["settings"]["engine"] == "llama.cpp" and b["against"]["model"] == str(dense)
    assert b["peak_memory_mb"] > 0 and b["ideal_speedup"]["prefill"] > 1.0  # three MLP blocks fewer
    assert "prompt tokens/s" in capsys.readouterr().out


@needs_llama_cpp
def test_bad_input_one_line_exit_2_nothing_left(tiny_folder, tmp_path, capsys):
    good = tmp_path / "good.gguf"
    assert main(["export", str(tiny_folder), "--out", str(good), "--quiet"]) == 0
    capsys.readouterr()
    # an unknown --type, before anything is loaded
    one_line_exit_2(capsys, ["export", str(tiny_folder), "--type", "q3_x", "--out", str(tmp_path / "x.gguf")],
                    "unknown GGUF type 'q3_x'", "q4_k_m")
    # a plan llama.cpp cannot hold (uneven gemma3)
    gm = tiny_model("gemma3_text")
    spec = get_adapter(gm).spec()
    from secateurs.export.checkpoint import _plain_config, save_pruned

    dense_cfg = _plain_config(gm.config)
    plan = uneven_plan(spec, bias=False)
    save_pruned(apply_plan(gm, plan, spec), None, plan, dense_cfg, tmp_path / "gemma-pruned")
    capsys.readouterr()
    one_line_exit_2(capsys, ["export", str(tmp_path / "gemma-pruned"), "--out", str(tmp_path / "g.gguf"), "--quiet"],
                    "cannot hold this gemma3_text plan", "exportable:")
    # corrupt and truncated files to eval and bench
    data = good.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    (tmp_path / "text.gguf").write_text("not a model")
    for bad, what in (("trunc.gguf", "damaged or truncated"), ("junk.gguf", "damaged or truncated"),
                      ("text.gguf", "not a GGUF file")):
        one_line_exit_2(capsys, ["eval", str(tmp_path / bad), "--rows", "1", "--seqlen", "16",
                                 "--json", str(tmp_path / "e.json")], what)
        one_line_exit_2(capsys, ["bench", str(tmp_path / bad), "--against", str(good), "--json", str(tmp_path / "b.json")],
                        what)
        one_line_exit_2(capsys, ["bench", str(good), "--against", str(tmp_path / bad)], what)
    # files of different types, and a GGUF against a PyTorch model
    assert main(["export", str(tiny_folder), "--type", "q8_0", "--out", str(tmp_path / "q.gguf"), "--quiet", "--threads", "1"]) == 0
    capsys.readouterr()
    one_line_exit_2(capsys, ["bench", str(tmp_path / "q.gguf"), "--against", str(good)], "same GGUF type")
    from secateurs.llamacpp.bench import LlamaBenchSettings, bench  # the library allows it when asked (prune or quantize)

    r = bench(str(tmp_path / "q.gguf"), str(good), LlamaBenchSettings(prompt_len=8, decode_tokens=2, reps=1, warmup=0,
                                                                     threads=1), memory=False, mixed_types=True)
    assert (r["gguf_type"], r["against"]["gguf_type"]) == ("q8_0", "f16")
    one_line_exit_2(capsys, ["bench", str(good), "--against", str(tiny_folder)], "same kind")
    one_line_exit_2(capsys, ["eval", str(good), "--tasks", "piqa"], "perplexity only")
    one_line_exit_2(capsys, ["export", str(tiny_folder), "--out", str(good)], "exists")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["gemma-pruned", "good.gguf", "junk.gguf", "q.gguf", "text.gguf", "trunc.gguf"], left


def test_prune_export_refused_keeps_the_pruned_folder(tmp_path, capsys):
    """`prune --export gguf` on a plan llama.cpp cannot hold (uneven Gemma 3): the pruned folder is complete and
    says why there is no GGUF; the command exits 2 with one line; no GGUF file is left behind."""
    tok = tiny_bpe_tokenizer(320, ["<bos>", "<eos>"], bos="<bos>", eos="<eos>")
    src = tmp_path / "tiny-gemma"
    tiny_model("gemma3_text", vocab_size=320, bos_token_id=0, eos_token_id=1).save_pretrained(src)
    tok.save_pretrained(src)
    out = tmp_path / "run"
    capsys.readouterr()
    one_line_exit_2(capsys, ["prune", str(src), "--method", "blockpruner", "--steps", "1", "--blocks", "mlp",
                             "--nsamples", "2", "--seqlen", "32", "--eval", "", "--quiet", "--export", "gguf",
                             "--out", str(out)], f"pruned model written to {out}, but no GGUF", "exportable:")
    result = json.loads((out / "result.json").read_text())
    assert "cannot hold this gemma3_text plan" in result["gguf"]["refused"]
    assert (out / "plan.json").exists() and not list(out.glob("*.gguf"))
    assert "llama.cpp: no GGUF for this plan (llama.cpp cannot hold this gemma3_text plan" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tiny-gemma"]
