"""Prefill latency; the implementation lives with the other speed measurements in ``secateurs.eval.bench``."""
from .bench import prefill_ms  # noqa: F401
