"""The settings of a heal job (light: the CLI reads its defaults without importing torch)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import UserError

LOSSES = ("kd", "lm", "kd+lm")


@dataclass
class HealSettings:
    source: str  # the pruned folder
    data: str = "wiki"  # = wiki:calib
    tokens: int = 100_000  # training tokens (rows x seqlen), rounded up to whole steps
    loss: str = "kd"
    lora_rank: int = 16
    lora_alpha: float | None = None  # None: 2 x rank
    full: bool = False
    lr: float | None = None  # None: 5e-4 with LoRA, 5e-5 with --full
    warmup: float = 0.05  # fraction of the steps with a linear warm-up
    min_lr: float = 0.1  # the cosine decay ends at this fraction of the peak
    seed: int = 0
    seqlen: int = 512
    batch_rows: int = 2
    topk: int = 64
    temperature: float = 1.0
    max_epochs: float = 1.0  # how many times the data may be seen in all
    teacher: str | None = None  # None: the model the plan came from (result.json)
    eval: str = "wiki:test"  # held-out perplexity before and after ('' to skip)
    eval_rows: int = 16
    eval_seqlen: int = 512
    device: str = "cpu"

    def resolved(self) -> "HealSettings":
        s = HealSettings(**asdict(self))
        if s.lora_alpha is None:
            s.lora_alpha = 2.0 * s.lora_rank
        if s.lr is None:
            s.lr = 5e-5 if s.full else 5e-4
        if s.full:
            s.lora_rank, s.lora_alpha = 0, 0.0
        return s

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise UserError(f"--loss must be one of {', '.join(LOSSES)} (got {self.loss!r})")
        for name, v, lo in (("--tokens", self.tokens, 1), ("--topk", self.topk, 1), ("--batch-rows", self.batch_rows, 1),
                            ("--eval-rows", self.eval_rows, 0)):
            if v < lo:
                raise UserError(f"{name} must be at least {lo} (got {v})")
        for name, v in (("--lr", self.lr), ("--temperature", self.temperature), ("--max-epochs", self.max_epochs)):
            if not (v > 0 and math.isfinite(v)):
                raise UserError(f"{name} must be a positive number (got {v})")
        if not 0 <= self.warmup < 1 or not 0 <= self.min_lr <= 1:
            raise UserError(f"--warmup must be in [0, 1) and --min-lr in [0, 1] (got {self.warmup}, {self.min_lr})")

    @property
    def needs_teacher(self) -> bool:
        return self.loss in ("kd", "kd+lm")
