"""The tokenizer and chat template written into a GGUF, from a Hugging Face fast tokenizer (``tokenizer.json``).

The aim is that llama.cpp tokenizes exactly as the model's Hugging Face tokenizer does (the tests compare
both on the evaluation text), so that ``secateurs eval FILE.gguf`` sees the same token rows as the PyTorch
path. Two kinds of tokenizers are written:

- **byte-level BPE** (GPT-2 style: SmolLM2, Llama 3, Qwen2): ``tokenizer.ggml.model = "gpt2"``, the
  vocabulary in id order, the merges, and ``tokenizer.ggml.pre`` naming the llama.cpp pre-tokenizer whose
  regular expressions match ``tokenizer.json``'s pre-tokenizer (``PRE_TOKENIZERS``). An unknown
  pre-tokenizer is refused: a wrong one would silently change how text is split.
- **SentencePiece-style BPE with byte fallback** (Llama 2, Mistral 7B, Gemma): ``"llama"``. llama.cpp merges
  the adjacent pair whose joined piece has the highest score, where Hugging Face applies the merge of lowest
  rank; the score of a piece is therefore minus the rank of the first merge that makes it. Byte pieces
  ``<0xNN>`` are BYTE tokens.

Token types: special added tokens are CONTROL, other added tokens USER_DEFINED, the rest NORMAL. Special
token ids, ``add_bos`` / ``add_eos`` and the chat template come from ``gguf.SpecialVocab`` (the code
llama.cpp's converter uses), reading the files ``save_pretrained`` writes. Embedding rows beyond the
tokenizer's vocabulary get ``[PAD{id}]`` tokens of type UNUSED. A model without a tokenizer (the tests'
random models) gets ``tokenizer.ggml.model = "none"`` and runs on token ids.
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field

from ..errors import UserError

LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def _signature(pre: dict | None) -> tuple:
    """A hashable description of a tokenizer.json pre-tokenizer (the parts that decide how text is split)."""
    if pre is None:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(x for p in pre["pretokenizers"] for x in _signature(p))
    if kind == "ByteLevel":
        return (("ByteLevel", bool(pre.get("use_regex", True))),)
    if kind == "Digits":
        return (("Digits", bool(pre.get("individual_digits", False))),)
    if kind == "Split":
        pat = pre.get("pattern", {})
        return (("Split", pat.get("Regex", pat.get("String")), pre.get("behavior")),)
    return ((kind,),)


# tokenizer.json pre-tokenizer -> llama.cpp's tokenizer.ggml.pre (src/llama-vocab.cpp: same regular expressions)
PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", LLAMA3_REGEX, "Isolated"), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_REGEX, "Isolated"), ("ByteLevel", False)): "qwen2",
}


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model
    pre: str | None = None
    tokens: list[str] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    scores: list[float] | None = None
    special: object = None  # gguf.SpecialVocab
    n_vocab: int = 0
    add_bos: bool = False  # whether the Hugging Face tokenizer puts BOS first / EOS last (written explicitly:
    add_eos: bool = False  # llama.cpp's defaults differ by tokenizer kind)

    def write(self, w) -> None:
        w.add_tokenizer_model(self.model)
        if self.model == "none":
            return
        if self.pre:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.model == "llama":
            w.add_add_space_prefix(False)  # tokenizer.json decides: a Prepend/Metaspace normalizer is refused below
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        self.special.add_special_token = {k: v for k, v in self.special.add_special_token.items() if k not in ("bos", "eos")}
        self.special.add_to_gguf(w, quiet=True)

    def describe(self) -> dict:
        d = {"model": self.model, "pre": self.pre, "tokens": len(self.tokens) or self.n_vocab}
        if self.special is not None:
            d.update(special_ids=self.special.special_token_ids, add_bos=self.add_bos, add_eos=self.add_eos,
                     chat_template=self.special.chat_template is not None)
        return d


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("GGUF export needs a fast (tokenizer.json) tokenizer; this model's tokenizer has none")
    return json.loads(backend.to_str())


def vocab_for(tokenizer, n_vocab: int) -> Vocab:
    """The GGUF tokenizer fields for ``tokenizer`` and an embedding of ``n_vocab`` rows."""
    import gguf

    if tokenizer is None:
        return Vocab("none", n_vocab=n_vocab)
    tj = _tokenizer_json(tokenizer)
    m = tj["model"]
    if m.get("type") != "BPE":
        raise UserError(f"GGUF export supports BPE tokenizers (byte-level or with byte fallback); this one is {m.get('type')}")
    byte_fallback = bool(m.get("byte_fallback"))
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    inv = {i: t for t, i in m["vocab"].items()}
    inv.update({i: a["content"] for i, a in added.items()})
    if max(inv) >= n_vocab:
        raise UserError(f"the tokenizer has ids up to {max(inv)} but the model's embedding has {n_vocab} rows")
    TT = gguf.TokenType
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in inv:
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
        elif i in added:
            tokens.append(inv[i])
            types.append(TT.CONTROL if added[i].get("special") else TT.USER_DEFINED)
        elif byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", inv[i]):
            tokens.append(inv[i])
            types.append(TT.BYTE)
        else:
            tokens.append(inv[i])
            types.append(TT.NORMAL)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=not byte_fallback, n_vocab=n_vocab)
    plain, full = tokenizer("a", add_special_tokens=False).input_ids, tokenizer("a").input_ids
    adds = {"add_bos": full[:1] != plain[:1] and full[0] == tokenizer.bos_token_id,
            "add_eos": full[-1:] != plain[-1:] and full[-1] == tokenizer.eos_token_id}
    if byte_fallback:
        norm = json.dumps(tj.get("normalizer"))
        if '"Prepend"' in norm or tj.get("pre_tokenizer", {}) and "Metaspace" in json.dumps(tj["pre_tokenizer"]):
            raise UserError("GGUF export: SentencePiece tokenizers that prepend a space (Metaspace / Prepend) are not "
                            "supported yet; byte-level BPE and Gemma-style byte-fallback BPE are")
        rank = {}
        for r, mg in enumerate(m.get("merges", [])):
            a, b = mg if isinstance(mg, list) else mg.split(" ", 1)
            rank.setdefault(a + b, r)
        scores = []
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty == TT.NORMAL:
                scores.append(-float(rank[t]) if t in rank else -float(len(rank) + i))
            else:
                scores.append(0.0 if ty == TT.BYTE else -1000.0)
        return Vocab("llama", None, tokens, [int(t) for t in types], scores, special, n_vocab, **adds)
    sig = _signature(tj.get("pre_tokenizer"))
    if sig not in PRE_TOKENIZERS:
        raise UserError(f"GGUF export: this tokenizer's pre-tokenizer {sig} has no known llama.cpp equivalent "
                        f"(known: GPT-2 byte-level, SmolLM, Llama 3, Qwen2); a wrong one would change tokenization")
    pre = PRE_TOKENIZERS[sig]
    if pre == "gpt-2" and not getattr(tokenizer, "clean_up_tokenization_spaces", False) \
            and not any(len(t) > 1 and re.search("[0-9]", t) for t in m["vocab"]):
        # llama.cpp's "gpt-2" also cleans up spaces when decoding (" ." -> "."), which this tokenizer does not;
        # "smollm" is the same regex with digits split one by one first (a no-op for a vocabulary in which no
        # token joins a digit to anything) and no clean-up: the case of the SmolLM2 tokenizer that transformers
        # builds from its GGUF, which loses the digit splitting of the original tokenizer.json
        pre = "smollm"
    return Vocab("gpt2", pre, tokens, [int(t) for t in types], None, special, n_vocab, **adds)
