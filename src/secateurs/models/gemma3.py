"""Gemma 3 (text): every branch has a norm before and a norm after the module, and perplexity rows need BOS."""
from .base import Adapter, Branch, register_adapter


@register_adapter
class Gemma3Adapter(Adapter):
    model_types = ("gemma3_text",)
    attn_branch = Branch("self_attn", "input_layernorm", "post_attention_layernorm")
    mlp_branch = Branch("mlp", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    bos_per_row = True
