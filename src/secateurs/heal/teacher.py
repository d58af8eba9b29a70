"""The teacher's next-token distributions, computed once and streamed from disk.

The dense model is loaded alone, runs over the heal rows the job will use, and keeps per predicted position
its ``k`` likeliest tokens with their log-probabilities (at temperature ``T``). The cache covers the whole row
pool of the heal data, in pool order: ``idx.bin`` (int32) and ``logp.bin`` (float32), each
``[pool rows, seqlen - 1, k]`` through memory maps, ``done.npy`` marks the rows computed (replaced after
the maps are flushed, so an interrupted computation resumes at the first row it does not vouch for), and
``key.json`` says what the cache was made from (teacher, data fingerprint, seqlen, k, T): a job whose key
differs refuses the folder. Rows a job does not use are never computed, and another job with the same key
(another budget, another pruned model of the same dense model) reuses the rows already there
(``--teacher-cache DIR``). The teacher is freed before the student is loaded: the two never share memory.
The remaining probability mass ``1 - sum(top-k)`` is derived when reading, not stored.

Disk: ``pool rows * (seqlen - 1) * k * 8`` bytes at most (k = 64: 512 bytes per position); only the rows
computed take space on file systems with sparse files.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..files import atomic_write_text
from ..progress import progress_bar


class TeacherCache:
    def __init__(self, folder: Path, key: dict, pool_rows: int, positions: int, k: int):
        self.folder, self.key = Path(folder), key
        self.shape = (pool_rows, positions, k)

    def _maps(self, mode: str):
        return (np.memmap(self.folder / "idx.bin", dtype=np.int32, mode=mode, shape=self.shape),
                np.memmap(self.folder / "logp.bin", dtype=np.float32, mode=mode, shape=self.shape))

    def check_key(self) -> bool:
        """True when the folder holds a cache made with this key, False when there is none; refuses another key."""
        key_file = self.folder / "key.json"
        if not key_file.exists():
            return False
        old = json.loads(key_file.read_text())
        if old != json.loads(json.dumps(self.key)):
            diff = sorted(k for k in set(old) | set(self.key) if old.get(k) != self.key.get(k))
            raise UserError(f"teacher cache {self.folder} was made with other settings ({', '.join(diff)} differ); "
                            "give another --teacher-cache folder")
        return True

    def open(self) -> "TeacherCache":
        """Creates the cache, or checks that the one there was made with the same key."""
        if self.check_key():
            return self
        key_file = self.folder / "key.json"
        self.folder.mkdir(parents=True, exist_ok=True)
        for m in self._maps("w+"):
            m.flush()
        np.save(self.folder / "done.npy", np.zeros(self.shape[0], dtype=np.uint8))
        atomic_write_text(key_file, json.dumps(self.key, indent=1))
        return self

    def done(self) -> np.ndarray:
        return np.load(self.folder / "done.npy")

    def missing(self, rows: list[int]) -> list[int]:
        done = self.done()
        return [r for r in rows if not done[r]]

    def _mark(self, done: np.ndarray) -> None:
        tmp = self.folder / "done.tmp.npy"
        np.save(tmp, done)
        os.replace(tmp, self.folder / "done.npy")

    @torch.inference_mode()
    def fill(self, model, pool: torch.Tensor, rows: list[int], temperature: float, batch: int, progress: bool = True,
             on_batch=None) -> None:
        """Runs ``model`` over the pool rows among ``rows`` not yet computed; ``on_batch(rows, seconds)`` is
        called after each batch is on disk."""
        todo = self.missing(rows)
        if not todo:
            return
        idx_map, logp_map = self._maps("r+")
        done = self.done()
        device = next(model.parameters()).device
        seqlen = pool.shape[1]
        bar = progress_bar(total=len(rows) * seqlen, desc="teacher top-k", enabled=progress, unit="tok",
                           unit_scale=True, initial=(len(rows) - len(todo)) * seqlen)
        for i in range(0, len(todo), batch):
            t0 = time.time()
            part = todo[i : i + batch]
            logits = model(input_ids=pool[part].to(device), use_cache=False).logits[:, :-1].float()
            val, ind = torch.log_softmax(logits / temperature, dim=-1).topk(self.shape[2], dim=-1)
            ind, val = ind.to(torch.int32).cpu().numpy(), val.cpu().numpy()
            for j, r in enumerate(part):
                idx_map[r], logp_map[r] = ind[j], val[j]
            idx_map.flush()
            logp_map.flush()
            done[part] = 1
            self._mark(done)
            if on_batch is not None:
                on_batch(len(part), time.time() - t0)
            bar.update(len(part) * seqlen)
        bar.close()
        del idx_map, logp_map

    def reader(self) -> "TeacherReader":
        return TeacherReader(*self._maps("r"))


class TeacherReader:
    """Random access to the cached rows (memory-mapped: only the rows read are brought in)."""

    def __init__(self, idx_map, logp_map):
        self.idx_map, self.logp_map = idx_map, logp_map

    def __call__(self, rows: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(np.stack([self.idx_map[r] for r in rows])).long()
        logp = torch.from_numpy(np.stack([self.logp_map[r] for r in rows]))
        return idx.to(device), logp.to(device)
