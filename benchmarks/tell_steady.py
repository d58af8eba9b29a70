"""tell on a busy machine: its responses on 2 workers against 1, and its plan at a speedup budget quiet and loaded.

1. Workers: the response assignment at ``--ratio`` (nothing timed) in one process, then with ``--workers 2``,
   each in a fresh response cache: wall seconds of each, and whether the responses (the cache files, byte for
   byte) and the plans are the same.
2. Plan at ``--speedup``: with the responses of step 1 cached, the same ``tell --speedup S`` command
   (a) on the machine as it is, the unit costs measured afresh (an empty cost cache);
   (b) under an artificial load (``eval.load.busy_machine``: a busy loop per core and one more) with
       ``--refresh-costs``: every timing taken under the load, as every run timed its costs before they were
       cached per device;
   (c) under the same load without it: the costs and speedup checks of (a) from the cache (run before (b),
       which rewrites the cache).
   Per run: the blocks removed whole and narrowed, the costs (fraction of the dense time saved per kind, spread,
   pairs), the machine's load while measuring, and the speedup rounds.

Writes ``RESULTS/tell-steady-<model>.json`` and ``.md``.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/tell_steady.py --model smollm2-135m --nsamples 4 --seqlen 128
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cache(work: Path, name: str) -> Path:
    """A fresh secateurs cache that shares the converted models of the usual one."""
    from secateurs.files import cache_dir

    c = work / name
    c.mkdir(parents=True, exist_ok=True)
    models = cache_dir() / "models"
    if models.exists() and not (c / "models").exists():
        (c / "models").symlink_to(models)
    return c


def _blocks(details: dict) -> dict:
    return {"removed": [b["block"] for b in details["blocks"] if b["action"] == "removed"],
            "narrowed": {b["block"]: b["option"] for b in details["blocks"] if b["action"] == "narrowed"}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--speedup", type=float, default=1.3)
    p.add_argument("--latency-len", type=int, default=256)
    p.add_argument("--latency-reps", type=int, default=3)
    p.add_argument("--skip", default="", help="comma-separated steps to skip: workers, plan")
    p.add_argument("--work", default=str(ROOT / "runs" / "tell-steady"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    import secateurs
    from secateurs.data import calib_rows
    from secateurs.eval.load import busy_machine, loadavg
    from secateurs.methods.tell import TellConfig
    from secateurs.sources import load_model

    work = Path(a.work) / a.model
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(a.model, progress=False)
    calib = calib_rows(tok, model, "wiki", a.nsamples, a.seqlen, a.seed)
    out = {"settings": vars(a), "loadavg_start": loadavg(), "workers": {}, "plans": {}}
    skip = set(a.skip.split(","))

    def prune(name, cfg, cache, workers=None, **budget):
        os.environ["SECATEURS_CACHE"] = str(cache)
        shutil.rmtree(work / name, ignore_errors=True)  # no resume: each run measures what its cache lacks
        t0 = time.time()
        plan = secateurs.prune(model, tok, cfg, calib=calib, seed=a.seed, workdir=work / name, progress=False,
                               workers=workers, model_ref=a.model, **budget)
        return plan, time.time() - t0

    cache = _cache(work, "cache-1")
    if "workers" not in skip:
        for n in (1, 2):
            c = _cache(work, f"cache-{n}")
            shutil.rmtree(c / "tell", ignore_errors=True)  # every response measured
            plan, seconds = prune(f"workers-{n}", TellConfig(response_loss="nll"), c, workers=n if n > 1 else None,
                                  ratio=a.ratio)
            files = sorted((c / "tell").glob("responses-*.json"))
            d = plan.record["method_details"]
            out["workers"][n] = {"seconds": seconds, "responses_measured": d["allocation"]["evaluations_measured"],
                                 "plan": plan.to_dict()["layers"], "files": {f.name: f.read_text() for f in files}}
            print(f"tell_steady: {n} worker(s): {seconds:.0f} s, {out['workers'][n]['responses_measured']} responses",
                  flush=True)
        one, two = out["workers"][1], out["workers"][2]
        out["workers_same"] = {"files": one["files"] == two["files"], "plan": one["plan"] == two["plan"]}
        for w in out["workers"].values():
            del w["files"], w["plan"]
    if "plan" not in skip:
        base = dict(speedup=a.speedup, latency_len=a.latency_len, latency_reps=a.latency_reps, response_loss="nll")
        shutil.rmtree(cache / "costs", ignore_errors=True)  # (a) measures afresh
        # (c) before (b): (c) must read (a)'s costs from the cache, not those (b) re-measures under load
        for name, cfg, loaded in (("a-as-is", TellConfig(**base), False),
                                  ("c-loaded-cached", TellConfig(**base), True),
                                  ("b-loaded-refresh", TellConfig(**base, refresh_costs=True), True)):
            with busy_machine() if loaded else contextlib.nullcontext():
                plan, seconds = prune(name, cfg, cache)
            d = plan.record["method_details"]
            cm = d["cost_model"]
            out["plans"][name] = {"seconds": seconds, **_blocks(d), "plan": plan.to_dict()["layers"],
                                  "steadiness": cm["steadiness"], "ms_per_param": cm["ms_per_param"],
                                  "rounds": [{k: r.get(k) for k in ("cost_model_goal", "predicted", "speedup", "spread",
                                                                    "pairs", "loaded", "cached")}
                                             for r in d["speedup_rounds"]]}
            print(f"tell_steady: {name}: {seconds:.0f} s, removed {out['plans'][name]['removed']}", flush=True)
        plans = out["plans"]
        out["plans_same"] = {"a=b": plans["a-as-is"]["plan"] == plans["b-loaded-refresh"]["plan"],
                             "a=c": plans["a-as-is"]["plan"] == plans["c-loaded-cached"]["plan"]}
        for r in plans.values():
            del r["plan"]
    out["loadavg_end"] = loadavg()
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    path = res / f"tell-steady-{a.model}.json"
    path.write_text(json.dumps(out, indent=1))
    write_md(out, path.with_suffix(".md"))
    print(f"tell_steady: wrote {path}", flush=True)
    return 0


def write_md(out: dict, path: Path) -> None:
    s = out["settings"]
    lines = [f"# tell on a busy machine: {s['model']}", "",
             f"Calibration wiki {s['nsamples']} x {s['seqlen']}, seed {s['seed']}; "
             f"`OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/tell_steady.py --model {s['model']} "
             f"--nsamples {s['nsamples']} --seqlen {s['seqlen']}`; load average {out['loadavg_start']} at the start, "
             f"{out['loadavg_end']} at the end.", ""]
    if out["workers"]:
        lines += [f"## Responses on workers (`--ratio {s['ratio']}`, nothing timed)", "",
                  "| workers | seconds | responses measured |", "|---|---|---|"]
        lines += [f"| {n} | {w['seconds']:.0f} | {w['responses_measured']} |" for n, w in out["workers"].items()]
        same = out["workers_same"]
        lines += ["", f"Same response files byte for byte: {same['files']}; same plan: {same['plan']}.", ""]
    if out["plans"]:
        lines += [f"## Plan at `--speedup {s['speedup']}` (latency prompt {s['latency_len']}, at least "
                  f"{s['latency_reps']} pairs)", "",
                  "| run | seconds | removed whole | narrowed | costs: fraction saved (spread, pairs) | load while "
                  "measuring the costs | rounds: measured (cached) |", "|---|---|---|---|---|---|---|"]
        for name, r in out["plans"].items():
            kinds = r["steadiness"]["kinds"]
            costs = "; ".join(f"{k} {v['fraction_saved']:.3f} ({v['spread']:.3f}, {v['pairs']})" for k, v in kinds.items())
            load = r["steadiness"]["load"] or {}
            rounds = ", ".join(f"{x['speedup']:.3f} ({'yes' if x['cached'] else 'no'})" for x in r["rounds"])
            lines.append(f"| {name} | {r['seconds']:.0f} | {', '.join(r['removed']) or '-'} | {len(r['narrowed'])} "
                         f"blocks | {costs} | runnable {load.get('runnable', [])[:3]}..., loaded {load.get('loaded')} "
                         f"| {rounds} |")
        same = out["plans_same"]
        lines += ["", f"Same plan as (a): (b) measured under load {same['a=b']}, (c) from the cache under load "
                  f"{same['a=c']}.", ""]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
