"""Width importance: scores of attention heads and MLP channels from calibration activations.

Both scores look at the *input columns* of the output projections (``o_proj``: one column per head
dimension, a head owns ``head_dim`` consecutive columns; ``down_proj``: one column per MLP channel):

- Wanda-sp:  ``S_j = mean_r |W_rj| * ||X_j||_2``  (X_j = column j of the projection's input, all tokens)
- FLAP:      ``S_j = Var(X_j) * ||W_:,j||_2^2``    (the fluctuation of the input times the column's weight)

A head's score is the sum over its columns. FLAP's bias compensation keeps the expected output of a
projection when columns go: ``b += W[:, removed] @ mean(X[removed])``.
"""
from __future__ import annotations

import torch

from ..models.base import Adapter
from .activations import InputStats


def output_projections(adapter: Adapter, layers=None) -> dict[str, torch.nn.Linear]:
    """``{"attn.i": o_proj, "mlp.i": down_proj}`` for the given layer indices (all by default)."""
    all_layers = adapter.layers()
    idx = range(len(all_layers)) if layers is None else layers
    out = {}
    for i in idx:
        out[f"attn.{i}"] = adapter.proj(all_layers[i], adapter.o)
        out[f"mlp.{i}"] = adapter.proj(all_layers[i], adapter.down)
    return out


@torch.inference_mode()
def collect_stats(model, adapter: Adapter, rows: torch.Tensor, batch_size: int = 4, layers=None) -> InputStats:
    """Input statistics of every (or the given) layer's o_proj and down_proj over the calibration rows."""
    device = next(model.parameters()).device
    with InputStats(output_projections(adapter, layers)) as st:
        for i in range(0, rows.shape[0], batch_size):
            model(input_ids=rows[i : i + batch_size].to(device), use_cache=False)
    return st


def wanda_column_scores(weight: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    return weight.detach().double().abs().mean(0) * l2.to(weight.device)


def flap_column_scores(weight: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return var.to(weight.device) * weight.detach().double().pow(2).sum(0)


def head_scores(column_scores: torch.Tensor, head_dim: int) -> torch.Tensor:
    return column_scores.view(-1, head_dim).sum(1)


def compensation_bias(weight: torch.Tensor, mean: torch.Tensor, kept_columns) -> list[float] | None:
    """``W[:, removed] @ mean[removed]`` as a list (None when nothing is removed)."""
    keep = torch.zeros(weight.shape[1], dtype=torch.bool)
    keep[torch.as_tensor(list(kept_columns), dtype=torch.long)] = True
    if bool(keep.all()):
        return None
    removed = (~keep).nonzero().flatten()
    b = weight.detach().double()[:, removed.to(weight.device)] @ mean.to(weight.device)[removed.to(weight.device)]
    return [float(x) for x in b.cpu()]


def head_columns(heads, head_dim: int) -> list[int]:
    return [h * head_dim + j for h in heads for j in range(head_dim)]
