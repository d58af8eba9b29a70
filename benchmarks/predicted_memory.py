"""Predicted peak memory of every method on Llama-3-8B and Llama-2-70B at the papers' calibration settings, with
the whole model on one GPU and layer by layer (``--max-memory cuda:0=80GB``), in bfloat16.

The models are built on the meta device from their published configurations (sizes only, no weights); the
numbers come from ``secateurs.runtime.estimate`` (``estimate_peak``), the code ``prune`` prints before a search
and ``prune --dry-run`` prints alone. Nothing here is measured: no GPU was available to this work.

    python benchmarks/predicted_memory.py --md benchmarks/results/predicted_memory.md \\
        --json benchmarks/results/predicted_memory.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# published configurations (config.json of meta-llama/Meta-Llama-3-8B and meta-llama/Llama-2-70b-hf): sizes only
CONFIGS = {
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False),
    "Llama-2-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                        tie_word_embeddings=False),
}

# (method, calibration rows, tokens per row, batch size, where the setting comes from)
SETTINGS = [
    ("blockpruner", 256, 2048, 1, "BlockPruner paper: 256 Alpaca samples of 2048 tokens (docs methods.md)"),
    ("sleb", 128, 2048, 1, "SLEB paper: 128 samples of 2048 tokens"),
    ("shortgpt", 128, 2048, 1, "as Wanda / SLEB (ShortGPT does not state it here)"),
    ("flap", 128, 2048, 4, "Wanda's standard 128 x 2048 (used for FLAP here)"),
    ("wanda-sp", 128, 2048, 4, "Wanda's standard 128 x 2048"),
    ("self-pruner", 128, 2048, 4, "no public setting: wanda-sp's 128 x 2048, fitness on 4 rows"),
    ("tell", 128, 2048, 4, "paper: 128 samples (length not stated: 2048)"),
]
GPU = 80 * 10**9  # bytes of one 80 GB GPU


def sizes_of(name: str):
    from transformers import AutoConfig

    from secateurs.runtime.estimate import model_sizes
    from secateurs.runtime.loading import _meta_model

    config = AutoConfig.for_model("llama", **CONFIGS[name])
    return model_sizes(_meta_model(config, torch.bfloat16), torch.bfloat16)


def gb(n: float) -> str:
    return f"{n / 1e9:,.1f}"


def main():
    from secateurs.methods import get_method, make_config
    from secateurs.runtime.estimate import estimate_peak, min_budget

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--cpu-gb", type=float, default=256.0, help="CPU memory given to the run (--max-memory cpu=; "
                   "default 256 GB)")
    p.add_argument("--disk-gb", type=float, default=1000.0, help="disk for spilled states (default 1000 GB)")
    a = p.parse_args()
    cpu = int(a.cpu_gb * 1e9)
    disk = int(a.disk_gb * 1e9)
    out, lines = {}, []
    for name in CONFIGS:
        s = sizes_of(name)
        out[name] = {"weights_bytes": s.weights, "layer_bytes": max(s.layer_bytes), "methods": {}}
        lines += [f"## {name} (bfloat16: weights {gb(s.weights)} GB, largest layer {gb(max(s.layer_bytes))} GB)", "",
                  "| method | calibration | whole model on the GPU | fits 80 GB? | layer by layer (cuda:0=80GB): GPU | "
                  "CPU | disk (spilled) | recomputed | fits? |",
                  "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
        for method, rows, seqlen, batch, why in SETTINGS:
            cfg = make_config(get_method(method), {"batch_size": batch})  # defaults, at this batch
            whole = estimate_peak(s, cfg, rows, seqlen, batch, "cuda:0")
            lay = estimate_peak(s, cfg, rows, seqlen, batch, "cuda:0", GPU, cpu_budget=cpu, disk_budget=disk)
            w = whole.per_place["cuda:0"]
            fits_whole = w <= GPU
            fits_lay = lay.per_place["cuda:0"] <= GPU and not lay.per_place.get("does not fit")
            out[name]["methods"][method] = {"calibration": [rows, seqlen, batch], "source": why,
                                            "whole": whole.as_dict(), "layer_by_layer": lay.as_dict(),
                                            "min_budget_bytes": min_budget(s, batch, seqlen),
                                            "fits_80gb_whole": fits_whole, "fits_80gb_layer_by_layer": fits_lay}
            pl = lay.per_place
            lines.append(f"| {method} | {rows} x {seqlen} (batch {batch}) | {gb(w)} GB"
                         + (f" (+{gb(whole.per_place['cpu'])} GB CPU)" if whole.per_place.get("cpu") else "")
                         + f" | {'yes' if fits_whole else 'no'} | {gb(pl['cuda:0'])} GB | {gb(pl.get('cpu', 0))} GB | "
                         f"{gb(pl.get('disk', 0))} GB | {gb(pl.get('recomputed', 0))} GB | "
                         f"{'yes' if fits_lay else 'no: ' + gb(pl['does not fit']) + ' GB must stay'} |")
        lines.append("")
    bp = out["Llama-2-70B"]["methods"]["blockpruner"]
    held = {h["what"]: h["nbytes"] for h in bp["layer_by_layer"]["held"]}
    verdict = (
        f"**Does a 70B BlockPruner search fit one 80 GB GPU?** Whole: no (the bfloat16 weights alone are "
        f"{gb(out['Llama-2-70B']['weights_bytes'])} GB). Layer by layer: yes, in memory — the GPU holds one layer "
        f"({gb(out['Llama-2-70B']['layer_bytes'])} GB), one batch's working set, the calibration embeddings and as many "
        f"cached states as fit ({gb(bp['layer_by_layer']['per_place']['cuda:0'])} GB at most); the weights wait in CPU "
        f"memory (CPU in all: {gb(bp['layer_by_layer']['per_place'].get('cpu', 0))} GB with spilled states). "
        f"But the search keeps the current model's state at every one of the 160 block positions for 256 x 2048 "
        f"tokens: {gb(held['current states at every block position'])} GB. Beyond the GPU, {a.cpu_gb:.0f} GB of CPU "
        f"memory and {a.disk_gb:.0f} GB of disk, {gb(bp['layer_by_layer']['per_place'].get('recomputed', 0))} GB of "
        "them are recomputed when needed (the same losses, bitwise; the search gets slower in proportion). At 32 x 512 "
        f"tokens (the GPU default here) those states are {gb(held['current states at every block position'] / 32)} GB.")
    head = ["# Predicted peak memory at the papers' calibration settings (no weights loaded, nothing measured)", "",
            "Models built on the meta device from their published configurations; bfloat16; one 80 GB GPU "
            f"(`--max-memory cuda:0=80GB,cpu={a.cpu_gb:.0f}GB,disk={a.disk_gb:.0f}GB`: the disk for spilled "
            "files). Estimator: `secateurs.runtime.estimate.estimate_peak` (the one `prune` and `prune --dry-run` "
            "print). 'Whole model' is today's fast path; 'layer by layer' streams one decoder layer at a time onto the "
            "GPU. Working set: one batch through the largest step, attention scores counted as materialized float32 "
            "(an upper bound for SDPA kernels).", "",
            "Command: `python benchmarks/predicted_memory.py --md benchmarks/results/predicted_memory.md --json "
            "benchmarks/results/predicted_memory.json`", "", verdict, ""]
    text = "\n".join(head + lines)
    print(text)
    if a.md:
        Path(a.md).write_text(text + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": vars(a), "models": out}, indent=1))


if __name__ == "__main__":
    main()
