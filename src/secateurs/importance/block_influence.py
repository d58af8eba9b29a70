"""Block Influence (ShortGPT, Men et al., 2024): how much a layer changes the residual stream,
``BI_l = 1 - mean_t cos(h_in_t, h_out_t)`` over every token of the calibration rows, where ``h_in`` enters
layer ``l`` and ``h_out`` leaves it (enters the next layer, or the final norm after the last layer)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.base import Adapter
from .activations import capture


@torch.inference_mode()
def block_influence(model, adapter: Adapter, rows: torch.Tensor, batch_size: int = 4) -> list[float]:
    n = len(adapter.layers())
    sums = torch.zeros(n, dtype=torch.float64)
    count = 0
    for i in range(0, rows.shape[0], batch_size):
        hidden = capture(model, adapter, rows[i : i + batch_size]).hidden
        for l in range(n):
            cos = F.cosine_similarity(hidden[l].float(), hidden[l + 1].float(), dim=-1)
            sums[l] += cos.double().sum().cpu()
        count += hidden[0].shape[0] * hidden[0].shape[1]
    return (1.0 - sums / count).tolist()
