"""The heal job: check the inputs, compute the teacher's top-k once, train, merge, write. Resumable.

Order of work, all of it in ``OUT.partial/`` (the output folder appears, complete, in one rename at the end):

1. every input is checked (source folder, plan, ranks, data, overlap, budget, teacher's configuration) before
   anything is written;
2. the dense teacher is loaded alone, its perplexity on the evaluation rows measured, its top-k
   log-probabilities written for every heal row the run will use (``teacher/``), and it is freed;
3. the pruned student is loaded, measured, given LoRA adapters (or made fully trainable) and trained:
   AdamW, linear warm-up then cosine decay to ``min_lr`` times the peak over the whole token budget,
   gradients clipped at norm 1;
4. the adapters are merged, the healed model measured and written with the source's ``plan.json``.

``state.pt`` (trainable weights, optimizer state, RNG states, step, loss curve, seconds) is replaced every
``checkpoint_minutes``, on Ctrl-C (after the step in flight) and at the end; the row order is a function of
the seed and the step. Rerunning the same command after an interruption (even SIGKILL) continues from the
last state and, on the same CPU with the same thread count, ends with bitwise the same weights as an
uninterrupted run. A different command refuses to mix with the unfinished run (``--overwrite`` discards it).
"""
from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..plan import PruningPlan
from ..files import atomic_write_text
from .settings import HealSettings

STATE = "state.pt"


def lr_at(step: int, steps: int, s: HealSettings) -> float:
    """Linear warm-up over the first ``warmup`` of the steps, then cosine from ``lr`` to ``min_lr * lr``."""
    warm = int(round(s.warmup * steps))
    if step < warm:
        return s.lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm - 1)
    return s.lr * (s.min_lr + (1 - s.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# --- the source folder ---------------------------------------------------------------------------------
@dataclass
class Source:
    folder: Path
    plan: PruningPlan
    meta: dict  # secateurs.json
    result: dict  # result.json ({} if absent)
    teacher: str | None


def inspect_source(folder: str, teacher: str | None = None) -> Source:
    """The pruned folder's plan, configuration and origin; a UserError for anything that is not one."""
    p = Path(folder)
    hint = "give a folder written by `secateurs prune` or `secateurs apply`"
    if not p.is_dir():
        from ..sources import EMBEDDED

        if folder in EMBEDDED:
            raise UserError(f"{folder} is a dense model, not a pruned folder: prune it first (`secateurs prune`), then heal the result")
        raise UserError(f"{folder} is not a folder; {hint} (a Hugging Face id names a dense model: prune it first)")
    has = {n: (p / n).exists() for n in ("plan.json", "secateurs.json", "config.json")}
    if not has["plan.json"]:
        what = "a model folder without a plan (a dense model?)" if has["config.json"] else "not a pruned model folder"
        raise UserError(f"{folder} has no plan.json: {what}; {hint}")
    if not has["secateurs.json"]:
        raise UserError(f"{folder} has a plan.json but no secateurs.json: not a complete pruned folder; {hint}")
    try:
        meta = json.loads((p / "secateurs.json").read_text())
        result = json.loads((p / "result.json").read_text()) if (p / "result.json").exists() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{folder}: unreadable secateurs.json or result.json ({e})") from e
    if not isinstance(meta, dict) or "dense_config" not in meta:
        raise UserError(f"{folder}/secateurs.json has no dense_config; {hint}")
    plan = PruningPlan.load(p / "plan.json")
    if all(lp.is_dense for lp in plan.layers):
        raise UserError(f"{folder}'s plan removes nothing: it is the dense model; prune it first, then heal the result")
    origin = teacher or result.get("model") or (plan.meta.get("settings") or {}).get("model")
    return Source(p, plan, meta, result, origin)


def check_teacher(name: str | None, dense_config: dict, source: Path) -> None:
    """The teacher exists and has the dense configuration the plan was made for."""
    from transformers import AutoConfig

    from ..sources import EMBEDDED, is_gguf, resolve

    if not name:
        raise UserError(f"{source} does not say which dense model it came from; pass --teacher MODEL (or --loss lm)")
    p = Path(name)
    gguf_file = is_gguf(name) and p.is_file()
    if name not in EMBEDDED and not p.is_dir() and not gguf_file and (p.exists() or name.startswith((".", "/", "~"))
                                                                       or name.count("/") != 1):
        raise UserError(f"teacher {name!r} (the model {source} was pruned from) is not an embedded name, a model folder, "
                        "a .gguf file or a Hugging Face id; pass --teacher MODEL")
    try:
        cfg = AutoConfig.from_pretrained(resolve(name, progress=False)).to_dict()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the teacher {name!r}'s configuration: {str(e).splitlines()[0][:200]}; pass --teacher MODEL") from e
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size")
    diff = {k: (cfg.get(k), dense_config.get(k)) for k in keys if cfg.get(k) != dense_config.get(k)}
    if diff:
        raise UserError(f"teacher {name!r} is not the model {source} was pruned from: (teacher, plan's dense model) differ in {diff}")


# --- the job -------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """Everything checked before anything is written."""

    settings: HealSettings
    src: Source
    tokenizer: object
    pool: torch.Tensor  # all rows of the heal data
    order: object  # RowOrder
    steps: int
    used: list[int]  # pool rows the run sees, sorted
    overlap: dict
    eval_rows: torch.Tensor | None
    data_tokens: int
    fingerprint: str


def check_inputs(s: HealSettings) -> Inputs:
    from transformers import AutoTokenizer

    from ..data import eval_rows
    from ..export.checkpoint import build_pruned_skeleton
    from .adapters import check_rank
    from .data import RowOrder, check_overlap, fingerprint, heal_rows

    s.check()
    src = inspect_source(s.source, s.teacher)
    dense_config = src.meta["dense_config"]
    with torch.device("meta"):
        skeleton = build_pruned_skeleton(dense_config, src.plan)
    if not s.full:
        check_rank(skeleton, s.lora_rank)
    if not (src.folder / "tokenizer_config.json").exists():
        raise UserError(f"{src.folder} has no tokenizer; heal needs one to read the data")
    tok = AutoTokenizer.from_pretrained(src.folder, config=skeleton.config)
    texts, pool = heal_rows(tok, dense_config["model_type"], s.data, s.seqlen)
    overlap = check_overlap(s.data, texts)
    per_step = s.batch_rows * s.seqlen
    steps = math.ceil(s.tokens / per_step)
    need = steps * s.batch_rows
    if pool.shape[0] == 0 or need > pool.shape[0] * s.max_epochs:
        raise UserError(
            f"heal data {s.data!r} has {pool.shape[0]} rows of {s.seqlen} tokens ({pool.numel():,} tokens); "
            f"--tokens {s.tokens:,} needs {need} rows ({steps} steps of {s.batch_rows}), more than --max-epochs "
            f"{s.max_epochs:g} pass(es) over it: give more text, lower --tokens, or allow more --max-epochs")
    if s.needs_teacher:
        check_teacher(src.teacher, dense_config, src.folder)
    test = eval_rows(tok, skeleton, s.eval, s.eval_seqlen, s.eval_rows) if s.eval else None
    order = RowOrder(pool.shape[0], s.seed)
    used = sorted(set(order.rows(0, need)))
    return Inputs(s, src, tok, pool, order, steps, used, overlap, test, pool.numel(), fingerprint(pool))


def _times(work: Path) -> dict:
    f = work / "times.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _add_time(work: Path, key: str, amount: float) -> None:
    """Adds to a running total kept in times.json (seconds by phase, and teacher rows computed)."""
    t = _times(work)
    t[key] = t.get(key, 0) + amount
    atomic_write_text(work / "times.json", json.dumps(t))


def _cached(work: Path, name: str, compute):
    f = work / name
    if f.exists():
        return json.loads(f.read_text())
    t0 = time.time()
    v = compute()
    atomic_write_text(f, json.dumps(v))
    _add_time(work, "eval", time.time() - t0)
    return v


def _ppl(model, rows, progress, desc):
    from ..eval.perplexity import perplexity

    return None if rows is None else perplexity(model, rows, progress=progress, desc=desc).ppl


def teacher_cache(inp: Inputs, folder: Path):
    from .teacher import TeacherCache

    s = inp.settings
    key = {"format": "secateurs-teacher-topk/1", "teacher": inp.src.teacher, "data_fingerprint": inp.fingerprint,
           "pool_rows": inp.pool.shape[0], "seqlen": s.seqlen, "topk": s.topk, "temperature": s.temperature}
    return TeacherCache(folder, key, inp.pool.shape[0], s.seqlen - 1, s.topk)


def _teacher_phase(inp: Inputs, work: Path, cache, progress: bool, log) -> None:
    """Dense perplexity and the top-k cache, with the teacher loaded alone."""
    from ..sources import load_model

    s = inp.settings
    todo = cache.missing(inp.used)
    if not todo and ((work / "dense.json").exists() or inp.eval_rows is None):
        return
    log(f"secateurs: teacher {inp.src.teacher}: top-{s.topk} of {len(todo)} rows of {s.seqlen} tokens "
        f"({len(inp.used) - len(todo)} already in {cache.folder})")
    teacher, _ = load_model(inp.src.teacher, device=s.device, progress=progress)
    _cached(work, "dense.json", lambda: {"ppl": _ppl(teacher, inp.eval_rows, progress, f"{s.eval} ppl (dense)")})

    def count(rows, seconds):
        _add_time(work, "teacher", seconds)
        _add_time(work, "teacher_rows", rows)

    cache.fill(teacher, inp.pool, inp.used, s.temperature, s.batch_rows, progress, on_batch=count)
    del teacher
    gc.collect()


class _Stop:
    """Ctrl-C during training: finish the step in flight, save, then stop."""

    def __init__(self):
        self.asked = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave SIGINT alone
            self._old = None
        return self

    def _handle(self, *_):
        self.asked = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _save_state(work: Path, step: int, params: dict, opt, curve: list, seconds: float) -> None:
    state = {"step": step, "params": {n: p.detach().cpu().clone() for n, p in params.items()},
             "optim": opt.state_dict(), "rng": _rng_state(), "curve": curve, "seconds": seconds}
    tmp = work / (STATE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, work / STATE)


def _train(inp: Inputs, work: Path, model, params: dict, read, progress: bool, log, checkpoint_minutes: float) -> dict:
    """Runs the steps not yet done; returns {"curve": [[tokens, loss], ...], "seconds": training seconds}."""
    from ..progress import progress_bar
    from .loss import heal_loss

    s = inp.settings
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(list(params.values()), lr=s.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    step, curve, seconds = 0, [], 0.0
    if (work / STATE).exists():
        st = torch.load(work / STATE, weights_only=False)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(st["params"][n])
        opt.load_state_dict(st["optim"])
        _set_rng_state(st["rng"])
        step, curve, seconds = st["step"], st["curve"], st["seconds"]
        if step < inp.steps:
            log(f"secateurs: resuming healing at step {step} of {inp.steps}")
    per_step = s.batch_rows * s.seqlen
    bar = progress_bar(total=inp.steps * per_step, desc=f"heal ({s.loss})", enabled=progress, unit="tok",
                       unit_scale=True, initial=step * per_step)
    model.train()
    last_save = time.time()
    with _Stop() as stop:
        while step < inp.steps:
            t0 = time.time()
            rows = inp.order.rows(step * s.batch_rows, s.batch_rows)
            ids = inp.pool[rows].to(device)
            teacher = read(rows, device) if read is not None else None
            for g in opt.param_groups:
                g["lr"] = lr_at(step, inp.steps, s)
            logits = model(input_ids=ids, use_cache=False).logits
            loss = heal_loss(s.loss, logits, ids, teacher, s.temperature)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            value = loss.item()
            curve.append([step * per_step, value])
            seconds += time.time() - t0
            bar.update(per_step)
            bar.set_postfix(loss=f"{value:.4f}")
            if stop.asked or step == inp.steps or time.time() - last_save >= checkpoint_minutes * 60:
                _save_state(work, step, params, opt, curve, seconds)
                last_save = time.time()
            if stop.asked:
                bar.close()
                raise KeyboardInterrupt
    bar.close()
    model.eval()
    return {"curve": curve, "seconds": seconds}


def run_heal(s: HealSettings, out: str | Path, overwrite: bool = False, progress: bool = True, log=print,
             checkpoint_minutes: float = 5.0, teacher_cache_dir: str | Path | None = None) -> dict:
    """Heals the pruned folder ``s.source`` into ``out``; returns the heal record (heal.json).
    ``teacher_cache_dir``: a teacher top-k cache kept after the job and shared with other jobs of the same
    teacher, data and settings (default: inside ``OUT.partial/``, deleted at the end)."""
    from ..export.card import write_card
    from ..export.checkpoint import load_pruned, write_pruned
    from ..result import versions
    from ..workdir import check_out, open_work
    from .adapters import merged, prepare

    out = Path(out)
    s = s.resolved()
    if out.resolve() == Path(s.source).resolve():
        raise UserError(f"--out {out} is the folder being healed; write the healed model to another folder")
    check_out(out, overwrite)
    inp = check_inputs(s)
    settings = asdict(s) | {"data_fingerprint": inp.fingerprint}
    if s.needs_teacher and teacher_cache_dir:
        teacher_cache(inp, Path(teacher_cache_dir)).check_key()  # a shared cache of other settings: refused up front
    work = open_work(out, settings, overwrite, log, "heal")
    cache = None
    if s.needs_teacher:
        cache = teacher_cache(inp, Path(teacher_cache_dir) if teacher_cache_dir else work / "teacher").open()
        _teacher_phase(inp, work, cache, progress, log)
    dense = json.loads((work / "dense.json").read_text())["ppl"] if (work / "dense.json").exists() else None

    model, tok = load_pruned(inp.src.folder, device=s.device)
    before = _cached(work, "pruned.json", lambda: {"ppl": _ppl(model, inp.eval_rows, progress, f"{s.eval} ppl (pruned)")})["ppl"]
    train_model, params = prepare(model, s.full, s.lora_rank, s.lora_alpha, s.seed)
    read = cache.reader() if cache is not None else None
    trained = _train(inp, work, train_model, params, read, progress, log, checkpoint_minutes)

    final = work / "final"
    if final.exists():
        shutil.rmtree(final)
    final.mkdir()
    adapters = "full"
    if not s.full:
        train_model.save_pretrained(final / "heal_adapter", save_embedding_layers=False)
        adapters = {"kind": "lora", "rank": s.lora_rank, "alpha": s.lora_alpha,
                    "targets": sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in params})}
    healed = merged(train_model, s.full)
    t0 = time.time()
    after = _ppl(healed, inp.eval_rows, progress, f"{s.eval} ppl (healed)")
    _add_time(work, "eval", time.time() - t0)
    kind = write_pruned(healed, tok, inp.src.plan, inp.src.meta["dense_config"], final)
    shutil.copyfile(inp.src.folder / "plan.json", final / "plan.json")  # the source's plan, byte for byte

    times = _times(work)
    tokens_seen = inp.steps * s.batch_rows * s.seqlen
    record = {
        "source": str(inp.src.folder),
        "teacher": inp.src.teacher if s.needs_teacher else None,
        "teacher_cache": str(teacher_cache_dir) if teacher_cache_dir else None,
        "settings": settings,
        "data": {"name": s.data, "rows": inp.pool.shape[0], "seqlen": s.seqlen, "tokens": inp.data_tokens,
                 "fingerprint": settings["data_fingerprint"], "rows_used": len(inp.used),
                 "passes": inp.steps * s.batch_rows / inp.pool.shape[0], "overlap_check": inp.overlap},
        "tokens_requested": s.tokens,
        "tokens_seen": tokens_seen,
        "steps": inp.steps,
        "trainable_params": sum(p.numel() for p in params.values()),
        "adapters": adapters,
        "eval": {"set": s.eval or None, "rows": s.eval_rows, "seqlen": s.eval_seqlen,
                 "ppl_dense": dense, "ppl_pruned": before, "ppl_healed": after},
        "loss_curve": trained["curve"],
        "seconds": {"teacher": times.get("teacher", 0.0), "train": trained["seconds"], "eval": times.get("eval", 0.0)},
        "train_tokens_per_second": tokens_seen / trained["seconds"] if trained["seconds"] else None,
        "teacher_rows_computed": times.get("teacher_rows", 0),
        "teacher_tokens_per_second": (times.get("teacher_rows", 0) * s.seqlen / times["teacher"]) if times.get("teacher") else None,
        "threads": torch.get_num_threads(),
        "export": kind,
        "versions": versions() | {"peft": _peft_version()},
    }
    atomic_write_text(final / "heal.json", json.dumps(record, indent=1))
    atomic_write_text(final / "result.json", json.dumps(_result(inp, record), indent=1))
    write_card(final)
    if out.exists():
        shutil.rmtree(out)
    os.replace(final, out)
    shutil.rmtree(work)
    record["_model"], record["_tokenizer"] = healed, tok
    return record


def _peft_version():
    try:
        import peft

        return peft.__version__
    except ImportError:
        return None


def _result(inp: Inputs, record: dict) -> dict:
    """result.json of the healed folder: what ``secateurs report`` reads, the source's record under
    ``pruning`` and the heal summary under ``heal``."""
    from ..result import held_out, make_result

    src = inp.src.result
    ev = record["eval"]
    counts = {k: src.get(k) for k in ("ratio_target", "ratio_achieved", "params_before", "params_after", "removed_blocks")}
    method = src.get("method") or inp.src.plan.method or "pruned"
    return make_result(f"{method}+heal", src.get("model"), record["settings"], counts,
                       held_out(ev["set"], inp.eval_rows, ev["seqlen"], ev["ppl_dense"], ev["ppl_healed"]),
                       record["versions"], ppl_test_pruned=ev["ppl_pruned"], healed=True,
                       heal={k: record[k] for k in ("source", "teacher", "tokens_seen", "steps", "seconds", "trainable_params")},
                       pruning=src)
