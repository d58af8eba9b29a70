"""BlockPruner search: the fast search against the straightforward one (``--exact-reference``), same model,
same calibration rows, same settings, one process. Prints both wall times, their ratio, the work done
(blocks and loss heads run) and whether the two removal orders (and every step's loss) are identical.

CPU (the issue's setting):   python benchmarks/blockpruner_speed.py --nsamples 4 --seqlen 256 --steps 6
GPU:                         python benchmarks/blockpruner_speed.py --nsamples 32 --seqlen 2048 --steps 20 --device cuda \
                                 --batch-size 8 --cache-mb 40000 --exact-first --exact-time-limit 240 --dtype bfloat16

With ``--exact-time-limit S`` (and ``--exact-first``) the straightforward search stops after the first step that
ends past S seconds, and the fast search then runs the same number of steps: both are compared on those.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from secateurs.data import calib_rows
from secateurs.models import get_adapter
from secateurs.sources import load_model
from secateurs.runtime import model_dtype
from secateurs.search.greedy import Replayer, SearchSettings, block_candidates, greedy_search


class _Stop(Exception):
    pass


def run(model, calib, steps: int, exact: bool, a, time_limit: float | None = None) -> tuple[dict, float, float, Replayer]:
    t0, c0 = time.perf_counter(), time.process_time()
    last = {}

    def on_step(state):
        last["state"] = state
        st = state["steps"][-1]
        print(f"  {'exact' if exact else 'fast'} step {len(state['steps'])}: {st['removed']} {st['seconds']:.1f} s", flush=True)
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            raise _Stop

    with torch.inference_mode():
        r = Replayer(model, get_adapter(model), calib, a.batch_size, a.head_chunk)
        s = SearchSettings(block_candidates(len(get_adapter(model).layers()), "mix"), max_steps=steps, exact=exact,
                           cache_mb=a.cache_mb)
        try:
            state = greedy_search(r, get_adapter(model).spec(), s, progress=False, on_step=on_step)
        except _Stop:
            state = last["state"]
    return state, time.perf_counter() - t0, time.process_time() - c0, r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cache-mb", type=int, default=1024)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="working dtype (secateurs.runtime.precision: auto = the checkpoint's on a GPU, float32 on a CPU; "
                        "the GPU runs of this benchmark used bfloat16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--head-chunk", type=int, default=4096, help="first vocabulary chunk of the loss head (0: one chunk)")
    p.add_argument("--fast-only", action="store_true", help="time the fast search alone (no comparison)")
    p.add_argument("--exact-first", action="store_true", help="run the straightforward search first")
    p.add_argument("--exact-time-limit", type=float, default=None,
                   help="with --exact-first: stop the straightforward search after the step that ends past this many seconds")
    a = p.parse_args()

    model, tok = load_model(a.model, device=a.device, dtype=a.dtype, progress=False)
    calib = calib_rows(tok, model, "wiki", a.nsamples, a.seqlen, a.seed)
    settings = vars(a) | {"dtype_used": str(model_dtype(model)), "threads": torch.get_num_threads(),
                          "cpu": platform.processor() or platform.machine(),
                          "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None}
    print(f"settings: {json.dumps(settings)}", flush=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    if a.device.startswith("cuda"):  # warm-up: CUDA context, kernels and allocator, outside both timings
        with torch.inference_mode():
            w = Replayer(model, get_adapter(model), calib[: a.batch_size], a.batch_size, a.head_chunk)
            w.loss(0, w.run(0, w.emb[0], 0, frozenset()))

    def work(r):
        return f"blocks run {r.blocks_run:6d}  loss heads {r.head_work:8.1f} (full-vocabulary equivalents; {r.heads_run} complete)"

    steps = a.steps
    if a.exact_first and not a.fast_only:
        exact, t_exact, c_exact, r_exact = run(model, calib, steps, True, a, a.exact_time_limit)
        steps = len(exact["steps"])
        print(f"exact: {t_exact:8.1f} s wall {c_exact:8.1f} s CPU  {work(r_exact)}  order {[s['removed'] for s in exact['steps']]}", flush=True)
    fast, t_fast, c_fast, r_fast = run(model, calib, steps, False, a)
    print(f"fast:  {t_fast:8.1f} s wall {c_fast:8.1f} s CPU  {work(r_fast)}  order {[s['removed'] for s in fast['steps']]}", flush=True)
    if a.fast_only:  # no comparison: the fast search's own figures
        if a.json:
            with open(a.json, "w") as fh:
                json.dump({"settings": settings, "fast_seconds": t_fast, "fast_cpu_seconds": c_fast,
                           "load_after": os.getloadavg(), "fast": fast}, fh, indent=1)
        return
    if not a.exact_first:
        exact, t_exact, c_exact, r_exact = run(model, calib, steps, True, a)
        print(f"exact: {t_exact:8.1f} s wall {c_exact:8.1f} s CPU  {work(r_exact)}  order {[s['removed'] for s in exact['steps']]}", flush=True)
    print(f"load average after: {os.getloadavg()}")
    print(f"steps compared: {steps}")
    same_order = [s["removed"] for s in fast["steps"]] == [s["removed"] for s in exact["steps"]]
    same_loss = [s["loss"] for s in fast["steps"]] == [s["loss"] for s in exact["steps"]]
    print("step  removed    calib ppl   ratio    fast s  abandoned/candidates  exact s")
    for f, e in zip(fast["steps"], exact["steps"]):
        print(f"{fast['steps'].index(f) + 1:4d}  {f['removed']:9s} {f['ppl']:10.3f}  {f['ratio']:.4f}  "
              f"{f['seconds']:7.1f}  {f['evaluations_abandoned']:4d}/{f['candidates']:<4d}            {e['seconds']:7.1f}")
    print(f"speedup (exact / fast): wall time {t_exact / t_fast:.2f}x, CPU time {c_exact / c_fast:.2f}x; "
          f"work ratio (blocks run): {r_exact.blocks_run / r_fast.blocks_run:.2f}x, "
          f"(loss heads run): {r_exact.head_work / r_fast.head_work:.2f}x")
    print(f"identical removal order: {same_order}; identical step losses (bitwise): {same_loss}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"settings": settings, "fast_seconds": t_fast, "exact_seconds": t_exact,
                       "fast_cpu_seconds": c_fast, "exact_cpu_seconds": c_exact,
                       "speedup": t_exact / t_fast, "speedup_cpu": c_exact / c_fast, "identical_order": same_order, "identical_losses": same_loss,
                       "fast": fast, "exact": exact}, fh, indent=1)


if __name__ == "__main__":
    main()
