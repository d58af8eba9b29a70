"""Where the model lives: the compute device, memory budgets (``--max-memory``), and the questions code asks
instead of assuming that the whole model sits on the device of its first parameter.

- ``parse_max_memory``: ``cuda:0=20GiB,cpu=30GiB`` (a size per device; ``disk=`` bounds what may be spilled to
  the run's folder) or one size, which is the CPU's. Units: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB
  (powers of 1024); a bare number is bytes. Parsed once where the budget enters (the command line, a settings
  object): everything below takes its ``{device: bytes}`` dict.
- ``Budget``: the bytes one device may hold, handed out to the parts of a run that keep things in memory
  (pinned layers, cached hidden states, head chunks) after a fixed reserve (``estimate.py``); what does not fit
  goes to the next tier (CPU memory below a GPU, then disk) or is recomputed.
- ``input_device`` / ``model_dtype``: where the token ids go and what precision the model computes in, for a
  resident model, a model split by accelerate's ``device_map`` and a layer-by-layer (onloaded) model alike.
- ``shared_copy``: a second model object sharing every tensor with the first (its modules may then be replaced,
  e.g. by surgery, without touching the original): a pruned probe costs only the tensors it slices; the copy
  of an onloaded model is a structure on the meta device (e.g. the pruned shapes before a streamed export).
"""
from __future__ import annotations

import copy
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_MAX_MEMORY_HELP = ("expected DEVICE=SIZE pairs such as cuda:0=20GiB,cpu=30GiB (devices cpu, cuda:N, disk), or one "
                    "size for the CPU such as 8GiB (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise UserError(f"--max-memory: cannot read the size {text!r}; {_MAX_MEMORY_HELP}")
    return int(float(m.group(1)) * _UNITS[unit])


def _device_key(name: str) -> str:
    name = name.strip().lower()
    if name.isdigit():
        return f"cuda:{int(name)}"
    if name == "cuda":
        return "cuda:0"
    if name in ("cpu", "disk") or re.fullmatch(r"cuda:\d+", name):
        return name
    raise UserError(f"--max-memory: unknown device {name!r}; {_MAX_MEMORY_HELP}")


def available_memory() -> int | None:
    """Bytes of CPU memory the system can still hand out (``MemAvailable``; None where it is not known)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def parse_max_memory(text: str | dict | None) -> dict[str, int] | None:
    """``{"cpu": bytes, "cuda:0": bytes, "disk": bytes}`` from the option's text (None when not given); a dict
    of that form is checked and returned with its device names normalised."""
    if text is None:
        return None
    if isinstance(text, dict):
        out = {}
        for dev, size in text.items():
            key = _device_key(str(dev))
            if key in out or not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise UserError(f"--max-memory: {dev}={size!r} is not a positive number of bytes for a new device; "
                                f"{_MAX_MEMORY_HELP}")
            out[key] = size
        return out
    if not str(text).strip():
        raise UserError(f"--max-memory: empty; {_MAX_MEMORY_HELP}")
    out = {}
    for part in str(text).split(","):
        if "=" in part:
            dev, size = part.split("=", 1)
            key = _device_key(dev)
        elif len(str(text).split(",")) == 1:
            key, size = "cpu", part
        else:
            raise UserError(f"--max-memory: {part!r} names no device; {_MAX_MEMORY_HELP}")
        if key in out:
            raise UserError(f"--max-memory: {key} is given twice")
        out[key] = parse_size(size)
        if out[key] <= 0:
            raise UserError(f"--max-memory: the size for {key} must be positive")
    return out


def format_size(n: float, up: bool = False) -> str:
    """``n`` bytes in binary units with two decimals (``up``: rounded up, for sizes that must suffice)."""
    import math

    for unit, k in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= k:
            v = math.ceil(n / k * 100) / 100 if up else n / k
            return f"{v:.2f} {unit}"
    return f"{int(math.ceil(n))} B"


def device_key(device) -> str:
    d = torch.device(device)
    return "cpu" if d.type == "cpu" else f"{d.type}:{d.index or 0}"


@dataclass
class Budget:
    """Bytes a run may keep on its compute device and, below it, on the CPU (when the device is a GPU) and on
    disk (spilled files). ``take`` hands out bytes from a tier while they last (False when they do not)."""

    device: torch.device
    device_bytes: int
    cpu_bytes: int = 0  # a GPU run's CPU tier (0 on a CPU run: the device is the CPU)
    disk_bytes: int = 0
    spill_dir: Path | None = None
    used: dict = field(default_factory=lambda: {"device": 0, "cpu": 0, "disk": 0})

    @classmethod
    def from_max_memory(cls, max_memory: dict, device, spill_dir: Path | None) -> "Budget":
        """The budget of ``parse_max_memory``'s dict on ``device``."""
        if not isinstance(max_memory, dict):
            raise TypeError(f"max_memory is parse_max_memory's dict, not {type(max_memory).__name__}")
        device = torch.device(device)
        return_freed_memory()
        key = device_key(device)
        if key not in max_memory:
            if device.type == "cuda":
                max_memory = {**max_memory, key: torch.cuda.mem_get_info(device)[0]}
            else:
                raise UserError(f"--max-memory gives no size for {key}, the device this run computes on")
        cpu = max_memory.get("cpu", 0) if device.type == "cuda" else 0
        disk = max_memory.get("disk")
        if disk is None:  # default: half of the free space where spilled files go
            where = spill_dir or Path.cwd()
            while not where.exists():
                where = where.parent
            disk = shutil.disk_usage(where).free // 2
        return cls(device, max_memory[key], cpu, disk, spill_dir)

    def free(self, tier: str = "device") -> int:
        cap = {"device": self.device_bytes, "cpu": self.cpu_bytes, "disk": self.disk_bytes}[tier]
        return max(0, cap - self.used[tier])

    def take(self, n: int, tier: str = "device") -> bool:
        if n > self.free(tier):
            return False
        self.used[tier] += n
        return True

    def give(self, n: int, tier: str = "device") -> None:
        self.used[tier] = max(0, self.used[tier] - n)


def return_freed_memory() -> None:
    """Under a budget, large CPU allocations are mapped and unmapped one by one (glibc ``mallopt``: a fixed 1 MiB
    mmap threshold, no dynamic raise), so that memory freed after a layer or a head block goes back to the
    system instead of staying in the heap, where fragmentation would keep the process's resident size above
    what is alive. A no-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


# --- where a model is ------------------------------------------------------------------------------------
def onloader_of(model):
    """The ``Onloader`` of a layer-by-layer model (``runtime.onload``), or None for a resident one."""
    return getattr(model, "secateurs_onloader", None)


def input_device(model) -> torch.device:
    """The device the token ids (and the embeddings) go to: the input embedding's device, or the compute device
    of an onloaded model."""
    ol = onloader_of(model)
    if ol is not None:
        return ol.device
    return model.get_input_embeddings().weight.device


def model_dtype(model) -> torch.dtype:
    """The precision the model computes in (its input embedding's dtype; an onloaded model's working dtype)."""
    ol = onloader_of(model)
    if ol is not None:
        return ol.dtype
    return model.get_input_embeddings().weight.dtype


def module_device(module: nn.Module, default: torch.device | None = None) -> torch.device:
    """The device of a module's own weights (a layer of a model split across GPUs may sit anywhere)."""
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return default if default is not None else torch.device("cpu")


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the model's module structure whose parameters and buffers *are* the original's tensors (no
    memory is copied). Replacing a module of the copy (surgery does) leaves the original as it was; writing
    into a shared tensor in place would change both, which surgery never does."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    ol = onloader_of(model)
    if ol is not None:
        memo[id(ol)] = ol
    new = copy.deepcopy(model, memo)
    if ol is not None:  # the copy is a structure (the onloader serves the original)
        del new.secateurs_onloader
    return new


def _move(x, dev):
    if isinstance(x, torch.Tensor):
        return x.to(dev)
    if isinstance(x, tuple):
        return tuple(_move(v, dev) for v in x)
    if isinstance(x, list):
        return [_move(v, dev) for v in x]
    if isinstance(x, dict):
        return {k: _move(v, dev) for k, v in x.items()}
    return x


def to_module_device(module: nn.Module, h: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """``h`` and the layer arguments on the device of ``module``'s weights (a no-op unless the model is split
    across GPUs and the module sits on another one than the inputs)."""
    dev = module_device(module, h.device)
    if dev == h.device:
        return h, kwargs
    return h.to(dev), _move(kwargs, dev)
