"""What is trained: LoRA adapters through peft on the pruned model's projections, or every weight (``--full``).

LoRA goes on the attention projections (q, k, v, o) and the MLP projections (gate, up, down) that the pruned
model still has, named through the architecture adapter; embeddings, norms and the LM head stay frozen, and so
do the projections' biases (FLAP's bias compensation among them): ``bias="none"``. At the end the adapters
are merged into the weights (``merge_and_unload``), so the model has exactly the pruned shapes again. With
``--full`` every parameter trains, biases included, and nothing needs merging.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import UserError


def target_names(model) -> list[str]:
    from ..models import get_adapter

    a = get_adapter(model)
    return [a.q, a.k, a.v, a.o, a.gate, a.up, a.down]


def targets(model) -> list[tuple[str, nn.Linear]]:
    names = set(target_names(model))
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names]


def check_rank(model, rank: int) -> None:
    """A LoRA rank above a projection's smaller side adds no capacity: refused (``model`` may be on meta)."""
    if rank < 1:
        raise UserError(f"--lora-rank must be at least 1 (got {rank})")
    found = targets(model)
    if not found:
        raise UserError("the pruned model has no attention or MLP projections left to adapt; use --full")
    name, lin = min(found, key=lambda t: min(t[1].in_features, t[1].out_features))
    width = min(lin.in_features, lin.out_features)
    if rank > width:
        raise UserError(f"--lora-rank {rank} is larger than the width of {name} ({lin.in_features} -> "
                        f"{lin.out_features}); use a rank of at most {width}, or --full")


def add_lora(model, rank: int, alpha: float, seed: int):
    """The peft model with LoRA on every target projection (A drawn from ``seed``, B zero: no change yet)."""
    from peft import LoraConfig, get_peft_model

    check_rank(model, rank)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                     target_modules=sorted(set(target_names(model))))
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # transformers' deprecation notice for a name peft still reads
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return get_peft_model(model, cfg)


def trainable(model) -> dict[str, nn.Parameter]:
    """Parameters to train, by name (tied parameters once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def prepare(model, full: bool, rank: int, alpha: float, seed: int):
    """(model to train, its trainable parameters by name)."""
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
        return model, trainable(model)
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = add_lora(model, rank, alpha, seed)
    return peft_model, trainable(peft_model)


def merged(model, full: bool):
    """The plain pruned model with the adapters folded into its weights."""
    if full:
        return model
    return model.merge_and_unload()
