"""Architecture adapters, one file per family, chosen by ``config.model_type``: where each architecture keeps
its blocks, heads and channels. Loading by name is in ``sources``."""
from . import gemma3, llama  # noqa: F401  (registers the adapters)
from .base import Adapter, Branch, ModelSpec, get_adapter, supported_model_types, unique_param_count

__all__ = ["Adapter", "Branch", "ModelSpec", "get_adapter", "supported_model_types", "unique_param_count"]
