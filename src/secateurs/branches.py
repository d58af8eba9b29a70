"""A decoder layer's residual branch run alone (``branch_forward``), and a layer with one of its two branches
removed (``PartialLayer``).

A branch is named by its attribute names ``(module, pre_norm, post_norm)`` (``models.base.Branch``; in a pruned
folder's config, ``secateurs_branches``) and computes ``h + post(module(pre(h)))``. This module imports only
torch: the modeling file shipped in pruned folders carries its text (``export.checkpoint.modeling_source``), so
a folder loaded without secateurs runs this very definition.
"""
import torch
from torch import nn


def branch_forward(owner: nn.Module, branch, is_attn: bool, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``h + post(module(pre(h)))``: one residual branch, with its modules looked up on ``owner`` (a decoder
    layer or a ``PartialLayer``). The attention module returns (output, weights)."""
    module, pre_norm, post_norm = branch
    x = getattr(owner, pre_norm)(h)
    if is_attn:
        x, _ = getattr(owner, module)(hidden_states=x, **kwargs)
    else:
        x = getattr(owner, module)(x)
    if post_norm:
        x = getattr(owner, post_norm)(x)
    return h + x


class PartialLayer(nn.Module):
    """A decoder layer with one of its two residual branches removed: it keeps the surviving branch's modules
    under their original names (so state-dict keys stay those of the stock architecture) and runs that branch.

    With the attention branch gone the layer still records the sequence length in its KV-cache slot (a
    zero-head entry, no memory), so ``cache.get_seq_length()`` stays right even if slot 0 lost its attention.
    """

    def __init__(self, layer: nn.Module, branch, kind: str, layer_idx: int, head_dim: int):
        super().__init__()
        self.branch = tuple(branch)  # (module, pre_norm, post_norm) of the kept branch
        for name in self.branch:
            if name:
                setattr(self, name, getattr(layer, name))
        self.kind = kind  # the kept branch: 'attn' or 'mlp'
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.kind == "mlp":
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None:
                b, t = hidden_states.shape[:2]
                empty = hidden_states.new_zeros(b, 0, t, self.head_dim)
                cache.update(empty, empty, self.layer_idx)
        return branch_forward(self, self.branch, self.kind == "attn", hidden_states, kwargs)
