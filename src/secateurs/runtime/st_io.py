"""Reading and writing safetensors files a piece at a time, without mapping them into the process.

``SafetensorsSource`` reads one tensor, a range of rows of it, or a set of rows, with ``os.pread`` (pages go
through the system's file cache, which the kernel may reclaim; nothing stays mapped, so a read costs the
process only the memory of what it returns). It covers a folder's ``model.safetensors`` or its sharded
``model.safetensors.index.json``.

``StreamWriter`` writes one ``model.safetensors`` whose header (every name, dtype and shape) is known up
front, then the tensors' bytes in header order, each in as many pieces as the caller likes: a pruned model is
written layer by layer, a large embedding block by block.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from ..errors import UserError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


class SafetensorsSource:
    """Tensors of a safetensors checkpoint folder (single file or sharded), read on demand."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
        if single.exists():
            files = [single]
        elif index.exists():
            files = [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        else:
            raise UserError(f"{folder} has no model.safetensors (nor a sharded index): layer-by-layer loading "
                            "(--max-memory) reads safetensors checkpoints only")
        self.folder = folder
        self.entries: dict[str, tuple[Path, int, torch.dtype, tuple[int, ...]]] = {}
        for path in files:
            header, base = _header(path)
            for name, e in header.items():
                if name != "__metadata__":
                    self.entries[name] = (path, base + e["data_offsets"][0], _DTYPES[e["dtype"]], tuple(e["shape"]))
        self._fds: dict[Path, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][3]

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][2]

    def nbytes(self, name: str) -> int:
        _, _, dt, shape = self.entries[name]
        return _numel(shape) * _itemsize(dt)

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _read_bytes(self, path: Path, offset: int, n: int) -> bytearray:
        buf = bytearray(n)
        view, got, fd = memoryview(buf), 0, self._fd(path)
        while got < n:
            k = os.preadv(fd, [view[got:]], offset + got)
            if k <= 0:
                raise UserError(f"{path} is truncated (wanted {n} bytes at {offset})")
            got += k
        return buf

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor ``name`` (or its rows ``start:stop`` along the first dimension), in its stored dtype, on
        the CPU, in memory of its own."""
        path, offset, dt, shape = self.entries[name]
        row = _numel(shape[1:]) * _itemsize(dt)
        a = 0 if start is None else start
        b = (shape[0] if shape else 1) if stop is None else stop
        if not shape:
            a, b, row = 0, 1, _itemsize(dt)
        buf = self._read_bytes(path, offset + a * row, (b - a) * row)
        t = torch.frombuffer(buf, dtype=dt) if buf else torch.empty(0, dtype=dt)
        return t.reshape((b - a, *shape[1:]) if shape else ())

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (any order, repeats allowed) of a 2-D tensor, read as runs of consecutive rows."""
        rows = rows.flatten().cpu()
        uniq, inverse = torch.unique(rows, return_inverse=True)
        parts, u = [], uniq.tolist()
        i = 0
        while i < len(u):
            j = i
            while j + 1 < len(u) and u[j + 1] == u[j] + 1:
                j += 1
            parts.append(self.read(name, u[i], u[j] + 1))
            i = j + 1
        block = torch.cat(parts) if parts else torch.empty((0, *self.shape(name)[1:]), dtype=self.dtype(name))
        return block[inverse]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


class StreamWriter:
    """Writes ``path`` (a safetensors file) from a declared list of (name, dtype, shape), in that order; each
    tensor's bytes may come in several ``write`` calls (row blocks). ``close`` checks that all were written."""

    def __init__(self, path: str | Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict | None = None):
        self.path = Path(path)
        header, offset = {}, 0
        self.order = []
        for name, dt, shape in tensors:
            n = _numel(shape) * _itemsize(dt)
            header[name] = {"dtype": _NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.order.append((name, dt, tuple(shape), n))
            offset += n
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned
        self.f = open(self.path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.i, self.done = 0, 0  # current tensor, its bytes written so far

    def write(self, name: str, t: torch.Tensor) -> None:
        """The next bytes of tensor ``name`` (all of it, or its next rows)."""
        want, dt, _, n = self.order[self.i]
        if name != want or t.dtype != dt:
            raise RuntimeError(f"StreamWriter: expected {want} ({dt}), got {name} ({t.dtype})")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        if self.done + len(data) > n:
            raise RuntimeError(f"StreamWriter: {name} is larger than declared")
        self.f.write(data)
        self.done += len(data)
        if self.done == n:
            self.i, self.done = self.i + 1, 0

    def abort(self) -> None:
        """Closes the file after an error (it stays incomplete; the caller's folder is not renamed into place)."""
        self.f.close()

    def close(self) -> None:
        complete = self.i == len(self.order)
        self.f.close()
        if not complete:
            raise RuntimeError(f"StreamWriter: {self.path} is missing {self.order[self.i][0]} and what follows")
