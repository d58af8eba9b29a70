"""What ``--fitness-rows`` costs and buys: the time of one Self-Pruner fitness evaluation on a model, and how well
the fitness on a few rows ranks candidates against the fitness on all of them.

    OMP_NUM_THREADS=1 python benchmarks/self_pruner_fitness_rows.py --model qwen2.5-coder-1.5b --ratio 0.15 \\
        --json benchmarks/results/self-pruner-fitness-rows-qwen2.5-coder-1.5b.json

The fitness as ``secateurs prune --method self-pruner`` computes it (``MaskedFitness``: one-shot Wanda-sp
scores from the calibration, the dense model masked at the candidate's rates): the calibration rows (``--rows``
of ``--seqlen`` tokens of wiki, seed 0) are scored once; each candidate (the uniform rates and ``--candidates
- 1`` classic initial vectors, seeded) gets every row's NLL in one masked pass, one row per batch, each row
timed. The fitness on the first ``k`` rows is the perplexity of those rows; its rank agreement with the
fitness on all rows is Kendall's tau over the candidates (1 = the same order). Writes the JSON (settings,
per candidate its rates and row NLLs, per ``k``: the seconds of one evaluation and tau) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a of two scorings of the same items."""
    n, s = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            s += (1 if (a[i] - a[j]) * (b[i] - b[j]) > 0 else -1 if (a[i] - a[j]) * (b[i] - b[j]) < 0 else 0)
    return s / (n * (n - 1) / 2)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--candidates", type=int, default=5)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--json", required=True)
    p.add_argument("--note", default=None, help="what else ran on the machine")
    a = p.parse_args()

    import torch

    from secateurs.data import calib_rows
    from secateurs.eval.perplexity import row_nll
    from secateurs.importance.width import MaskedPlan, mean_rate_for_ratio
    from secateurs.methods import PruneContext
    from secateurs.methods.self_pruner import MaskedFitness
    from secateurs.result import versions
    from secateurs.search.evolution import SearchSpace
    from secateurs.search.proposers import ClassicProposer
    from secateurs.sources import load_model

    t_start, load_start = time.time(), os.getloadavg()
    model, tok = load_model(a.model, progress=False)
    calib = calib_rows(tok, model, "wiki", a.rows, a.seqlen, 0)
    ctx = PruneContext.build(model, calib, tokenizer=tok, workdir=".", progress=False, model_ref=a.model)
    t0 = time.time()
    scores = MaskedFitness.scores(ctx, 1)
    scores_s = time.time() - t0
    fit = MaskedFitness(model, scores, calib, 1)
    space = SearchSpace(ctx.spec.n_layers, mean_rate_for_ratio(ctx.spec, a.ratio))
    vectors = [space.uniform()] + [x.rates for x in ClassicProposer().initial(space, a.candidates - 1, random.Random(0))]
    cands = []
    for v in vectors:
        nll, secs = [], []
        with MaskedPlan(fit.adapter, fit.spec, fit.plans(v)), torch.inference_mode():
            for r in range(a.rows):
                t0 = time.perf_counter()
                nll.append(float(row_nll(model, calib[r:r + 1], 1)[0]))
                secs.append(time.perf_counter() - t0)
        cands.append({"rates": v, "row_nll": nll, "row_seconds": secs})
        print(f"candidate {len(cands)}: {sum(secs):.0f} s for {a.rows} rows", flush=True)
    tokens = a.seqlen - 1
    ppl = lambda c, k: math.exp(sum(c["row_nll"][:k]) / (k * tokens))
    full = [ppl(c, a.rows) for c in cands]
    row_s = sorted(s for c in cands for s in c["row_seconds"])
    per_row = row_s[len(row_s) // 2]
    ks = [k for k in a.ks if k < a.rows] + [a.rows]
    table = [{"rows": k, "seconds_per_evaluation": k * per_row, "kendall_tau_vs_all_rows": kendall_tau([ppl(c, k) for c in cands], full),
              "fitness": [ppl(c, k) for c in cands]} for k in ks]
    out = {"command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " " + shlex.join([sys.executable, *sys.argv]),
           "settings": vars(a), "mean_rate": space.mean, "scores_seconds": scores_s, "median_row_seconds": per_row,
           "candidates": cands, "by_rows": table, "note": a.note,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": torch.get_num_threads(),
                       "load_average_start": load_start, "load_average_end": os.getloadavg(),
                       "wall_s": time.time() - t_start},
           "versions": versions()}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"{a.model} at {a.ratio:.0%}: {a.candidates} candidates, rows of {a.seqlen} tokens; one row {per_row:.1f} s "
          f"(median, one batch of 1), scores {scores_s:.0f} s; load {load_start} -> {os.getloadavg()}")
    print("| fitness rows | s per evaluation | Kendall tau vs all rows | fitness of the candidates |")
    print("|---|---|---|---|")
    for t in table:
        print(f"| {t['rows']} | {t['seconds_per_evaluation']:.0f} | {t['kendall_tau_vs_all_rows']:.2f} | "
              + ", ".join(f"{f:.2f}" for f in t["fitness"]) + " |")


if __name__ == "__main__":
    main()
