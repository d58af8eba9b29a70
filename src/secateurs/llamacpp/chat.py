"""A GGUF chat model whose answers are decoded under a JSON schema's grammar (``ChatModel``: the Self-Pruner's
local proposer, ``secateurs.search.proposers``).

- **Prompt**: the messages are rendered by the file's own chat template (``tokenizer.chat_template``; a file
  without one is not a chat model and is refused, ``check_chat_file``). The KV cache keeps the previous prompt,
  and a new prompt only evaluates what follows the common prefix.
- **Memory** (``chat_model_bytes``): the file (its weights) plus an f16 KV cache of ``N_CTX`` tokens.
- **Grammar**: llama.cpp's grammar sampler for the schema (llama-cpp-python's converter, ``json_schema_to_gbnf``).
- **Sampling**: the ``top_k`` likeliest tokens are passed through the grammar and the valid ones sampled at
  ``temperature`` (a seeded NumPy generator; 0 = greedy); only when none of them is valid is the whole
  vocabulary passed through the grammar. (llama-cpp-python's own sampler passes the whole vocabulary through the
  grammar at every token, which costs more per token: benchmarks/self_pruner_proposal_time.py times both.)
- **End**: at an end-of-generation token or as soon as the answer is a complete JSON value.
"""
from __future__ import annotations

import ctypes
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from .binding import binding, quiet
from .model import FTYPE_NAMES, GGUFInfo, last_logits, open_model, read_info

N_CTX = 8192  # the context a ChatModel opens (the prompt and its answer must fit)


def check_chat_file(path: str | Path) -> GGUFInfo:
    """The file's GGUF info, or a UserError when it is not a chat model (no chat template in its metadata)."""
    info = read_info(path)
    if not info.chat_template:
        raise UserError(f"{path} is not a chat model: its GGUF metadata has no tokenizer.chat_template (a base "
                        "model, or a file written without its tokenizer's template); give an instruct/chat model's GGUF")
    return info


def chat_model_bytes(path: str | Path, n_ctx: int = N_CTX) -> int:
    """Memory a ``ChatModel`` of this file takes: the file (weights, mapped) and its KV cache of ``n_ctx`` tokens."""
    info = read_info(path)
    return info.bytes + info.kv_bytes(n_ctx)


@dataclass
class Reply:
    text: str
    prompt_tokens: int  # the whole prompt (also the part the KV cache already held)
    completion_tokens: int
    seconds: float = 0.0
    notes: list = field(default_factory=list)


class ChatModel:
    """A GGUF chat model whose answers are decoded under a JSON schema's grammar (see the module docstring)."""

    def __init__(self, path: str | Path, n_ctx: int = N_CTX, threads: int | None = None, top_k: int = 40):
        lc = binding()
        self.path, self.top_k = str(path), top_k
        check_chat_file(path)
        self.llm = open_model(path, n_ctx=n_ctx, threads=threads)
        train = lc.llama_model_n_ctx_train(self.llm.model)
        self.n_ctx = min(self.llm.n_ctx(), train) if train > 0 else self.llm.n_ctx()  # what the model was trained for
        self.vocab = lc.llama_model_get_vocab(self.llm.model)
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        piece = lambda t: self.llm.detokenize([t], special=True).decode("utf-8", "replace") if t >= 0 else ""
        self.template = Jinja2ChatFormatter(self.llm.metadata["tokenizer.chat_template"],
                                            eos_token=piece(self.llm.token_eos()), bos_token=piece(self.llm.token_bos()))
        self._grammars: dict[str, str] = {}

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = self.template(messages=messages).prompt
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def gbnf(self, schema: dict) -> str:
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            from llama_cpp.llama_grammar import json_schema_to_gbnf

            self._grammars[key] = json_schema_to_gbnf(key)
        return self._grammars[key]

    def _prefill(self, ids: list[int]) -> None:
        """Evaluates ``ids`` after the longest prefix the KV cache already holds (at least the last token)."""
        held = self.llm.input_ids[: self.llm.n_tokens]
        n = 0
        for a, b in zip(held, ids):
            if a != b:
                break
            n += 1
        self.llm.n_tokens = min(n, len(ids) - 1)  # eval() drops the cache from n_tokens on
        self.llm.eval(ids[self.llm.n_tokens:])

    def complete(self, messages: list[dict], schema: dict, temperature: float = 0.7, seed: int = 0,
                 max_tokens: int = 512) -> Reply:
        """One answer to ``messages``, decoded under ``schema``'s grammar."""
        lc = binding()
        t0 = time.perf_counter()
        ids = self.prompt_ids(messages)
        if len(ids) + max_tokens > self.n_ctx:
            raise UserError(f"the proposer's prompt ({len(ids)} tokens) and answer ({max_tokens}) do not fit the "
                            f"context of {self.path} ({self.n_ctx} tokens)")
        smpl = lc.llama_sampler_init_grammar(self.vocab, self.gbnf(schema).encode(), b"root")
        if not smpl:
            raise RuntimeError("llama.cpp could not parse the grammar of the answer's schema")
        rng = np.random.default_rng(seed)
        n_vocab = self.llm.n_vocab()
        cand = np.zeros(n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        out: list[int] = []
        try:
            with quiet():
                self._prefill(ids)
                for _ in range(max_tokens):
                    t = self._sample(lc, smpl, last_logits(self.llm), cand, n_vocab, rng, temperature)
                    if lc.llama_vocab_is_eog(self.vocab, t):
                        break
                    lc.llama_sampler_accept(smpl, t)
                    out.append(t)
                    if any(c in self.llm.detokenize([t]) for c in b"]}"):  # maybe the end of the JSON value
                        try:
                            json.loads(self.llm.detokenize(out))
                            break
                        except ValueError:
                            pass
                    self.llm.eval([t])
        finally:
            lc.llama_sampler_free(smpl)
        text = self.llm.detokenize(out).decode("utf-8", "replace")
        return Reply(text, len(ids), len(out), time.perf_counter() - t0)

    def _sample(self, lc, smpl, logits, cand, n_vocab, rng, temperature) -> int:
        k = min(self.top_k, n_vocab)
        top = np.argpartition(-logits, k - 1)[:k]
        for ids in (top, None):  # the top k first; the whole vocabulary only when none of them is valid
            n = k if ids is not None else n_vocab
            c = cand[:n]
            c["id"] = ids if ids is not None else np.arange(n_vocab)
            c["logit"] = logits[c["id"]]
            arr = lc.llama_token_data_array(c.ctypes.data_as(ctypes.POINTER(lc.llama_token_data)), n, -1, False)
            lc.llama_sampler_apply(smpl, ctypes.byref(arr))
            ok = np.isfinite(c["logit"])
            if ok.any():
                valid, z = c["id"][ok], c["logit"][ok].astype(np.float64)
                if temperature <= 0:
                    return int(valid[np.argmax(z)])
                p = np.exp((z - z.max()) / temperature)
                return int(rng.choice(valid, p=p / p.sum()))
        raise RuntimeError("no token is valid under the answer's grammar")

    def close(self) -> None:
        self.llm.close()

    def describe(self) -> dict:
        meta, lc = self.llm.metadata, binding()
        ftype = int(meta.get("general.file_type", -1))
        return {"file": self.path, "arch": meta.get("general.architecture"), "type": FTYPE_NAMES.get(ftype, f"file_type {ftype}"),
                "params": int(lc.llama_model_n_params(self.llm.model)), "chat_template": True,
                "n_ctx": self.n_ctx, "top_k": self.top_k}
