"""What every architecture adapter provides, the derived sizes of a model (computed in one place), and the
block vocabulary (``Block``: a layer's attention or MLP branch, its position in the forward order, its name).

An adapter hides where an architecture keeps its layers, its two residual branches (attention and MLP, each
with the norms that belong to it), its heads, its MLP channels, the final norm and the output head, and what
a module records of its own size. Nothing outside the adapters names a module of the model, so a new
architecture is one adapter file. Adapters are chosen by ``config.model_type``, never by model name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

# --- blocks: the two residual branches of a decoder layer, in forward order ----------------------------------
BLOCK_KINDS = ("attn", "mlp")


class Block(NamedTuple):
    """One residual branch of one layer. Its *position* in the forward order is ``2 * layer + kind index``
    (attn 0 = 0, mlp 0 = 1, attn 1 = 2, ...); its name is ``attn3`` / ``mlp3``."""

    layer: int
    kind: str  # one of BLOCK_KINDS

    @property
    def pos(self) -> int:
        return len(BLOCK_KINDS) * self.layer + BLOCK_KINDS.index(self.kind)

    @property
    def name(self) -> str:
        return f"{self.kind}{self.layer}"

    @classmethod
    def at(cls, pos: int) -> "Block":
        return cls(pos // len(BLOCK_KINDS), BLOCK_KINDS[pos % len(BLOCK_KINDS)])

    @classmethod
    def parse(cls, name: str) -> "Block":
        """``attn3`` -> Block(3, 'attn'); raises UserError for anything else."""
        for kind in BLOCK_KINDS:
            if name.startswith(kind) and name[len(kind):].isdigit():
                return cls(int(name[len(kind):]), kind)
        from ..errors import UserError

        raise UserError(f"not a block name: {name!r} (expected {' or '.join(k + 'N' for k in BLOCK_KINDS)})")


def all_blocks(n_layers: int) -> list[Block]:
    """Every block in forward order: attn 0, mlp 0, attn 1, mlp 1, ..."""
    return [Block(i, k) for i in range(n_layers) for k in BLOCK_KINDS]


def layer_positions(layer: int) -> tuple[int, ...]:
    """Positions of both blocks of a layer."""
    return tuple(Block(layer, k).pos for k in BLOCK_KINDS)


def head_indices(heads, head_dim: int) -> list[int]:
    """The rows of q/k/v (and columns of o) that the given heads own: head ``h`` owns ``head_dim`` consecutive
    ones from ``h * head_dim``."""
    return [h * head_dim + j for h in heads for j in range(head_dim)]


class Branch(NamedTuple):
    """One residual branch of a decoder layer: ``h + post(module(pre(h)))`` (run by ``branches.branch_forward``)."""

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

    def block_params(self, layer: int, kind: str) -> int:
        """Parameters of one whole block (its module and its norms)."""
        return (self.attn_block_params if kind == "attn" else self.mlp_block_params)[layer]

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("model_type", "n_layers", "hidden", "n_heads", "n_kv", "head_dim", "intermediate")}


@dataclass(frozen=True)
class LlamaCppArch:
    """How llama.cpp holds one model type (the GGUF export): ``even``, its architecture for a plan whose
    remaining layers all keep both branches at one size with no added bias; ``uneven``, the architecture for
    any other plan, or None, with ``why_not`` saying why none can hold it."""

    even: str
    uneven: str | None = None
    why_not: str = ""


@dataclass(frozen=True)
class VllmArch:
    """How vLLM holds one model type (the vLLM export): a plan whose remaining layers all keep both branches at
    one size with no added bias runs as the stock architecture; any other plan as vLLM's ``DeciLMForCausalLM``
    (Llama layers, per-layer blocks) when ``deci``, else ``why_not`` says why it cannot."""

    deci: bool = False
    why_not: str = ""


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


class Adapter:
    """Base adapter: a Llama-style decoder (``model.model.layers``, q/k/v/o and gate/up/down projections)."""

    model_types: tuple[str, ...] = ()
    attn_branch = Branch("self_attn", "input_layernorm")
    mlp_branch = Branch("mlp", "post_attention_layernorm")
    q, k, v, o = "q_proj", "k_proj", "v_proj", "o_proj"
    gate, up, down = "gate_proj", "up_proj", "down_proj"
    q_norm, k_norm = "q_norm", "k_norm"  # per-head norms of q and k inside the attention, where present
    bos_per_row = False  # whether every perplexity/calibration row must start with BOS
    norm_offset = 0.0  # the norms scale by (norm_offset + weight) (Gemma: 1 + w)
    llamacpp: dict[str, LlamaCppArch] = {}  # by model_type: how llama.cpp holds it (absent: no GGUF export)
    vllm: dict[str, VllmArch] = {}  # by model_type: how vLLM holds it (absent: no vLLM export)

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- where things are -------------------------------------------------------------------------------
    def decoder(self) -> nn.Module:
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.decoder().layers

    def final_norm(self) -> nn.Module:
        """The norm between the last layer and the output head."""
        return self.decoder().norm

    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's final logit soft-capping (Gemma 2 style ``cap * tanh(z / cap)``), if it has one."""
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The model's logits from the hidden states after the last layer."""
        return self.softcap(self.lm_head()(self.final_norm()(h)))

    def set_layers(self, layers: list[nn.Module], kept: list[int]) -> None:
        """Installs ``layers`` (what remains of the dense layers ``kept``, in order) and renumbers what refers to
        layers: ``layer_idx`` of every layer and attention module (their KV-cache slots),
        ``config.num_hidden_layers`` and ``config.layer_types``."""
        for idx, layer in enumerate(layers):
            if hasattr(layer, "layer_idx"):
                layer.layer_idx = idx
            attn = getattr(layer, self.attn_branch.module, None)
            if attn is not None and hasattr(attn, "layer_idx"):
                attn.layer_idx = idx
        self.decoder().layers = nn.ModuleList(layers)
        self.config.num_hidden_layers = len(layers)
        if getattr(self.config, "layer_types", None):
            self.config.layer_types = [self.config.layer_types[i] for i in kept]

    def branch(self, kind: str) -> Branch:
        return {"attn": self.attn_branch, "mlp": self.mlp_branch}[kind]

    def block(self, layer: nn.Module, kind: str) -> nn.Module | None:
        return getattr(layer, self.branch(kind).module, None)

    def proj(self, layer: nn.Module, name: str) -> nn.Linear:
        kind = "attn" if name in (self.q, self.k, self.v, self.o) else "mlp"
        return getattr(self.block(layer, kind), name)

    # --- after surgery: the modules' own size attributes -----------------------------------------------
    def resize_attn(self, attn: nn.Module, n_heads: int, n_kv: int) -> None:
        """Sets what the attention module reads of its own size once its projections keep ``n_heads`` query and
        ``n_kv`` key/value heads (the stock code repeats every KV head ``num_key_value_groups`` times)."""
        attn.num_key_value_groups = n_heads // n_kv

    def resize_mlp(self, mlp: nn.Module, n_channels: int) -> None:
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = n_channels

    # --- sizes -----------------------------------------------------------------------------------------
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def query_scale_dim(self) -> float:
        """The attention scores are ``q . k / sqrt(this)``."""
        return self.head_dim()

    def uniform_window(self) -> int | None:
        """The attention window that every layer uses, if the model has one (a per-layer pattern: None)."""
        return None

    def llamacpp_arch(self) -> LlamaCppArch | None:
        return self.llamacpp.get(self.config.model_type)

    def vllm_arch(self) -> VllmArch | None:
        return self.vllm.get(self.config.model_type)

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
