"""Gemma 3 (text): every branch has a norm before and a norm after the module, the norms scale by (1 + w),
queries are scaled by ``query_pre_attn_scalar``, and perplexity rows need BOS."""
from .base import Adapter, Branch, LlamaCppArch, VllmArch, register_adapter


@register_adapter
class Gemma3Adapter(Adapter):
    model_types = ("gemma3_text",)
    attn_branch = Branch("self_attn", "input_layernorm", "post_attention_layernorm")
    mlp_branch = Branch("mlp", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    bos_per_row = True
    norm_offset = 1.0
    llamacpp = {"gemma3_text": LlamaCppArch("gemma3", None, "llama.cpp's gemma3 graph sizes every layer from layer 0 "
                                                            "and has no per-block removal")}
    vllm = {"gemma3_text": VllmArch(False, "vLLM's DeciLM layers are Llama layers: no (1 + w) norms, no post-norms, "
                                           "no query_pre_attn_scalar, no sliding/global pattern")}

    def query_scale_dim(self) -> float:
        return getattr(self.config, "query_pre_attn_scalar", self.head_dim())
