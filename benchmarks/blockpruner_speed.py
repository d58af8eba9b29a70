"""BlockPruner search: the fast search against the straightforward one (``--exact-reference``), same model,
same calibration rows, same settings, one process. Prints both wall times, their ratio, the work done
(blocks and loss heads run) and whether the two removal orders (and every step's loss) are identical.

CPU (the issue's setting):   python benchmarks/blockpruner_speed.py --nsamples 4 --seqlen 256 --steps 6
GPU:                         python benchmarks/blockpruner_speed.py --nsamples 32 --seqlen 2048 --steps 20 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from secateurs.data import calib_rows
from secateurs.models import get_adapter, load_model
from secateurs.search.greedy import Replayer, SearchSettings, block_candidates, greedy_search, search_model


def run(model, calib, steps: int, exact: bool, batch_size: int, cache_mb: int) -> tuple[dict, float, float, Replayer]:
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        r = Replayer(model, get_adapter(model), calib, batch_size)
        s = SearchSettings(block_candidates(len(get_adapter(model).layers()), "mix"), max_steps=steps, exact=exact,
                           cache_mb=cache_mb)
        state = greedy_search(r, get_adapter(model).spec(), s, progress=False)
    return state, time.perf_counter() - t0, time.process_time() - c0, r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cache-mb", type=int, default=1024)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--fast-only", action="store_true", help="time the fast search alone (no comparison)")
    a = p.parse_args()

    model, tok = load_model(a.model, device=a.device, progress=False)
    calib = calib_rows(tok, model, "wiki", a.nsamples, a.seqlen, a.seed)
    model = search_model(model, a.dtype)
    settings = vars(a) | {"dtype_used": str(next(model.parameters()).dtype), "threads": torch.get_num_threads(),
                          "cpu": platform.processor() or platform.machine(),
                          "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None}
    print(f"settings: {json.dumps(settings)}", flush=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    fast, t_fast, c_fast, r_fast = run(model, calib, a.steps, False, a.batch_size, a.cache_mb)
    print(f"fast:  {t_fast:8.1f} s wall {c_fast:8.1f} s CPU  blocks run {r_fast.blocks_run:6d}  loss heads {r_fast.heads_run:5d}  "
          f"order {[s['removed'] for s in fast['steps']]}", flush=True)
    if a.fast_only:
        return
    exact, t_exact, c_exact, r_exact = run(model, calib, a.steps, True, a.batch_size, a.cache_mb)
    print(f"exact: {t_exact:8.1f} s wall {c_exact:8.1f} s CPU  blocks run {r_exact.blocks_run:6d}  loss heads {r_exact.heads_run:5d}  "
          f"order {[s['removed'] for s in exact['steps']]}", flush=True)
    print(f"load average after: {os.getloadavg()}")
    same_order = [s["removed"] for s in fast["steps"]] == [s["removed"] for s in exact["steps"]]
    same_loss = [s["loss"] for s in fast["steps"]] == [s["loss"] for s in exact["steps"]]
    print("step  removed    calib ppl   ratio    fast s  abandoned/candidates  exact s")
    for f, e in zip(fast["steps"], exact["steps"]):
        print(f"{fast['steps'].index(f) + 1:4d}  {f['removed']:9s} {f['ppl']:10.3f}  {f['ratio']:.4f}  "
              f"{f['seconds']:7.1f}  {f['evaluations_abandoned']:4d}/{f['candidates']:<4d}            {e['seconds']:7.1f}")
    print(f"speedup (exact / fast): wall time {t_exact / t_fast:.2f}x, CPU time {c_exact / c_fast:.2f}x; "
          f"work ratio (blocks run): {r_exact.blocks_run / r_fast.blocks_run:.2f}x, "
          f"(loss heads run): {r_exact.heads_run / r_fast.heads_run:.2f}x")
    print(f"identical removal order: {same_order}; identical step losses (bitwise): {same_loss}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"settings": settings, "fast_seconds": t_fast, "exact_seconds": t_exact,
                       "fast_cpu_seconds": c_fast, "exact_cpu_seconds": c_exact,
                       "speedup": t_exact / t_fast, "speedup_cpu": c_exact / c_fast, "identical_order": same_order, "identical_losses": same_loss,
                       "fast": fast, "exact": exact}, fh, indent=1)


if __name__ == "__main__":
    main()
