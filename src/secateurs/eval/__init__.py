"""Evaluation: perplexity, latency (and, in their own modules, zero-shot accuracy and benchmarks)."""
from .perplexity import PPLResult, perplexity  # noqa: F401
