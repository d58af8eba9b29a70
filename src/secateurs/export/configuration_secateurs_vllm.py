"""The configuration class of a secateurs folder for vLLM's ``DeciLMForCausalLM`` (its ``nemotron_nas`` model).

secateurs copies this file, unchanged, into the folders it exports for vLLM (``secateurs export DIR --format
vllm``); ``config.json`` names it in ``auto_map`` (AutoConfig), so the folder loads with
``trust_remote_code=True``. It imports only transformers: vLLM ships no configuration for ``nemotron-nas``,
and its model reads every layer's block as attributes (``block_config.attention.no_op``,
``block_config.ffn.intermediate_size``), so the JSON objects of ``block_configs`` become ``Attrs``: dicts with
attribute access, which stay JSON-serialisable and pickle across vLLM's worker processes. A missing key is a
missing attribute, as vLLM's ``hasattr(block_config.ffn, "ffn_mult")`` needs.

``qkv_bias`` is stored as given: vLLM's DeciLM layer takes q/k/v biases from it when the config has it, and
output-projection biases from ``attention_bias``.
"""
from transformers import LlamaConfig


class Attrs(dict):
    """A JSON object whose keys read as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _blocks(blocks):
    return [Attrs({k: Attrs(v) if isinstance(v, dict) else v for k, v in b.items()}) for b in blocks or []]


class SecateursDeciConfig(LlamaConfig):
    """A Llama configuration plus one ``block_configs`` entry per layer: ``attention`` {``no_op``,
    ``n_heads_in_group``} and ``ffn`` {``no_op``, ``intermediate_size``}."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, qkv_bias=False, **kwargs):
        self.block_configs = _blocks(block_configs)
        self.qkv_bias = qkv_bias
        super().__init__(**kwargs)
