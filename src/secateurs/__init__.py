"""secateurs: training-free structured pruning of LLMs, with honest measurements.

    import secateurs
    model, tok = secateurs.load("smollm2-135m")   # or a hub id, a local folder, a pruned folder
    plan = secateurs.prune(model, tok, secateurs.FlapConfig(), ratio=0.2, calib="wiki")   # or speedup=1.3
    secateurs.apply_plan(model, plan)
    print(secateurs.evaluate(model, tok, ppl="wiki:test"))
    secateurs.save(model, tok, plan, "runs/flap-20")  # the folder `secateurs prune` writes

Every name but ``UserError`` and ``__version__`` is imported on first use (``import secateurs`` stays light):
the functions from ``secateurs.api``, ``PruningPlan``/``LayerPlan`` from ``secateurs.plan``, and every method's
config class (``FlapConfig``, ``BlockPrunerConfig``, ...) from the method registry (``secateurs.methods``).
"""
import sys
import types

from ._version import __version__
from .errors import UserError

API = ("load", "prune", "apply_plan", "evaluate", "save", "heal", "export", "bench")
PLAN = ("PruningPlan", "LayerPlan")


def _configs() -> dict:
    from .methods import all_methods

    return {m.config_cls.__name__: m.config_cls for m in all_methods().values()}


def __getattr__(name):  # lazy: keep `import secateurs` light
    if name in API:
        from . import api

        return getattr(api, name)
    if name in PLAN:
        from . import plan

        return getattr(plan, name)
    if name.endswith("Config") and name[:1].isupper():
        configs = _configs()
        if name in configs:
            return configs[name]
    raise AttributeError(f"module 'secateurs' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``secateurs.export`` and ``secateurs.heal`` are API functions and also the names of subpackages. Importing
    a subpackage sets it as an attribute of its parent, which would hide the function from then on; these
    properties keep the function (the subpackages stay importable by their dotted names)."""

    def _api(name):
        def get(self):
            from . import api

            return getattr(api, name)

        return property(get, lambda self, value: None)  # the import system's setattr of the subpackage

    export = _api("export")
    heal = _api("heal")
    del _api


sys.modules[__name__].__class__ = _Package


__all__ = [*API, *PLAN, "UserError", "__version__"]
