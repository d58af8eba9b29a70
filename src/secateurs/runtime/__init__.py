"""Placement, in one place: the working dtype (``precision``), devices and memory budgets (``placement``),
loading a model whole, split across GPUs or layer by layer (``loading``, ``onload``), the calibration passes
that methods and searches ask for (``passes``: they never move tensors themselves), the output head in
vocabulary blocks (``head``), safetensors read and written a piece at a time (``st_io``), the estimates of
memory and time printed before a long job (``estimate``) and the Ray worker pool (``pool``). See
docs/scale.md and docs/workers.md."""
from .placement import input_device, model_dtype, module_device, onloader_of, shared_copy
from .precision import DTYPE_CHOICES

__all__ = ["DTYPE_CHOICES", "input_device", "model_dtype", "module_device", "onloader_of", "shared_copy"]
