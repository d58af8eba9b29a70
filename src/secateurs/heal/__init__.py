"""Healing a pruned model: distillation from the dense model it came from into LoRA adapters (or all weights),
merged back so the result is a pruned folder like any other (same shapes, same plan).

- ``settings``: the job's settings and their checks;
- ``data``: heal rows, their order and fingerprint, the overlap check against held-out evaluation text;
- ``teacher``: the dense model's top-k next-token log-probabilities, computed once and streamed from disk;
- ``loss``: KL(teacher || student) on the top-k plus the remaining mass, cross-entropy, or both;
- ``adapters``: LoRA through peft on the attention and MLP projections, or full fine-tuning;
- ``job``: the resumable job behind ``secateurs heal`` (docs/heal.md).
"""
from .settings import HealSettings


def __getattr__(name):  # lazy: the CLI reads the settings without importing torch
    if name == "run_heal":
        from .job import run_heal

        return run_heal
    raise AttributeError(name)


__all__ = ["HealSettings", "run_heal"]
