"""secateurs: training-free structured pruning of LLMs, with honest measurements.

    from secateurs import load, apply_plan, PruningPlan
    model, tok = load("smollm2-135m")          # or a hub id, a local folder, a pruned folder
"""
__version__ = "0.1.0"

from .errors import UserError  # noqa: E402


def load(name_or_path: str, **kw):
    """(model, tokenizer) for an embedded name, a Hugging Face id or folder, or a pruned secateurs folder."""
    from .sources import load_model

    return load_model(name_or_path, **kw)


def __getattr__(name):  # lazy: keep `import secateurs` light
    if name in ("PruningPlan", "LayerPlan"):
        from . import plan

        return getattr(plan, name)
    if name == "apply_plan":
        from .surgery import apply_plan

        return apply_plan
    raise AttributeError(name)


__all__ = ["load", "apply_plan", "PruningPlan", "LayerPlan", "UserError", "__version__"]
