"""The Llama family: Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms). One adapter serves
them all: the same layer layout, the same projection names; biases and q/k norms are handled where present."""
from .base import Adapter, LlamaCppArch, VllmArch, register_adapter


@register_adapter
class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    llamacpp = {"llama": LlamaCppArch("llama", "deci"), "mistral": LlamaCppArch("llama", "deci"),
                "qwen2": LlamaCppArch("qwen2", "deci"),
                "qwen3": LlamaCppArch("qwen3", None, "its per-head q/k norms have no place in llama.cpp's deci "
                                                     "architecture")}
    # vLLM's DeciLM layers are Llama layers with q/k/v (qkv_bias) and output biases (attention_bias, mlp_bias)
    vllm = {"llama": VllmArch(True), "mistral": VllmArch(True), "qwen2": VllmArch(True),
            "qwen3": VllmArch(False, "its per-head q/k norms have no place in vLLM's DeciLM layers")}

    def uniform_window(self) -> int | None:
        """Mistral's sliding window applies to every layer (Qwen2's, when enabled, only to some)."""
        return getattr(self.config, "sliding_window", None) if self.config.model_type == "mistral" else None
