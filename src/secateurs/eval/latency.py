"""Prefill latency: median wall time of one forward pass over a batch-1 prompt, after warm-up."""
from __future__ import annotations

import statistics
import time

import torch


@torch.inference_mode()
def prefill_ms(model, prompt_len: int = 512, reps: int = 5, warmup: int = 2, seed: int = 0) -> float:
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g).to(device)
    times = []
    for i in range(warmup + reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)
