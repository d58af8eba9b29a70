"""Block Influence (ShortGPT, Men et al., 2024): how much a layer changes the residual stream,
``BI_l = 1 - mean_t cos(h_in_t, h_out_t)`` over every token of the calibration rows, where ``h_in`` enters
layer ``l`` and ``h_out`` leaves it (enters the next layer, or the final norm after the last layer)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.base import Adapter
from ..runtime.passes import layer_pass


@torch.inference_mode()
def block_influence(model, adapter: Adapter, rows: torch.Tensor, batch_size: int = 4) -> list[float]:
    n = len(adapter.layers())
    parts = [[None] * -(-rows.shape[0] // batch_size) for _ in range(n)]

    def on_layer(l, b, h_in, h_out):
        parts[l][b] = F.cosine_similarity(h_in.float(), h_out.float().to(h_in.device), dim=-1).double().sum().cpu()

    layer_pass(model, rows, batch_size, on_layer)
    sums = torch.zeros(n, dtype=torch.float64)
    for l in range(n):
        for v in parts[l]:  # batch order, whichever order the pass ran in
            sums[l] += v
    count = rows.shape[0] * rows.shape[1]
    return (1.0 - sums / count).tolist()
