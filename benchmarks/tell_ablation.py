"""Does tell's importance-based assignment win? Variants of the per-block assignment at one ratio, on one
calibration (importance, FLAP statistics and unit costs computed once), each applied physically and measured:
held-out perplexity, predicted speedup (cost model) and measured prefill speedup (alternated with the dense
model in this process). Writes ``benchmarks/results/tell-ablation-<model>.md``.

    PYTHONPATH=src python benchmarks/tell_ablation.py --model smollm2-135m --ratio 0.25
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {  # name -> TellConfig fields that differ from the defaults (of the transfer-entropy assignment)
    "uniform": dict(assign="uniform"),
    "kind-T1": dict(assign="importance", normalize="kind", temperature=1.0, block_threshold=0.6),
    "global-T1": dict(assign="importance", normalize="global", temperature=1.0, block_threshold=0.6),
    "kind-T1-width": dict(assign="importance", normalize="kind", temperature=1.0, block_threshold=1.0),
    "kind-T0.5-width": dict(assign="importance", normalize="kind", temperature=0.5, block_threshold=1.0),
    "kind-T0.5": dict(assign="importance", normalize="kind", temperature=0.5, block_threshold=0.6),
}


ROW_KEYS = ("assignment", "ratio", "ppl", "predicted_speedup", "measured_speedup", "attn_blocks_removed",
            "mlp_blocks_removed")


def render(data: dict) -> str:
    """The markdown page from the raw JSON (``--render FILE`` regenerates it without running anything)."""
    lat = data["latency"]
    lines = [f"# tell: assignment variants on {data['model']} at ratio {data['ratio']}", "",
             f"Command: `{data['command']}`", "",
             f"Calibration `{data['calib']}`, {data['nsamples']} rows of {data['seqlen']}, seed {data['seed']}; perplexity "
             f"`{data['eval_set']}`, first {data['eval_rows']} rows of {data['eval_seqlen']}; dense perplexity "
             f"{data['dense_ppl']:.2f}. Speed: CPU float32, batch 1, prefill of {lat['prompt_len']} tokens, {lat['reps']} "
             f"alternated dense/pruned passes, clock {lat['clock']} (CPU time on one thread). Other settings: tell "
             "defaults." + (f" Load average when written: {', '.join(f'{x:.1f}' for x in data['load_average'])} "
                            "(shared machine)." if data.get("load_average") else ""), "",
             "Variants (TellConfig fields changed from the defaults): "
             + "; ".join(f"`{k}` {v}" for k, v in data["variants"].items()), "",
             "| assignment | ratio | ppl | predicted speedup | measured speedup | attn blocks removed | mlp blocks removed |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['assignment']} | {r['ratio']:.4f} | {r['ppl']:.2f} | {r['predicted_speedup']:.3f} | "
              f"{r['measured_speedup']:.3f} | {r['attn_blocks_removed']} | {r['mlp_blocks_removed']} |" for r in data["rows"]]
    lines += [""] + [f"Note: {n}" for n in data.get("notes", [])]
    lines += ["", f"Raw numbers: `tell-ablation-{data['model']}.json` (this folder); the page is made from them "
              f"(`python benchmarks/tell_ablation.py --render benchmarks/results/tell-ablation-{data['model']}.json`)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-rows", type=int, default=8)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--work", default=str(ROOT / "runs" / "tell-ablation"))
    p.add_argument("--render", default=None, metavar="JSON", help="only rewrite the markdown page from this raw JSON")
    a = p.parse_args(argv)
    if a.render:
        Path(a.render).with_suffix(".md").write_text(render(json.loads(Path(a.render).read_text())))
        return 0

    sys.path.insert(0, str(ROOT / "src"))
    from secateurs.data import calib_rows, eval_rows
    from secateurs.eval.perplexity import perplexity
    from secateurs.importance.cost import load_or_measure, paired_latency
    from secateurs.methods import PruneContext
    from secateurs.methods.tell import TellConfig, assign_plan, prepare
    from secateurs.models import get_adapter
    from secateurs.sources import load_model
    from secateurs.result import versions
    from secateurs.surgery import apply_plan

    t0 = time.time()
    work = Path(a.work) / a.model
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(a.model, progress=False)
    ad = get_adapter(model)
    spec = ad.spec()
    calib = calib_rows(tok, model, "wiki", a.nsamples, a.seqlen, a.seed)
    test = eval_rows(tok, model, "wiki:test", a.eval_seqlen, a.eval_rows)
    ctx = PruneContext.build(model, calib, tokenizer=tok, ratio=a.ratio, seed=a.seed, workdir=work)
    base = TellConfig(assign="uniform", te=True)  # transfer entropy computed for every variant to share
    prep = prepare(ctx, base)
    prep.costs, prep.cost_path = load_or_measure(model, spec, base.latency_len, base.latency_reps, a.seed,
                                                 clock=base.latency_clock)  # the predicted speedup column
    dense_path = work / f"dense-e{a.eval_rows}x{a.eval_seqlen}.json"
    if not dense_path.exists():
        dense_path.write_text(json.dumps(perplexity(model, test).ppl))
    dense_ppl = json.loads(dense_path.read_text())
    print(f"ablation: dense ppl {dense_ppl:.2f} ({time.time() - t0:.0f}s)", flush=True)
    rows = []
    for name in a.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        done = work / f"variant-{name}-r{a.ratio:g}-e{a.eval_rows}x{a.eval_seqlen}.json"
        if done.exists():  # resumable: a measured variant is not measured again
            rows.append(tuple(json.loads(done.read_text())))
            print(f"ablation: {name}: done before: {rows[-1]}", flush=True)
            continue
        cfg = dataclasses.replace(base, **VARIANTS[name])
        ctx.progress = False
        plan, ratios, _, _, _ = assign_plan(ctx, cfg, prep)
        pruned = apply_plan(copy.deepcopy(model), plan, spec)
        ppl = perplexity(pruned, test).ppl
        pairs = paired_latency(model, pruned, base.latency_len, base.latency_reps, a.seed, base.latency_clock)
        del pruned
        meas = statistics.median(d for d, _ in pairs) / statistics.median(q for _, q in pairs)
        removed = plan.removed_blocks()
        rows.append((name, plan.ratio(spec), ppl, prep.costs.speedup(spec, plan), meas,
                     sum(k == "attn" for _, k in removed), sum(k == "mlp" for _, k in removed)))
        done.write_text(json.dumps(rows[-1]))
        print(f"ablation: {name}: ratio {rows[-1][1]:.4f} ppl {ppl:.2f} predicted {rows[-1][3]:.3f} "
              f"measured {meas:.3f} removed attn/mlp {rows[-1][5]}/{rows[-1][6]} ({time.time() - t0:.0f}s)", flush=True)
    data = {"command": f"PYTHONPATH=src python benchmarks/tell_ablation.py {' '.join(sys.argv[1:] if argv is None else argv)}",
            "model": a.model, "ratio": a.ratio, "calib": "wiki", "nsamples": a.nsamples, "seqlen": a.seqlen,
            "seed": a.seed, "eval_set": "wiki:test", "eval_rows": a.eval_rows, "eval_seqlen": a.eval_seqlen,
            "dense_ppl": dense_ppl, "latency": {"prompt_len": base.latency_len, "reps": base.latency_reps,
                                                "clock": base.latency_clock, "device": "cpu", "dtype": "float32"},
            "variants": {n: VARIANTS[n] for n, *_ in rows},
            "rows": [dict(zip(ROW_KEYS, r)) for r in rows],
            "versions": versions(), "load_average": list(os.getloadavg())}
    out = ROOT / "benchmarks" / "results" / f"tell-ablation-{a.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # notes written into the raw file by hand stay with it
        data["notes"] = json.loads(out.read_text()).get("notes", [])
    out.write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(data))
    print(f"ablation: wrote {out} and {out.with_suffix('.md').name}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
