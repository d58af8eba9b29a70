"""Shared fixtures: tiny randomly initialised models of every supported architecture (no download), and the
real embedded model (converted once into the cache, loaded per session)."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
LLAMA_CPP_MISSING = "llama-cpp-python is not installed (`make setup` builds it)"
needs_llama_cpp = pytest.mark.skipif(not LLAMA_CPP, reason=LLAMA_CPP_MISSING)  # for tests that run it in a subprocess


class _SkipOnUse(types.ModuleType):
    """Stands in for llama_cpp where it is not installed: the test that first uses it (directly, or through
    secateurs' binding, the CLI included) is skipped, saying why; every other test runs."""

    def __getattr__(self, name):
        if name.startswith(("__", "_pytest")):  # the import system's and pytest's probes
            raise AttributeError(name)
        pytest.skip(LLAMA_CPP_MISSING)


if not LLAMA_CPP:
    sys.modules["llama_cpp"] = _SkipOnUse("llama_cpp")

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)


def tiny_config(model_type: str, **over):
    from transformers import AutoConfig

    kw = dict(TINY, **over)
    if model_type == "gemma3_text":
        kw.update(head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                  layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"][: kw["num_hidden_layers"]] )
    if model_type in ("qwen3",):
        kw.update(head_dim=16)
    if model_type == "llama":
        kw.update(tie_word_embeddings=True)
    return AutoConfig.for_model(model_type, **kw)


def busy_machine(extra: int = 1):
    """The artificial load of the load tests (``secateurs.eval.load.busy_machine``)."""
    from secateurs.eval.load import busy_machine as load

    return load(extra)


def private_cache(tmp_path, monkeypatch) -> Path:
    """A cache folder of the test's own (``SECATEURS_CACHE``: its tell responses, costs and plans start empty)
    that reads the real models from the shared one, created if this machine has fetched none yet."""
    from secateurs.files import cache_dir

    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)  # a link to a missing folder would break the first fetch
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(models)
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_model(model_type: str, seed: int = 0, **over):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(model_type, **over), dtype=torch.float32)
    # randomise norms and biases too, so that a wrong slice cannot hide behind ones and zeros
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in n and model_type != "gemma3_text" else 0.0))
    return m.eval()


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]


def prune(model, method: str, ratio, calib, workdir=None, tokenizer=None, **options):
    """The plan of ``method`` (by name, with these options) for ``model`` through the API (``secateurs.prune``:
    the method's checks and ratio rule included); ``plan.record`` holds what the method recorded."""
    import secateurs
    from secateurs.methods import get_method, make_config

    return secateurs.prune(model, tokenizer, make_config(get_method(method), options), ratio=ratio, calib=calib,
                           workdir=workdir, progress=False)


def tiny_bpe_tokenizer(vocab_size: int, special: list[str], bos: str, eos: str):
    """A real byte-level BPE tokenizer with a small vocabulary, trained on the first 300 wiki:calib paragraphs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from secateurs.data import load_texts

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(load_texts("wiki")[:300], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos)


@pytest.fixture(scope="session")
def smollm():
    from secateurs.sources import load_model

    return load_model("smollm2-135m", progress=False)
