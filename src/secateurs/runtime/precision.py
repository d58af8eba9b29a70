"""The working precision: one dtype for the whole run (loading, calibration, search, surgery, saving).

``--dtype auto|bfloat16|float16|float32``:

- ``auto`` on a GPU keeps the checkpoint's own dtype (``config.json``'s ``dtype`` / ``torch_dtype``, else
  float32), unless the GPU cannot run it (bfloat16 before Ampere: float16 instead).
- ``auto`` on a CPU is float32 whatever the checkpoint holds: CPU kernels for 16-bit floats are slower than
  float32 on most CPUs and round every operation; ``--dtype bfloat16`` halves the memory where that matters
  (measured on SmolLM2: docs/scale.md). A 16-bit checkpoint computed in float32 this way is said so once.
- an explicit dtype is used as given, after a short probe that the device runs it (else a ``UserError``).

Statistics keep their own precision (``InputStats`` sums in float64, losses are summed in float64); the model's
weights, the pruned tensors, the bias compensation and the saved folder are all in the working dtype.
"""
from __future__ import annotations

import torch

from ..defaults import DTYPE_CHOICES
from ..errors import UserError


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def as_dtype(value) -> torch.dtype | None:
    """A torch dtype from a dtype, a name (``bfloat16``, ``torch.bfloat16``, ``bf16``...) or None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).replace("torch.", "")
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(name, name)
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise UserError(f"unknown dtype {value!r}; accepted: {', '.join(DTYPE_CHOICES)}")
    return dt


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype a checkpoint declares in its configuration (None when it does not say)."""
    for key in ("dtype", "torch_dtype"):
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if value is not None and str(value) != "auto":
            try:
                return as_dtype(value)
            except UserError:
                return None
    return None


def _gpu_runs_bf16(device: torch.device) -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(choice, device, checkpoint: torch.dtype | None) -> torch.dtype:
    """The working dtype for ``--dtype choice`` on ``device`` (see the module docstring)."""
    device = torch.device(device)
    if choice is not None and not (isinstance(choice, str) and choice == "auto"):
        dt = as_dtype(choice)
        check_dtype_runs(dt, device)
        return dt
    if device.type == "cuda":
        dt = checkpoint or torch.float32
        if dt == torch.bfloat16 and not _gpu_runs_bf16(device):
            dt = torch.float16
        return dt
    return torch.float32


def check_device(device, present: bool = True) -> torch.device:
    """The device as a torch.device, or a UserError when this machine has no such device (``present=False``:
    the name alone is checked, e.g. before a worker pool says whether its machines have it)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"--device {device!r} is not a device name (cpu, cuda, cuda:N)") from e
    if dev.type == "cuda":
        if not present:
            return dev
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "meta"):
        raise UserError(f"--device {device}: only cpu and cuda devices are supported")
    return dev


def check_dtype_runs(dtype: torch.dtype, device) -> None:
    """Runs the operations a decoder layer needs (matmul, softmax, rsqrt, attention) on a few numbers in
    ``dtype`` on ``device``; a UserError names the dtype and the device when they cannot."""
    device = check_device(device)
    if device.type == "meta":
        return
    if dtype == torch.bfloat16 and device.type == "cuda" and not _gpu_runs_bf16(device):
        raise UserError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                        "use --dtype float16 or float32")
    try:
        x = torch.ones(2, 4, 8, dtype=dtype, device=device)
        w = torch.ones(8, 8, dtype=dtype, device=device)
        y = torch.nn.functional.linear(x, w).softmax(-1) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        torch.nn.functional.scaled_dot_product_attention(y[None], y[None], y[None], is_causal=True)
    except (RuntimeError, TypeError, NotImplementedError) as e:
        raise UserError(f"--dtype {dtype_name(dtype)} cannot run on {device}: {str(e).splitlines()[0]}") from e
