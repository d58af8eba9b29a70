"""Modeling code for a secateurs-pruned checkpoint whose layers are not all alike.

secateurs copies this file into a pruned model folder, so that the folder loads with plain transformers
(``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``) on a machine without secateurs.
It imports only torch and transformers, and holds no model code of its own: the model *is* the stock
transformers model of the base architecture (``BASE_MODEL_TYPE``, written in when the file is copied), built
with the pruned layer count and then reshaped per layer from ``config.secateurs_layers``:

- ``heads`` / ``kv_heads``: query and key/value heads kept in that layer (q, k, v, o projections resized,
  ``num_key_value_groups`` set); ``o_bias``: the output projection carries a bias;
- ``intermediate``: MLP channels kept (gate, up, down resized); ``down_bias``: the down projection has a bias;
- ``attn`` / ``mlp`` false: that residual branch is gone; the layer then runs only the other branch,
  ``h + post(module(pre(h)))``, with the module and norm names from ``config.secateurs_branches``.

State-dict keys are those of the stock architecture, so weights load with the ordinary machinery.
"""

import torch
import transformers
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

BASE_MODEL_TYPE = "llama"  # the stock architecture; secateurs writes the real one in when copying this file

_BaseConfig = CONFIG_MAPPING[BASE_MODEL_TYPE]
_BaseModel = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[BASE_MODEL_TYPE])
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


class SecateursConfig(_BaseConfig):
    """The base architecture's configuration (with the pruned layer count) plus the per-layer structure."""

    model_type = "secateurs_" + BASE_MODEL_TYPE
    secateurs_layers: list | None = None  # one dict per remaining layer (see the module docstring)
    secateurs_branches: dict | None = None  # {"attn": [module, pre_norm, post_norm|None], "mlp": [...]}


class PartialLayer(nn.Module):
    """A decoder layer with one residual branch removed: ``h + post(module(pre(h)))`` for the kept one.

    With attention gone it still records the sequence length in its KV-cache slot (an entry with zero heads),
    so the cache length seen by the model stays right."""

    def __init__(self, layer: nn.Module, names: list, kind: str, layer_idx: int, head_dim: int):
        super().__init__()
        self.module_name, self.pre_name, self.post_name = names
        for name in names:
            if name:
                setattr(self, name, getattr(layer, name))
        self.kind = kind
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
        x = getattr(self, self.pre_name)(hidden_states)
        if self.kind == "attn":
            x, _ = getattr(self, self.module_name)(hidden_states=x, **kwargs)
        else:
            x = getattr(self, self.module_name)(x)
        if self.post_name:
            x = getattr(self, self.post_name)(x)
        return hidden_states + x


def _resized(old: nn.Linear, n_in: int, n_out: int, bias: bool) -> nn.Linear:
    w = old.weight
    return nn.Linear(n_in, n_out, bias=bias, device=w.device, dtype=w.dtype)


def reshape_layers(model: nn.Module, config: SecateursConfig) -> None:
    """Resizes every layer of a freshly built stock model to the structure in ``config``."""
    layers = model.model.layers
    if len(config.secateurs_layers) != len(layers):
        raise ValueError(f"secateurs_layers has {len(config.secateurs_layers)} entries for {len(layers)} layers")
    hidden = config.hidden_size
    hd = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    branches = config.secateurs_branches
    for i, s in enumerate(config.secateurs_layers):
        layer = layers[i]
        if s["attn"]:
            attn = getattr(layer, branches["attn"][0])
            q, k, v, o = (getattr(attn, n) for n in ATTN_PROJ)
            nq, nkv = s["heads"] * hd, s["kv_heads"] * hd
            attn.q_proj = _resized(q, hidden, nq, q.bias is not None)
            attn.k_proj = _resized(k, hidden, nkv, k.bias is not None)
            attn.v_proj = _resized(v, hidden, nkv, v.bias is not None)
            attn.o_proj = _resized(o, nq, hidden, bool(s["o_bias"]))
            attn.num_key_value_groups = s["heads"] // s["kv_heads"]
        if s["mlp"]:
            mlp = getattr(layer, branches["mlp"][0])
            gate, up, down = (getattr(mlp, n) for n in MLP_PROJ)
            n = s["intermediate"]
            mlp.gate_proj = _resized(gate, hidden, n, gate.bias is not None)
            mlp.up_proj = _resized(up, hidden, n, up.bias is not None)
            mlp.down_proj = _resized(down, n, hidden, bool(s["down_bias"]))
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = n
        if not (s["attn"] and s["mlp"]):
            kind = "attn" if s["attn"] else "mlp"
            layers[i] = PartialLayer(layer, branches[kind], kind, i, hd)


class SecateursForCausalLM(_BaseModel):
    """The stock causal LM of the base architecture, with per-layer sizes."""

    config_class = SecateursConfig

    def __init__(self, config: SecateursConfig):
        super().__init__(config)
        reshape_layers(self, config)
        self.post_init()


__all__ = ["SecateursConfig", "SecateursForCausalLM"]
