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
    a = p.parse_args(argv)

    sys.path.insert(0, str(ROOT / "src"))
    from secateurs.data import calib_rows, eval_rows
    from secateurs.eval.perplexity import perplexity
    from secateurs.importance.cost import load_or_measure, paired_latency
    from secateurs.methods import PruneContext
    from secateurs.methods.tell import TellConfig, assign_plan, prepare
    from secateurs.models import get_adapter, load_model
    from secateurs.surgery import apply_plan

    t0 = time.time()
    work = Path(a.work) / a.model
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(a.model, progress=False)
    ad = get_adapter(model)
    spec = ad.spec()
    calib = calib_rows(tok, model, "wiki", a.nsamples, a.seqlen, a.seed)
    test = eval_rows(tok, model, "wiki:test", a.eval_seqlen, a.eval_rows)
    ctx = PruneContext(model, tok, ad, spec, calib, a.ratio, a.seed, work, progress=True)
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
    out = ROOT / "benchmarks" / "results" / f"tell-ablation-{a.model}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# tell: assignment variants on {a.model} at ratio {a.ratio}", "",
             f"Command: `PYTHONPATH=src python benchmarks/tell_ablation.py {' '.join(sys.argv[1:])}`", "",
             f"Calibration `wiki`, {a.nsamples} rows of {a.seqlen}, seed {a.seed}; perplexity `wiki:test`, first "
             f"{a.eval_rows} rows of {a.eval_seqlen}; dense perplexity {dense_ppl:.2f}. Speed: CPU float32, batch 1, "
             f"prefill of {base.latency_len} tokens, {base.latency_reps} alternated dense/pruned passes, clock "
             f"{base.latency_clock} (CPU time on one thread). Other settings: tell defaults.", "",
             "Variants (TellConfig fields changed from the defaults): " + "; ".join(f"`{k}` {v}" for k, v in VARIANTS.items()),
             "",
             "| assignment | ratio | ppl | predicted speedup | measured speedup | attn blocks removed | mlp blocks removed |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {r:.4f} | {p:.2f} | {ps:.3f} | {ms:.3f} | {ra} | {rm} |" for n, r, p, ps, ms, ra, rm in rows]
    out.write_text("\n".join(lines) + "\n")
    print(f"ablation: wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
