"""The Llama family: Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms). One adapter serves
them all: the same layer layout, the same projection names; biases and q/k norms are handled where present."""
from .base import Adapter, register_adapter


@register_adapter
class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
