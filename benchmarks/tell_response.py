"""tell's measured-response assignment, studied: variants at equal speed budgets, bias compensation per option,
re-measurement stages, and the transfer-entropy signal against the measured responses.

One model, one calibration (the trade-off's: ``wiki``, seed 0), one response cache (``cache_dir()/tell``): every
variant reuses the responses measured before it. For each variant and each ``--speedups`` budget the method
runs in-process (``methods.tell.tell``, as ``secateurs prune`` runs it, its measured-speedup rounds included),
the plan is applied to a copy of the model and its held-out perplexity measured. Then:

- compensation: every width option's loss increase with and without FLAP's bias compensation (measured when a
  variant with ``compensation=both`` ran);
- transfer entropy against the measured whole-block responses: Spearman rank correlation per kind, and the
  blocks the two rank most differently.

Writes ``RESULTS/tell-response-<model>.json`` (every run, raw) and ``.md``.

    PYTHONPATH=src python benchmarks/tell_response.py --model smollm2-135m --variants on,both,stages2
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {  # name -> TellConfig fields
    "on": dict(compensation="on"),
    "off": dict(compensation="off"),
    "both": dict(compensation="both"),
    "stages2": dict(compensation="on", stages=2),
    "stages3": dict(compensation="on", stages=3),
    "fine": dict(compensation="on", levels="0.125,0.25,0.375,0.5,0.625,0.75,0.875"),
    "uniform": dict(assign="uniform"),
}


def spearman(a, b) -> float:
    import torch

    ra = torch.tensor(a, dtype=torch.float64).argsort().argsort().double()
    rb = torch.tensor(b, dtype=torch.float64).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-rows", type=int, default=16)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--speedups", default="1.15,1.3,1.5")
    p.add_argument("--ratios", default="", help="also run at these parameter ratios")
    p.add_argument("--variants", default="on", help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--latency-reps", type=int, default=3)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="precision of the responses")
    p.add_argument("--te", action="store_true", help="compare with the transfer-entropy signal")
    p.add_argument("--work", default=str(ROOT / "runs" / "tell-response"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)

    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from secateurs.data import calib_rows, eval_rows
    from secateurs.eval.perplexity import perplexity
    from secateurs.methods import PruneContext
    from secateurs.methods.tell import TellConfig, tell
    from secateurs.models import get_adapter, load_model
    from secateurs.surgery import apply_plan

    work = Path(a.work) / a.model
    work.mkdir(parents=True, exist_ok=True)
    Path(a.results).mkdir(parents=True, exist_ok=True)
    out_json = Path(a.results) / f"tell-response-{a.model}.json"
    runs = json.loads(out_json.read_text())["runs"] if out_json.exists() else []
    model, tok = load_model(a.model, progress=False)
    ad = get_adapter(model)
    spec = ad.spec()
    calib = calib_rows(tok, model, "wiki", a.nsamples, a.seqlen, a.seed)
    test = eval_rows(tok, model, "wiki:test", a.eval_seqlen, a.eval_rows)
    dense_ppl = perplexity(model, test, progress=False).ppl
    print(f"tell_response: {a.model} dense wiki:test ppl {dense_ppl:.2f}", flush=True)
    settings = {k: getattr(a, k) for k in ("model", "nsamples", "seqlen", "seed", "eval_rows", "eval_seqlen", "latency_reps", "dtype")}

    def save():
        out_json.write_text(json.dumps({"settings": settings, "dense_ppl": dense_ppl, "runs": runs,
                                        "command": "PYTHONPATH=src python benchmarks/tell_response.py " + " ".join(sys.argv[1:])},
                                       indent=1))

    budgets = [("speedup", float(s)) for s in a.speedups.split(",") if s] + [("ratio", float(r)) for r in a.ratios.split(",") if r]
    for name in a.variants.split(","):
        for flag, value in budgets:
            if any(r["variant"] == name and r["budget"] == [flag, value] for r in runs):
                continue
            cfg = TellConfig(**VARIANTS[name], latency_reps=a.latency_reps, dtype=a.dtype,
                             **({"speedup": value} if flag == "speedup" else {}))
            folder = work / f"{name}-{flag}{value:g}"
            folder.mkdir(parents=True, exist_ok=True)
            ctx = PruneContext(model, tok, ad, spec, calib, value if flag == "ratio" else None, a.seed, folder, progress=True)
            t0 = time.time()
            plan = tell(ctx, cfg)
            seconds = time.time() - t0
            pruned = apply_plan(copy.deepcopy(model), plan, spec)
            ppl = perplexity(pruned, test, progress=False).ppl
            del pruned
            d = ctx.extra
            rounds = d["speedup_rounds"]
            run = {"variant": name, "budget": [flag, value], "config": VARIANTS[name], "ratio": plan.ratio(spec),
                   "ppl": ppl, "measured_speedup": rounds[-1]["speedup"] if rounds else None,
                   "predicted_speedup": d["predicted_speedup"], "seconds": seconds,
                   "evaluations": (d.get("allocation") or {}).get("evaluations"),
                   "evaluations_measured": (d.get("allocation") or {}).get("evaluations_measured"),
                   "removed": [b["block"] for b in d["blocks"] if b["action"] == "removed"],
                   "options": {b["block"]: b.get("option") for b in d["blocks"]}, "rounds": rounds,
                   "allocation": d.get("allocation")}
            runs.append(run)
            save()
            print(f"tell_response: {name} {flag} {value}: ratio {run['ratio']:.3f}, ppl {ppl:.2f}, "
                  f"speedup {run['measured_speedup']}, {seconds:.0f}s", flush=True)
    save()
    te = None
    if a.te:
        from secateurs.methods.tell import calibrate

        cfg = TellConfig(te=True)
        ctx = PruneContext(model, tok, ad, spec, calib, 0.1, a.seed, work, progress=True)
        te, _ = calibrate(ctx, cfg)
    write_md(a, runs, dense_ppl, te, spec, Path(a.results) / f"tell-response-{a.model}.md")
    return 0


def write_md(a, runs, dense_ppl, te, spec, path: Path) -> None:
    from secateurs.models.base import all_blocks

    lines = [f"# tell with measured responses: {a.model}", "",
             f"Command: `PYTHONPATH=src python benchmarks/tell_response.py {' '.join(sys.argv[1:])}`", "",
             f"Calibration `wiki` {a.nsamples} x {a.seqlen}, seed {a.seed}; `wiki:test` {a.eval_rows} x {a.eval_seqlen} "
             f"(dense {dense_ppl:.2f}); responses in {a.dtype}; speedup: CPU clock, one thread, prefill 256 tokens, "
             f"{a.latency_reps} pairs.", "",
             "| variant | budget | ratio | ppl | measured speedup | predicted | responses (measured) | s | removed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        sp = "-" if r["measured_speedup"] is None else f"{r['measured_speedup']:.3f}"
        pr = "-" if r["predicted_speedup"] is None else f"{r['predicted_speedup']:.3f}"
        lines.append(f"| {r['variant']} | {r['budget'][0]} {r['budget'][1]:g} | {r['ratio']:.3f} | {r['ppl']:.2f} | {sp} | "
                     f"{pr} | {r['evaluations']} ({r['evaluations_measured']}) | {r['seconds']:.0f} | {', '.join(r['removed'])} |")
    first = next((r for r in runs if r.get("allocation")), None)
    if first:
        st = first["allocation"]["stages"][0]["blocks"]
        both = next((r for r in runs if r["config"].get("compensation") == "both" and r.get("allocation")), None)
        if both:
            lines += ["", "## Bias compensation per option (loss increase, nats/token, one block changed, dense model)", "",
                      "| option | with | without | compensation better in |", "|---|---|---|---|"]
            sb = both["allocation"]["stages"][0]["blocks"]
            for kind in ("attn", "mlp"):
                labels = sorted({o["option"] for b in sb.values() for o in b["options"]
                                 if not o["option"].endswith("no-bias") and o["option"] not in ("keep", "remove")}
                                & {o["option"] for name, b in sb.items() if name.startswith(kind) for o in b["options"]})
                for lab in labels:
                    w, wo = [], []
                    for name, b in sb.items():
                        if not name.startswith(kind):
                            continue
                        opts = {o["option"]: o["dloss"] for o in b["options"]}
                        if lab in opts and lab + " no-bias" in opts:
                            w.append(opts[lab])
                            wo.append(opts[lab + " no-bias"])
                    if w:
                        better = sum(x < y for x, y in zip(w, wo))
                        lines.append(f"| {lab} | {sum(w) / len(w):.4f} | {sum(wo) / len(wo):.4f} | {better} of {len(w)} blocks |")
        if te is not None:
            whole = {name: next(o["dloss"] for o in b["options"] if o["option"] == "remove") for name, b in st.items()}
            lines += ["", "## Transfer entropy against the measured responses", ""]
            for kind in ("attn", "mlp"):
                names = [b.name for b in all_blocks(spec.n_layers) if b.kind == kind]
                idx = [i for i, b in enumerate(all_blocks(spec.n_layers)) if b.kind == kind]
                rho = spearman([te[i] for i in idx], [whole[n] for n in names])
                lines.append(f"- {kind}: Spearman rank correlation of TE with the loss increase of removing the block "
                             f"whole: {rho:+.3f} ({len(names)} blocks)")
            lines += ["", "| block | TE (nats) | remove: loss increase (nats/token) |", "|---|---|---|"]
            for i, b in enumerate(all_blocks(spec.n_layers)):
                lines.append(f"| {b.name} | {te[i]:.3f} | {whole[b.name]:.4f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
