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
  ``h + post(module(pre(h)))``, with the module and norm names from ``config.secateurs_branches``
  (``PartialLayer``: the text of ``secateurs/branches.py``, written in when the file is copied).

Where the layers are and what the projections are called come from the architecture's secateurs adapter, in
``config.secateurs_modules``: ``layers`` (the layer list's path in the model), ``attn`` (q, k, v, o) and ``mlp``
(gate, up, down). State-dict keys are those of the stock architecture, so weights load with the ordinary
machinery.
"""

import torch
import transformers
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

BASE_MODEL_TYPE = "llama"  # the stock architecture; secateurs writes the real one in when copying this file

_BaseConfig = CONFIG_MAPPING[BASE_MODEL_TYPE]
_BaseModel = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[BASE_MODEL_TYPE])


class SecateursConfig(_BaseConfig):
    """The base architecture's configuration (with the pruned layer count) plus the per-layer structure."""

    model_type = "secateurs_" + BASE_MODEL_TYPE
    secateurs_layers: list | None = None  # one dict per remaining layer (see the module docstring)
    secateurs_branches: dict | None = None  # {"attn": [module, pre_norm, post_norm|None], "mlp": [...]}
    secateurs_modules: dict | None = None  # {"layers": "model.layers", "attn": [q, k, v, o], "mlp": [gate, up, down]}


# PartialLayer and branch_forward: secateurs/branches.py (its text is written in here when the file is copied).
from secateurs.branches import PartialLayer  # noqa: E402


def _resized(old: nn.Linear, n_in: int, n_out: int, bias) -> nn.Linear:
    """A projection of the new size, with a bias if ``bias`` (None: as ``old`` has one)."""
    w = old.weight
    bias = old.bias is not None if bias is None else bias
    return nn.Linear(n_in, n_out, bias=bias, device=w.device, dtype=w.dtype)


def reshape_layers(model: nn.Module, config: SecateursConfig) -> None:
    """Resizes every layer of a freshly built stock model to the structure in ``config``."""
    names = config.secateurs_modules
    layers = model.get_submodule(names["layers"])
    if len(config.secateurs_layers) != len(layers):
        raise ValueError(f"secateurs_layers has {len(config.secateurs_layers)} entries for {len(layers)} layers")
    hidden = config.hidden_size
    hd = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    branches = config.secateurs_branches
    for i, s in enumerate(config.secateurs_layers):
        layer = layers[i]
        if s["attn"]:
            attn = getattr(layer, branches["attn"][0])
            nq, nkv = s["heads"] * hd, s["kv_heads"] * hd
            for name, n_in, n_out, bias in zip(names["attn"], (hidden, hidden, hidden, nq), (nq, nkv, nkv, hidden),
                                               (None, None, None, bool(s["o_bias"]))):
                setattr(attn, name, _resized(getattr(attn, name), n_in, n_out, bias))
            attn.num_key_value_groups = s["heads"] // s["kv_heads"]
        if s["mlp"]:
            mlp = getattr(layer, branches["mlp"][0])
            n = s["intermediate"]
            for name, n_in, n_out, bias in zip(names["mlp"], (hidden, hidden, n), (n, n, hidden), (None, None, bool(s["down_bias"]))):
                setattr(mlp, name, _resized(getattr(mlp, name), n_in, n_out, bias))
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
