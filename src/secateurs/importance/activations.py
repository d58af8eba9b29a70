"""Running a decoder piece by piece on calibration rows, without changing the model.

``capture`` runs the model once on a batch with forward pre-hooks on every decoder layer and records the
hidden states entering each layer and the keyword arguments the model passed to it (masks, rotary
embeddings: per layer, since Gemma's sliding and global layers get different ones). With them, any layer or
any single branch (attention or MLP) can be run again on other hidden states, and the loss computed from
final hidden states: the basis of layer-by-layer calibration and of searches that simulate removals.

``InputStats`` collects, per input column of a linear layer (``o_proj``, ``down_proj``), the sum, the sum of
squares and the count of its inputs: mean, variance and L2 norm for the width importance scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..branches import branch_forward
from ..models.base import Adapter
from ..runtime import input_device


@dataclass
class Captured:
    hidden: list[torch.Tensor]  # hidden state entering layer i, [batch, seq, hidden]; hidden[n_layers] = final
    kwargs: list[dict]  # keyword arguments given to layer i


@torch.inference_mode()
def capture(model: nn.Module, adapter: Adapter, ids: torch.Tensor) -> Captured:
    layers = adapter.layers()
    hidden: list = [None] * (len(layers) + 1)
    kwargs: list = [None] * len(layers)
    handles = []

    def pre(i):
        def hook(mod, args, kw):
            h = args[0] if args else kw["hidden_states"]
            hidden[i] = h
            kw = {k: v for k, v in kw.items() if k != "hidden_states"}
            kwargs[i] = kw
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
    handles.append(adapter.final_norm().register_forward_pre_hook(lambda m, a: hidden.__setitem__(len(layers), a[0])))
    try:
        model(input_ids=ids.to(input_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return Captured(hidden, kwargs)


def run_branch(adapter: Adapter, layer: nn.Module, kind: str, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One branch (``'attn'`` or ``'mlp'``) of a layer, residual included (the rule surgery's PartialLayer runs)."""
    return branch_forward(layer, adapter.branch(kind), kind == "attn", h, kwargs)


def run_layer(adapter: Adapter, layer: nn.Module, h: torch.Tensor, kwargs: dict, attn: bool = True, mlp: bool = True):
    if attn:
        h = run_branch(adapter, layer, "attn", h, kwargs)
    if mlp:
        h = run_branch(adapter, layer, "mlp", h, kwargs)
    return h


def nll_from_hidden(adapter: Adapter, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per row (float64 [batch]) from the hidden states after the last layer."""
    logits = adapter.logits(h)[:, :-1].float()
    ids = ids.to(logits.device)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1).sum(1).double()


class InputStats:
    """Per-column statistics of the inputs of a set of linear layers, gathered by forward pre-hooks.

    ``stats[name]`` holds ``sum`` and ``sumsq`` (float64, one per input column) and ``count`` (tokens).
    Use as a context manager around forward passes.
    """

    def __init__(self, modules: dict[str, nn.Linear]):
        self.modules = modules
        self.stats: dict[str, dict] = {}
        self._handles = []

    def _hook(self, name):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            s = self.stats.setdefault(name, {"sum": 0.0, "sumsq": 0.0, "count": 0})
            s["sum"] = s["sum"] + x.sum(0)
            s["sumsq"] = s["sumsq"] + (x * x).sum(0)
            s["count"] += x.shape[0]
        return hook

    def __enter__(self):
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def mean(self, name) -> torch.Tensor:
        s = self.stats[name]
        return s["sum"] / s["count"]

    def var(self, name) -> torch.Tensor:
        """Sample variance per column (unbiased)."""
        s = self.stats[name]
        n = s["count"]
        return (s["sumsq"] - s["sum"] ** 2 / n) / max(n - 1, 1)

    def l2(self, name) -> torch.Tensor:
        """L2 norm per column over all calibration tokens."""
        return self.stats[name]["sumsq"].sqrt()
