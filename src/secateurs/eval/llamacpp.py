"""Running GGUF files in llama.cpp (through llama-cpp-python): logits, perplexity, greedy decoding, speed and
memory. The one place the project calls llama.cpp at run time (the writer is ``secateurs.export.gguf``).

- **Rows**: the text set is tokenized by llama.cpp's own tokenizer (the one in the file) and cut into rows
  exactly as the PyTorch path does (``secateurs.data.tokenize_rows``: joined with blank lines, consecutive
  rows, BOS first where the architecture needs it). For a file written by secateurs the BOS rule is that of
  the original architecture (``secateurs.model_type``); for another GGUF, the file's ``add_bos_token``. As
  the exported tokenizer reproduces the Hugging Face one, these are the PyTorch path's rows (tested).
- **Perplexity**: each row is evaluated from an empty KV cache with logits for every position; the NLL is
  computed in float64 from llama.cpp's float32 logits; ``PPL = exp(mean NLL)`` over ``rows * (seqlen - 1)``
  predicted tokens, the definition of ``secateurs.eval.perplexity``.
- **Bench** (``bench``): the model and ``against`` are loaded with the same settings (threads, context,
  batch) and must have the same GGUF type; they run in turn, ``against`` first, ``warmup`` dropped rounds
  then ``reps`` timed ones (medians). Prompt: ``prompt_len`` random token ids (seeded), evaluated as one batch
  from an empty cache (tokens/s of that call). Generation: then ``decode_tokens`` greedy tokens one at a time
  with the cache (tokens/s, the argmax included). Peak memory: in a fresh process per model, the growth of
  the peak resident set size (Linux ``VmHWM``) from just before loading to the end of one prompt + generation
  run: the weights llama.cpp maps from the file and touches, the KV cache and the compute buffers.
- **FLOPs** (the ideal speedup): matrix-multiply FLOPs from the kept sizes of every layer, as
  ``secateurs.eval.bench`` counts them for PyTorch (projections and MLP 2 x in x out per token, attention
  4 x head_dim x query heads per visible key, the output head for the last position of the prompt / every
  generated token). For a file written by secateurs the sizes are the plan's (``secateurs.layers``), so the
  zero padding and the minimal zero FFNs of the export count as overhead, not as ideal work.
- **Chat with a JSON schema** (``ChatModel``, the Self-Pruner's local proposer): the messages are rendered by
  the file's own chat template (``tokenizer.chat_template``; plain ``role: text`` lines when the file has none)
  and the answer is decoded under llama.cpp's grammar sampler for the schema (llama-cpp-python's converter,
  ``json_schema_to_gbnf``). Sampling: the ``top_k`` likeliest tokens are passed through the grammar and the
  valid ones sampled at ``temperature`` (a seeded NumPy generator; 0 = greedy); only when none of them is valid
  is the whole vocabulary passed through the grammar. (llama-cpp-python's own sampler passes the whole
  vocabulary through the grammar at every token, about 2.7x the time per token on SmolLM2.) The answer ends
  at an end-of-generation token or as soon as it is a complete JSON value. The KV cache keeps the previous
  prompt, and a new prompt only evaluates what follows the common prefix.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..errors import UserError
from .bench import BenchSettings, side_by_side

INSTALL_HINT = ("running GGUF files needs llama-cpp-python 0.3.36: `make setup` builds it for this CPU "
                "(or: CMAKE_ARGS=\"$(python tools/llama_cmake_args.py)\" pip install 'llama-cpp-python[server]==0.3.36')")


def binding():
    try:
        import llama_cpp
        from llama_cpp import _logger
    except ImportError as e:
        raise UserError(INSTALL_HINT) from e
    _logger.set_verbose(False)
    return llama_cpp


def default_threads() -> int:
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return os.cpu_count() or 1


@contextlib.contextmanager
def quiet():
    """Sends what llama.cpp prints to fd 2 into a temporary file; yields a list that gets its lines."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            lines.extend(f.read().decode("utf-8", "replace").splitlines())


# --- reading the file ---------------------------------------------------------------------------------------
@dataclass
class GGUFInfo:
    path: str
    arch: str
    file_type: int
    type_name: str
    model_type: str | None  # secateurs.model_type (the Hugging Face architecture), None for other files
    add_bos: bool
    n_vocab: int
    params: int
    bytes: int
    layers: list[dict]  # per block: heads, kv_heads, channels (kept sizes), head_dim
    hidden: int
    tied: bool


FTYPE_NAMES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 10: "q2_k", 12: "q3_k_m", 15: "q4_k_m",
               17: "q5_k_m", 18: "q6_k", 32: "bf16"}


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def read_info(path: str | Path) -> GGUFInfo:
    """Checks that ``path`` is a complete GGUF file (header, metadata and all tensor data present) and reads
    what eval and bench need. A missing, corrupt or truncated file is a UserError, before llama.cpp sees it."""
    import gguf

    p = Path(path)
    hint = "give a .gguf written by `secateurs export` or llama.cpp"
    if not p.is_file():
        raise UserError(f"GGUF file {path} does not exist; {hint}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF'); {hint}")
    try:
        r = gguf.GGUFReader(str(p))
        size = p.stat().st_size
        end = max((t.data_offset + int(t.n_bytes) for t in r.tensors), default=0)
    except Exception as e:  # noqa: BLE001 - the reader fails with many error types on damaged files
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
        raise UserError(f"{path} is a damaged or truncated GGUF file ({why}); {hint}") from e
    if end > size or not r.tensors:
        raise UserError(f"{path} is a damaged or truncated GGUF file ({size:,} bytes, its tensors need {end:,}); {hint}")
    arch = str(_field(r, "general.architecture", "?"))
    ft = int(_field(r, "general.file_type", -1))
    shapes = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    hidden = shapes["token_embd.weight"][0]
    n_vocab = shapes["token_embd.weight"][1]
    hd = int(_field(r, f"{arch}.attention.key_length", 0) or 0)
    layers_meta = _field(r, "secateurs.layers")
    layers = json.loads(layers_meta) if layers_meta else None
    if layers is None:  # another GGUF: sizes from the tensor shapes
        n_blocks = int(_field(r, f"{arch}.block_count", 0))
        heads = _field(r, f"{arch}.attention.head_count", 0)
        hd = hd or (hidden // (heads if isinstance(heads, int) else max(heads)) if heads else 0)
        layers = []
        for i in range(n_blocks):
            q, k, g = (shapes.get(f"blk.{i}.{n}.weight") for n in ("attn_q", "attn_k", "ffn_gate"))
            layers.append({"heads": q[1] // hd if q else 0, "kv_heads": k[1] // hd if k else 0,
                           "channels": g[1] if g else 0})
    else:
        layers = [{"heads": L.get("kept_heads", L["n_head"]), "kv_heads": L.get("kept_kv", L["n_head_kv"]),
                   "channels": L.get("kept_channels", L["n_ff"])} for L in layers]
    for L in layers:
        L["head_dim"] = hd
    return GGUFInfo(
        path=str(p), arch=arch, file_type=ft, type_name=FTYPE_NAMES.get(ft, f"file_type {ft}"),
        model_type=(str(_field(r, "secateurs.model_type")) if _field(r, "secateurs.model_type") else None),
        add_bos=bool(_field(r, "tokenizer.ggml.add_bos_token", False)), n_vocab=n_vocab,
        params=sum(int(np.prod(s)) for s in shapes.values()), bytes=p.stat().st_size, layers=layers,
        hidden=hidden, tied="output.weight" not in shapes)


def needs_bos(info: GGUFInfo) -> bool:
    if info.model_type:
        from ..models.base import adapter_class

        return adapter_class(info.model_type).bos_per_row
    return info.add_bos


# --- running ------------------------------------------------------------------------------------------------
def open_model(path: str | Path, n_ctx: int, threads: int | None = None, logits_all: bool = False,
               n_batch: int | None = None, kv_f32: bool = False, flash_attn: bool = False):
    """A ``llama_cpp.Llama`` for a checked GGUF file (llama.cpp's own messages are kept off the terminal).
    The KV cache is llama.cpp's default f16 unless ``kv_f32`` (the tests' exact comparisons). Flash attention
    is off unless asked for (llama-cpp-python's default; without it llama.cpp sizes every layer's V cache for the
    widest layer, attention-free layers included)."""
    lc = binding()
    read_info(path)
    threads = threads or default_threads()
    n_batch = n_batch or min(n_ctx, 512)
    with quiet() as log:
        try:
            kv = {"type_k": lc.GGML_TYPE_F32, "type_v": lc.GGML_TYPE_F32} if kv_f32 else {}
            return lc.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                            n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                            flash_attn=flash_attn, verbose=False, **kv)
        except (ValueError, RuntimeError) as e:
            err = e
    detail = next((ln for ln in reversed(log) if "error" in ln.lower() or "failed" in ln.lower()), str(err))
    raise UserError(f"llama.cpp cannot load {path}: {detail.strip()[:200]}")


def logits(llm, ids) -> np.ndarray:
    """Float32 logits [len(ids), vocab] of one sequence from an empty cache (``llm`` needs logits_all)."""
    llm.reset()
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def last_logits(llm) -> np.ndarray:
    lc = binding()
    ptr = lc.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def greedy(llm, ids, n: int) -> list[int]:
    """``n`` greedy tokens after ``ids``, one at a time with the KV cache."""
    llm.reset()
    llm.eval(list(map(int, ids)))
    out = []
    for _ in range(n):
        nxt = int(np.argmax(last_logits(llm)))
        out.append(nxt)
        llm.eval([nxt])
    return out


class Tokenizer:
    """llama.cpp's tokenizer behind the two things ``secateurs.data.tokenize_rows`` uses."""

    def __init__(self, llm):
        self.llm = llm
        bos = llm.token_bos()
        self.bos_token_id = None if bos is None or bos < 0 else int(bos)

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        import torch

        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=False)
        return SimpleNamespace(input_ids=torch.tensor([ids], dtype=torch.long))


def eval_rows(llm, info: GGUFInfo, name: str, seqlen: int, max_rows: int | None):
    """The rows of a text set for a GGUF model (see the module docstring)."""
    from ..data import load_texts, tokenize_rows

    rows = tokenize_rows(Tokenizer(llm), load_texts(name), seqlen, needs_bos(info))
    if rows.shape[0] == 0:
        raise UserError(f"text set {name!r} has fewer than {seqlen} tokens")
    return rows[:max_rows] if max_rows else rows


def row_nll(llm, row) -> float:
    x = logits(llm, row)[:-1].astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(x - m).sum(axis=1)))
    tgt = np.asarray(row[1:], dtype=np.int64)
    return float((lse - x[np.arange(len(tgt)), tgt]).sum())


def perplexity(llm, rows, progress: bool = False, desc: str = "perplexity"):
    from ..progress import progress_bar
    from .perplexity import PPLResult

    total = 0.0
    for i in progress_bar(range(rows.shape[0]), desc=desc, enabled=progress):
        total += row_nll(llm, rows[i].tolist())
    tokens = rows.shape[0] * (rows.shape[1] - 1)
    nll = total / tokens
    return PPLResult(math.exp(nll), nll, tokens, rows.shape[1], rows.shape[0])


class Handle:
    """An opened GGUF for ``secateurs eval`` (see secateurs.eval.engines)."""

    engine = "llama.cpp"
    supports_tasks = False

    def __init__(self, path: str, seqlen: int, threads: int | None = None):
        self.info = read_info(path)
        self.llm = open_model(path, n_ctx=seqlen, threads=threads, logits_all=True)
        self.threads = threads or default_threads()

    def rows(self, name: str, seqlen: int, max_rows: int | None):
        return eval_rows(self.llm, self.info, name, seqlen, max_rows)

    def perplexity(self, rows, batch_size: int = 1, progress: bool = False, desc: str = "perplexity"):
        return perplexity(self.llm, rows, progress=progress, desc=desc)

    def settings(self) -> dict:
        return {"engine": self.engine, "threads": self.threads, "gguf_type": self.info.type_name, "arch": self.info.arch}


# --- chat with a JSON schema ---------------------------------------------------------------------------------
@dataclass
class Reply:
    text: str
    prompt_tokens: int  # the whole prompt (also the part the KV cache already held)
    completion_tokens: int
    seconds: float = 0.0
    notes: list = field(default_factory=list)


class ChatModel:
    """A GGUF chat model whose answers are decoded under a JSON schema's grammar (see the module docstring)."""

    def __init__(self, path: str | Path, n_ctx: int = 8192, threads: int | None = None, top_k: int = 40):
        lc = binding()
        self.path, self.top_k = str(path), top_k
        self.llm = open_model(path, n_ctx=n_ctx, threads=threads)  # checks the file first (read_info)
        train = lc.llama_model_n_ctx_train(self.llm.model)
        self.n_ctx = min(self.llm.n_ctx(), train) if train > 0 else self.llm.n_ctx()  # what the model was trained for
        self.vocab = lc.llama_model_get_vocab(self.llm.model)
        template = self.llm.metadata.get("tokenizer.chat_template")
        self.template = None
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            piece = lambda t: self.llm.detokenize([t], special=True).decode("utf-8", "replace") if t >= 0 else ""
            self.template = Jinja2ChatFormatter(template, eos_token=piece(self.llm.token_eos()),
                                                bos_token=piece(self.llm.token_bos()))
        self._grammars: dict[str, str] = {}

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        if self.template is not None:
            text = self.template(messages=messages).prompt
            return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        text = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant: "
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

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
                "params": int(lc.llama_model_n_params(self.llm.model)), "chat_template": self.template is not None,
                "n_ctx": self.n_ctx, "top_k": self.top_k}


# --- FLOPs --------------------------------------------------------------------------------------------------
def flops(info: GGUFInfo, prompt_len: int) -> tuple[int, int]:
    """(prefill FLOPs of ``prompt_len`` tokens, FLOPs of one generated token at context ``prompt_len``)."""
    per_token = 0
    attn_width = []
    for L in info.layers:
        q, kv, ff, hd = L["heads"] * L["head_dim"], L["kv_heads"] * L["head_dim"], L["channels"], L["head_dim"]
        per_token += 2 * info.hidden * (2 * q + 2 * kv) + 2 * 3 * info.hidden * ff
        if q:
            attn_width.append(q)
    head = 2 * info.hidden * info.n_vocab
    keys = prompt_len * (prompt_len + 1) // 2
    prefill = prompt_len * per_token + head + sum(4 * w * keys for w in attn_width)
    decode = per_token + head + sum(4 * w * (prompt_len + 1) for w in attn_width)
    return prefill, decode


# --- bench --------------------------------------------------------------------------------------------------
@dataclass
class LlamaBenchSettings(BenchSettings):
    threads: int = 0  # 0 = default_threads()
    flash_attn: bool = False


def _prompt(n_vocab: int, n: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_vocab, n).tolist()


def _open_for_bench(path: str, s: LlamaBenchSettings):
    return open_model(path, n_ctx=s.prompt_len + s.decode_tokens + 8, threads=s.threads, n_batch=s.prompt_len,
                      flash_attn=s.flash_attn)


def time_round(llm, prompt: list[int], n_gen: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) of one round from an empty cache."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    nxt = int(np.argmax(last_logits(llm)))
    t2 = time.perf_counter()
    for _ in range(n_gen):
        llm.eval([nxt])
        nxt = int(np.argmax(last_logits(llm)))
    t3 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_gen / (t3 - t2)


def _peak_memory_here(path: str, s: LlamaBenchSettings) -> float:
    """Runs inside the fresh process: MB of peak RSS growth from before loading to after one round."""
    from .bench import _proc_status_kb

    binding()
    before = _proc_status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    info = read_info(path)
    llm = _open_for_bench(path, s)
    time_round(llm, _prompt(info.n_vocab, s.prompt_len, s.seed), s.decode_tokens)
    return max(0, _proc_status_kb("VmHWM") - before) / 1024


def peak_memory(path: str, s: LlamaBenchSettings) -> float | None:
    from .bench import peak_memory_in_fresh_process

    return peak_memory_in_fresh_process("secateurs.eval.llamacpp", "--peak-memory", path, s)


def bench(path: str, against: str | None = None, s: LlamaBenchSettings | None = None, memory: bool = True,
          progress: bool = False) -> dict:
    """Speed and memory of a GGUF file in llama.cpp, side by side with ``against`` (see the module docstring)."""
    s = s or LlamaBenchSettings()
    s.threads = s.threads or default_threads()
    paths = [against, path] if against else [path]
    infos = [read_info(p) for p in paths]
    if against and infos[0].file_type != infos[1].file_type:
        raise UserError(f"compare files of the same GGUF type: {path} is {infos[1].type_name}, "
                        f"{against} is {infos[0].type_name} (export both with the same --type)")
    llms = [_open_for_bench(p, s) for p in paths]
    prompts = [_prompt(i.n_vocab, s.prompt_len, s.seed) for i in infos]
    pp, tg = [[] for _ in paths], [[] for _ in paths]
    for r in range(s.warmup + s.reps):
        for i, (llm, prompt) in enumerate(zip(llms, prompts)):
            a, b = time_round(llm, prompt, s.decode_tokens)
            if r >= s.warmup:
                pp[i].append(a)
                tg[i].append(b)
    del llms
    entries = []
    for p, info, a, b in zip(paths, infos, pp, tg):
        pf, df = flops(info, s.prompt_len)
        pmed, gmed = statistics.median(a), statistics.median(b)
        entries.append({"model": p, "engine": "llama.cpp", "arch": info.arch, "gguf_type": info.type_name,
                        "file_bytes": info.bytes, "params": info.params,
                        "prompt_tokens_per_s": pmed, "prefill_ms": 1000 * s.prompt_len / pmed,
                        "decode_tokens_per_s": gmed, "peak_memory_mb": peak_memory(p, s) if memory else None,
                        "prefill_flops": pf, "decode_flops_per_token": df,
                        "runs": {"prompt_tokens_per_s": a, "decode_tokens_per_s": b}})
    out = side_by_side(entries)
    out["settings"] = {**asdict(s), "engine": "llama.cpp", "batch_size": 1, "device": "cpu",
                       "order": "alternating, against first" if against else "single", "timer": "perf_counter",
                       "memory": None if not memory else "peak RSS growth (VmHWM) in a fresh process, load + one round"}
    return out


if __name__ == "__main__":  # the fresh process of peak_memory
    if len(sys.argv) == 4 and sys.argv[1] == "--peak-memory":
        print(_peak_memory_here(sys.argv[2], LlamaBenchSettings(**json.loads(sys.argv[3]))))
    else:
        sys.exit("usage: python -m secateurs.eval.llamacpp --peak-memory FILE SETTINGS_JSON")
