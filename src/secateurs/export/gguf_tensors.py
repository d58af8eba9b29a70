"""Tensors of a GGUF file, read when they are written: ``FileTensor`` (a shape and a function giving a block of
rows in float32, with the row transforms the export needs: a norm offset, llama.cpp's q/k rope order, zero
padding) and ``ModuleWeights`` (a model's parameters as FileTensors, from memory or, for a skeleton on the meta
device, from its safetensors files). The writer takes ``BLOCK_BYTES`` of rows at a time, so a tensor is never
whole in memory."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..runtime.onload import resolve_keys
from ..runtime.st_io import SafetensorsSource

BLOCK_BYTES = 16 << 20  # float32 bytes of the block of rows read and written at a time


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's half-split q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class FileTensor:
    """One tensor of the file before it is read: its shape (torch layout [out, in]) and ``rows(a, e)``, its
    rows a:e in float32 (elements a:e of a 1-D tensor). A block of rows starts at a multiple of ``align``."""

    shape: tuple[int, ...]
    rows: Callable[[int, int], torch.Tensor]
    align: int = 1

    @classmethod
    def const(cls, t: torch.Tensor) -> "FileTensor":
        t = t.float()
        return cls(tuple(t.shape), lambda a, e: t[a:e])

    @classmethod
    def zeros(cls, *shape: int) -> "FileTensor":
        return cls(shape, lambda a, e: torch.zeros(e - a, *shape[1:]))

    @classmethod
    def ones(cls, *shape: int) -> "FileTensor":
        return cls(shape, lambda a, e: torch.ones(e - a, *shape[1:]))

    def plus(self, c: float) -> "FileTensor":
        return FileTensor(self.shape, lambda a, e: self.rows(a, e) + c, self.align)

    def rope_permuted(self, n_head: int) -> "FileTensor":
        per = self.shape[0] // n_head  # the rows of one head, permuted among themselves
        return FileTensor(self.shape, lambda a, e: permute_rope(self.rows(a, e), (e - a) // per), per)

    def padded_rows(self, n: int) -> "FileTensor":
        """``n`` zero rows after the last."""
        n0 = self.shape[0]

        def rows(a, e):
            t = self.rows(min(a, n0), min(e, n0))
            extra = e - max(a, n0)
            return torch.cat([t, torch.zeros(extra, *self.shape[1:])]) if extra > 0 else t

        return FileTensor((n0 + n, *self.shape[1:]), rows, self.align)

    def padded_cols(self, n: int) -> "FileTensor":
        """``n`` zero columns after the last (a 2-D tensor)."""
        return FileTensor((self.shape[0], self.shape[1] + n),
                          lambda a, e: torch.cat([self.rows(a, e), torch.zeros(e - a, n)], dim=1), self.align)

    def read(self) -> torch.Tensor:
        return self.rows(0, self.shape[0])

    def blocks(self):
        """The tensor in blocks of rows of about ``BLOCK_BYTES`` (a 1-D tensor whole)."""
        n = self.shape[0]
        if len(self.shape) == 1:
            yield self.read()
            return
        row = math.prod(self.shape[1:]) * 4
        step = max(1, BLOCK_BYTES // max(row, 1) // self.align) * self.align
        for a in range(0, n, step):
            yield self.rows(a, min(n, a + step))


class ModuleWeights:
    """A model's parameters as FileTensors: read from memory, or, when ``source`` is given (the model is a
    skeleton on the meta device), from its safetensors files."""

    def __init__(self, model, source: SafetensorsSource | None = None):
        self.source = source
        self.keys = resolve_keys(model, source) if source is not None else None

    def __call__(self, module, name: str) -> FileTensor | None:
        p = getattr(module, name, None)
        if p is None:
            return None
        if self.source is None:
            return FileTensor(tuple(p.shape), lambda a, e: p.detach()[a:e].float().cpu())
        key, source = self.keys[id(module), name], self.source
        return FileTensor(tuple(p.shape), lambda a, e: source.read(key, a, e).float())

    def dtype(self, module, name: str):
        """The dtype the parameter is stored in (in its file, or in memory)."""
        p = getattr(module, name)
        return p.dtype if self.source is None else self.source.dtype(self.keys[id(module), name])

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
