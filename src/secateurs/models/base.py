"""What every architecture adapter provides, and the derived sizes of a model (computed in one place).

An adapter hides where an architecture keeps its layers, its two residual branches (attention and MLP, each
with the norms that belong to it), its heads and its MLP channels. Adapters are chosen by
``config.model_type``, never by model name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Branch:
    """One residual branch of a decoder layer: ``h + post(module(pre(h)))``."""

    module: str  # attribute name of the attention / MLP module inside the decoder layer
    pre_norm: str
    post_norm: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.module, self.pre_norm, self.post_norm) if n)


@dataclass
class ModelSpec:
    """Sizes of the dense model and the parameter cost of every prunable unit (papers' ratio definition:
    all parameters, embeddings included, a tied embedding/head counted once)."""

    model_type: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv: int
    head_dim: int
    intermediate: int
    total_params: int
    attn_block_params: list[int] = field(default_factory=list)  # per layer: whole attention branch
    mlp_block_params: list[int] = field(default_factory=list)  # per layer: whole MLP branch
    q_head_params: int = 0  # one query head: its q rows (+bias) and o columns
    kv_head_params: int = 0  # one key/value head: its k and v rows (+biases)
    channel_params: int = 0  # one MLP channel: gate row, up row, down column (+biases)
    o_has_bias: bool = False
    down_has_bias: bool = False

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("model_type", "n_layers", "hidden", "n_heads", "n_kv", "head_dim", "intermediate")}


def branch_forward(owner: nn.Module, branch: Branch, is_attn: bool, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """``h + post(module(pre(h)))``: one residual branch, with its modules looked up on ``owner`` (a decoder
    layer or a surgery ``PartialLayer``). The attention module returns (output, weights)."""
    x = getattr(owner, branch.pre_norm)(h)
    if is_attn:
        x, _ = getattr(owner, branch.module)(hidden_states=x, **kwargs)
    else:
        x = getattr(owner, branch.module)(x)
    if branch.post_norm:
        x = getattr(owner, branch.post_norm)(x)
    return h + x


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


class Adapter:
    """Base adapter: a Llama-style decoder (``model.model.layers``, q/k/v/o and gate/up/down projections)."""

    model_types: tuple[str, ...] = ()
    attn_branch = Branch("self_attn", "input_layernorm")
    mlp_branch = Branch("mlp", "post_attention_layernorm")
    q, k, v, o = "q_proj", "k_proj", "v_proj", "o_proj"
    gate, up, down = "gate_proj", "up_proj", "down_proj"
    bos_per_row = False  # whether every perplexity/calibration row must start with BOS

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- where things are -------------------------------------------------------------------------------
    def decoder(self) -> nn.Module:
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.decoder().layers

    def branch(self, kind: str) -> Branch:
        return {"attn": self.attn_branch, "mlp": self.mlp_branch}[kind]

    def block(self, layer: nn.Module, kind: str) -> nn.Module | None:
        return getattr(layer, self.branch(kind).module, None)

    def proj(self, layer: nn.Module, name: str) -> nn.Linear:
        kind = "attn" if name in (self.q, self.k, self.v, self.o) else "mlp"
        return getattr(self.block(layer, kind), name)

    # --- sizes -----------------------------------------------------------------------------------------
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def spec(self) -> ModelSpec:
        """Sizes of the model as it is now (call it on the dense model)."""
        c = self.config
        layers = self.layers()
        hd = self.head_dim()
        l0 = layers[0]
        q, k, o = self.proj(l0, self.q), self.proj(l0, self.k), self.proj(l0, self.o)
        gate, up, down = self.proj(l0, self.gate), self.proj(l0, self.up), self.proj(l0, self.down)
        hidden = c.hidden_size
        qb = hd if q.bias is not None else 0
        kvb = hd if k.bias is not None else 0
        ch_b = (1 if gate.bias is not None else 0) + (1 if up.bias is not None else 0)
        return ModelSpec(
            model_type=c.model_type,
            n_layers=len(layers),
            hidden=hidden,
            n_heads=c.num_attention_heads,
            n_kv=c.num_key_value_heads,
            head_dim=hd,
            intermediate=c.intermediate_size,
            total_params=unique_param_count(self.model),
            attn_block_params=[sum(_numel(getattr(l, n, None)) for n in self.attn_branch.names) for l in layers],
            mlp_block_params=[sum(_numel(getattr(l, n, None)) for n in self.mlp_branch.names) for l in layers],
            q_head_params=2 * hd * hidden + qb,
            kv_head_params=2 * (hd * hidden + kvb),
            channel_params=3 * hidden + ch_b,
            o_has_bias=o.bias is not None,
            down_has_bias=down.bias is not None,
        )


_ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    for t in cls.model_types:
        _ADAPTERS[t] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_class(model_type: str) -> type[Adapter]:
    from ..errors import UserError

    if model_type not in _ADAPTERS:
        raise UserError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(supported_model_types())}"
        )
    return _ADAPTERS[model_type]


def get_adapter(model: nn.Module) -> Adapter:
    return adapter_class(model.config.model_type)(model)


@torch.no_grad()
def unique_param_count(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
