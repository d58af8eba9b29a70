"""BlockPruner search on a Ray worker pool (``--workers N``) against one process, same model, same calibration
rows, same settings, through the code ``secateurs prune`` runs (``search.depth.run_greedy``; the model is
loaded and the rows drawn once, outside both timings). Prints the wall times, their ratios (with and without
the pool's start-up: Ray itself, then a model replica per worker) and whether the two removal orders and every
step's loss are identical (bitwise).

The issue's setting (2 cores; one thread in the single process, one per worker):

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/workers_speed.py --nsamples 4 --seqlen 256 --steps 4 \\
        --workers 2 --threads-per-worker 1 --json benchmarks/results/workers_speed_cpu.json

Run it on a quiet machine: the two workers need both cores to themselves.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from secateurs.data import calib_rows
from secateurs.methods import PruneContext
from secateurs.sources import load_model
from secateurs.runtime.pool import PoolSettings, WorkerPool
from secateurs.sources import replica_loader
from secateurs.search.depth import SearchOptions, run_greedy
from secateurs.search.greedy import block_candidates


def search(model, calib, a, pool=None) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory() as work:
        ctx = PruneContext.build(model, calib, seed=a.seed, workdir=work, progress=a.progress, pool=pool)
        cfg = SearchOptions(batch_size=a.batch_size, cache_mb=a.cache_mb)
        t0 = time.perf_counter()
        state = run_greedy(ctx, cfg, block_candidates(ctx.spec.n_layers, "mix"), "blockpruner", None, a.steps)
        return state, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cache-mb", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads-per-worker", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the single process")
    p.add_argument("--pool-first", action="store_true", help="time the pool before the single process")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, device=a.device, progress=False)
    calib = calib_rows(tok, model, "wiki", a.nsamples, a.seqlen, a.seed)
    settings = vars(a) | {"threads_used": torch.get_num_threads(), "cores": os.cpu_count(),
                          "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    print(f"settings: {json.dumps(settings)}", flush=True)
    load = {"before": os.getloadavg()}
    print(f"load average before: {load['before']}", flush=True)

    def single():
        state, t = search(model, calib, a)
        print(f"one process: search {t:8.1f} s  order {[s['removed'] for s in state['steps']]}", flush=True)
        return state, t

    def pooled():
        loader = partial(replica_loader, a.model, device=a.device)
        t0 = time.perf_counter()
        pool = WorkerPool(PoolSettings(a.workers, None, a.threads_per_worker, None, a.device), loader).open()
        t_ray = time.perf_counter() - t0
        try:
            state, t = search(model, calib, a, pool)  # includes the start of the workers (a replica each)
        finally:
            pool.close()
        print(f"pool:        Ray {t_ray:6.1f} s + search {t:8.1f} s (with the workers' start)  "
              f"order {[s['removed'] for s in state['steps']]}  lost {pool.lost}", flush=True)
        return state, t, t_ray

    if a.pool_first:
        pool_state, t_pool, t_ray = pooled()
        one_state, t_one = single()
    else:
        one_state, t_one = single()
        pool_state, t_pool, t_ray = pooled()
    load["after"] = os.getloadavg()
    print(f"load average after: {load['after']}")
    same_order = [s["removed"] for s in pool_state["steps"]] == [s["removed"] for s in one_state["steps"]]
    same_loss = ([s["loss"] for s in pool_state["steps"]] == [s["loss"] for s in one_state["steps"]]
                 and pool_state["dense"] == one_state["dense"])
    print("step  removed    calib ppl   ratio   one s   pool s  abandoned (one / pool)")
    for k, (o, q) in enumerate(zip(one_state["steps"], pool_state["steps"]), 1):
        print(f"{k:4d}  {o['removed']:9s} {o['ppl']:10.3f}  {o['ratio']:.4f}  {o['seconds']:6.1f}  {q['seconds']:6.1f}  "
              f"{o['evaluations_abandoned']:3d} / {q['evaluations_abandoned']:3d} of {o['candidates']}")
    steps_one = sum(s["seconds"] for s in one_state["steps"])
    steps_pool = sum(s["seconds"] for s in pool_state["steps"])
    ratio_all = t_one / (t_ray + t_pool)
    print(f"wall-time ratio (one process / pool): {ratio_all:.2f}x including the pool's start-up "
          f"(Ray {t_ray:.1f} s, workers and dense loss {t_pool - steps_pool:.1f} s); "
          f"{t_one / t_pool:.2f}x without Ray's start; {steps_one / steps_pool:.2f}x over the steps alone")
    print(f"identical removal order: {same_order}; identical losses (bitwise, dense and every step): {same_loss}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        with open(a.json, "w") as fh:
            json.dump({"settings": settings, "load_average": load, "one_seconds": t_one, "pool_seconds": t_pool,
                       "ray_start_seconds": t_ray, "ratio_with_startup": ratio_all, "ratio_without_ray_start": t_one / t_pool,
                       "ratio_steps": steps_one / steps_pool, "identical_order": same_order,
                       "identical_losses": same_loss, "one": one_state, "pool": pool_state}, fh, indent=1)


if __name__ == "__main__":
    main()
