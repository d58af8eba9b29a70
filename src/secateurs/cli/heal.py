"""``secateurs heal DIR --out DIR2``: recover what pruning cost by distillation from the dense model into LoRA
adapters merged back into the pruned shapes (see secateurs.heal and docs/heal.md)."""
from __future__ import annotations

import argparse

from . import add_common, device_of, positive_int


def token_count(text: str) -> int:
    """A whole number of tokens, with an optional k or M suffix (50k, 1.5M)."""
    t = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    try:
        v = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count such as 50000, 50k or 1.5M, got {text!r}")
    if v < 1 or v != int(v):
        raise argparse.ArgumentTypeError(f"expected a whole token count >= 1, got {text!r}")
    return int(v)


def register(sub):
    p = sub.add_parser("heal", help="heal a pruned model by distillation from its dense model (LoRA, merged back)",
                       fill=add_arguments)
    p.set_defaults(func=run)


def add_arguments(p):
    from ..heal import HealSettings

    d = HealSettings(source="")
    p.add_argument("source", metavar="DIR", help="a pruned folder (written by secateurs prune or apply)")
    p.add_argument("--out", required=True, help="output folder: a pruned folder with the same shapes and plan")
    p.add_argument("--data", default=d.data, help="heal text: wiki (= wiki:calib, default), a hub set, or a .txt/.jsonl "
                   "file; never held-out evaluation text")
    p.add_argument("--tokens", type=token_count, default=d.tokens, help=f"training tokens (default {d.tokens:,}; 50k, 1M accepted)")
    p.add_argument("--loss", choices=["kd", "lm", "kd+lm"], default=d.loss,
                   help="kd: KL(teacher || student) on next-token distributions (default); lm: cross-entropy on the data; kd+lm: their mean")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--lora-rank", type=positive_int, default=d.lora_rank, help=f"LoRA rank (default {d.lora_rank})")
    g.add_argument("--full", action="store_true", help="fine-tune every weight instead of LoRA adapters")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-4 with LoRA, 5e-5 with --full)")
    p.add_argument("--warmup", type=float, default=d.warmup, help=f"fraction of steps with linear warm-up (default {d.warmup})")
    p.add_argument("--min-lr", type=float, default=d.min_lr, help=f"cosine decay ends at this fraction of the peak (default {d.min_lr})")
    p.add_argument("--seed", type=int, default=d.seed, help="fixes the row order and the LoRA initialisation (default 0)")
    p.add_argument("--seqlen", type=positive_int, default=d.seqlen, help=f"tokens per training row (default {d.seqlen})")
    p.add_argument("--batch-rows", type=positive_int, default=d.batch_rows, help=f"rows per step (default {d.batch_rows})")
    p.add_argument("--topk", type=positive_int, default=d.topk, help=f"teacher tokens kept per position (default {d.topk})")
    p.add_argument("--temperature", type=float, default=d.temperature, help="distillation temperature (default 1)")
    p.add_argument("--max-epochs", type=float, default=d.max_epochs,
                   help="how many passes over the data --tokens may take (default 1: more tokens than the data is an error)")
    p.add_argument("--teacher", default=None, help="the dense model (default: the model DIR was pruned from, from result.json)")
    p.add_argument("--eval", default=d.eval, help="held-out set measured before and after ('' to skip)")
    p.add_argument("--eval-rows", type=int, default=d.eval_rows, help=f"rows of the held-out set (default {d.eval_rows})")
    p.add_argument("--eval-seqlen", type=positive_int, default=d.eval_seqlen, help=f"tokens per held-out row (default {d.eval_seqlen})")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0, help="save resumable state this often (default 5)")
    p.add_argument("--teacher-cache", default=None, metavar="FOLDER",
                   help="keep the teacher's top-k here and reuse it across heal jobs of the same dense model, data and "
                        "settings (default: inside OUT.partial, deleted at the end)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (and discard an unfinished heal with other settings)")
    add_common(p, placement=False)  # --device only: heal loads at dtype auto, whole


def run(args):
    from ..eval.perplexity import rows_label
    from ..heal import HealSettings, run_heal

    s = HealSettings(source=args.source, data=args.data, tokens=args.tokens, loss=args.loss, lora_rank=args.lora_rank,
                     lora_alpha=args.lora_alpha, full=args.full, lr=args.lr, warmup=args.warmup, min_lr=args.min_lr,
                     seed=args.seed, seqlen=args.seqlen, batch_rows=args.batch_rows, topk=args.topk,
                     temperature=args.temperature, max_epochs=args.max_epochs, teacher=args.teacher, eval=args.eval,
                     eval_rows=args.eval_rows, eval_seqlen=args.eval_seqlen, device=device_of(args))
    r = run_heal(s, args.out, overwrite=args.overwrite, progress=not args.quiet,
                 log=(lambda *_: None) if args.quiet else print, checkpoint_minutes=args.checkpoint_minutes, teacher_cache_dir=args.teacher_cache)
    ev = r["eval"]
    ppl = ""
    if ev["set"]:
        dense = f" (dense {ev['ppl_dense']:.3f})" if ev["ppl_dense"] is not None else ""
        rows = rows_label(ev["rows"], ev["seqlen"]) if ev["rows"] else f"all rows of {ev['seqlen']}"
        ppl = f", {ev['set']} ppl ({rows}) {ev['ppl_pruned']:.3f} -> {ev['ppl_healed']:.3f}{dense}"
    print(f"healed {args.source} ({r['settings']['loss']}, {r['tokens_seen']:,} tokens in "
          f"{r['seconds']['train']:.0f} s{ppl}); written to {args.out}")
