"""Architecture adapters (one file per family, chosen by ``config.model_type``) and model loading."""
from . import gemma3, llama  # noqa: F401  (registers the adapters)
from .base import Adapter, Branch, ModelSpec, get_adapter, supported_model_types, unique_param_count
from .loading import DEFAULT_MODEL, EMBEDDED, load_model

__all__ = [
    "Adapter", "Branch", "ModelSpec", "get_adapter", "supported_model_types", "unique_param_count",
    "DEFAULT_MODEL", "EMBEDDED", "load_model",
]
