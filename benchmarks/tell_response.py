"""tell's measured-response assignment, studied: variants at equal speed budgets, bias compensation per option,
re-measurement stages, and the transfer-entropy signal against the measured responses.

One model, one calibration (the trade-off's: ``wiki``, seed 0), one response cache (``cache_dir()/tell``): every
variant reuses the responses measured before it. For each variant and each ``--speedups`` budget the method
runs in-process (``secateurs.prune``, as ``secateurs prune`` runs it, its measured-speedup rounds included),
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

R = dict(assign="response", response_loss="nll")  # the results files were made with nll (the default then)
VARIANTS = {  # name -> TellConfig fields
    "on": dict(**R, compensation="on"),
    "off": dict(**R, compensation="off"),
    "both": dict(**R, compensation="both"),
    "stages2": dict(**R, compensation="on", stages=2),
    "stages3": dict(**R, compensation="on", stages=3),
    "fine": dict(**R, compensation="on", levels="0.125,0.25,0.375,0.5,0.625,0.75,0.875"),
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
    p.add_argument("--compensation-layers", default="", help="measure every width option of these layers (comma-"
                   "separated, or every:K for every K-th layer) with and without bias compensation")
    p.add_argument("--work", default=str(ROOT / "runs" / "tell-response"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--render", metavar="JSON", help="only write the page of a results JSON (next to it, .md)")
    p.add_argument("--note", default="", help="with --render: a paragraph for the page (what else was running, ...)")
    a = p.parse_args(argv)

    sys.path.insert(0, str(ROOT / "src"))
    if a.render:
        path = Path(a.render)
        write_md(json.loads(path.read_text()), path.with_suffix(".md"), a.note)
        return 0
    import torch

    from secateurs.data import calib_rows, eval_rows
    from secateurs.eval.perplexity import perplexity
    import secateurs
    from secateurs.methods import PruneContext
    from secateurs.methods.tell import TellConfig
    from secateurs.models import get_adapter
    from secateurs.sources import load_model
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
            cfg = TellConfig(**VARIANTS[name], latency_reps=a.latency_reps, response_dtype=a.dtype,
                             **({"speedup": value} if flag == "speedup" else {}))
            folder = work / f"{name}-{flag}{value:g}"
            folder.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            plan = secateurs.prune(model, tok, cfg, ratio=value if flag == "ratio" else None, calib=calib, seed=a.seed,
                                   workdir=folder)
            seconds = time.time() - t0
            pruned = apply_plan(copy.deepcopy(model), plan, spec)
            ppl = perplexity(pruned, test, progress=False).ppl
            del pruned
            d = plan.record["method_details"]
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
    comp = compensation_check(a, model, tok, ad, spec, calib, work) if a.compensation_layers else None
    te = None
    if a.te:
        from secateurs.methods.tell import calibrate

        cfg = TellConfig(te=True)
        ctx = PruneContext.build(model, calib, tokenizer=tok, ratio=0.1, seed=a.seed, workdir=work)
        te, _ = calibrate(ctx, cfg)
    if comp is not None or te is not None:
        out_json.write_text(json.dumps({**json.loads(out_json.read_text()), "compensation": comp, "te": te}, indent=1))
    write_md(json.loads(out_json.read_text()), Path(a.results) / f"tell-response-{a.model}.md")
    return 0


def compensation_check(a, model, tok, ad, spec, calib, work) -> list[dict]:
    """Every width option of the chosen layers, with and without compensation, one block changed on the dense
    model (the responses come from / go to the same cache as the runs')."""
    from secateurs.methods import PruneContext
    from secateurs.methods.tell import ResponseStore, TellConfig, option_plan, width_scores
    from secateurs.importance.width import collect_stats
    from secateurs.models.base import Block
    from secateurs.plan import PruningPlan
    from secateurs.search.allocate import Option, set_block

    if a.compensation_layers.startswith("every:"):
        layers = list(range(0, spec.n_layers, int(a.compensation_layers[6:])))
    else:
        layers = [int(x) for x in a.compensation_layers.split(",")]
    cfg = TellConfig(**R, response_dtype=a.dtype)
    ctx = PruneContext.build(model, calib, tokenizer=tok, ratio=0.1, seed=a.seed, workdir=work)
    ws = width_scores(ctx, collect_stats(model, ad, calib))
    levels = cfg.level_list()
    dense = PruningPlan.dense(spec)
    variants, labels = {}, {}
    for layer in layers:
        for kind in ("attn", "mlp"):
            pos = Block(layer, kind).pos
            variants[pos], labels[pos] = [], []
            for level in levels:
                for comp in (True, False):
                    o = Option(level, comp)
                    variants[pos].append(set_block(dense.layers[layer], kind, option_plan(ctx, ws, layer, kind, o)))
                    labels[pos].append(o.label(kind))
    base_loss, losses = ResponseStore(ctx, cfg)(dense, variants, 0)
    tokens = calib.shape[0] * (calib.shape[1] - 1)
    return [{"block": Block.at(pos).name, "option": lab, "dloss": (loss - base_loss) / tokens}
            for pos in variants for lab, loss in zip(labels[pos], losses[pos])]


def write_md(data: dict, path: Path, note: str = "") -> None:
    """The page of a results JSON (``data``: settings, dense perplexity, runs, command, and the optional
    compensation and transfer-entropy comparisons)."""
    from secateurs.models.base import all_blocks

    st, runs, dense_ppl = data["settings"], data["runs"], data["dense_ppl"]
    te, comp = data.get("te"), data.get("compensation")
    lines = [f"# tell with measured responses: {st['model']}", "",
             f"Command: `{data['command']}`", "",
             f"Calibration `wiki` {st['nsamples']} x {st['seqlen']}, seed {st['seed']}; `wiki:test` {st['eval_rows']} x "
             f"{st['eval_seqlen']} (dense {dense_ppl:.2f}); responses in {st['dtype']}; speedup: tell's own check "
             f"(pruned copy against the dense model, CPU clock, one thread, prefill of 256 random tokens, "
             f"{st['latency_reps']} pairs; the last round's).", ""]
    if note:
        lines += [note, ""]
    lines += ["| variant | budget | ratio | ppl | measured speedup | predicted | responses (measured) | s | removed |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        sp = "-" if r["measured_speedup"] is None else f"{r['measured_speedup']:.3f}"
        pr = "-" if r["predicted_speedup"] is None else f"{r['predicted_speedup']:.3f}"
        lines.append(f"| {r['variant']} | {r['budget'][0]} {r['budget'][1]:g} | {r['ratio']:.3f} | {r['ppl']:.2f} | {sp} | "
                     f"{pr} | {r['evaluations']} ({r['evaluations_measured']}) | {r['seconds']:.0f} | "
                     f"{', '.join(r['removed']) or 'none'} |")
    for r in runs:
        if r.get("rounds"):
            lines += ["", f"Speedup rounds of {r['variant']}, {r['budget'][0]} {r['budget'][1]:g} (cost-model goal -> "
                          "predicted, measured; dense / pruned ms):", ""]
            lines += [f"- goal {x['cost_model_goal']:.3f} -> predicted {x['predicted']:.3f}, measured {x['speedup']:.3f} "
                      f"({x['dense_ms']:.0f} / {x['pruned_ms']:.0f} ms)" for x in r["rounds"]]
        alloc = r.get("allocation")
        if alloc:
            last = alloc["stages"][-1]
            lines += ["", f"Per block, {r['variant']}, {r['budget'][0]} {r['budget'][1]:g}: the options measured on the "
                          f"dense model (loss increase in nats/token @ saving in {alloc['saving_unit']}), the knapsack's "
                          f"choice and why (price at the margin {last.get('price') or 0:.3g} nats/token per "
                          f"{alloc['saving_unit']}):", "",
                      "| block | remove whole | chosen | saving | loss increase | why |", "|---|---|---|---|---|---|"]
            for name, b in last["blocks"].items():
                opt = next(o for o in b["options"] if o["option"] == b["chosen"])
                whole = next((o["dloss"] for o in b["options"] if o["option"] == "remove"), None)
                lines.append(f"| {name} | {'-' if whole is None else f'{whole:+.4f}'} | {b['chosen']} | "
                             f"{opt['saving']:.2f} | {opt['dloss']:+.4f} | {b.get('why') or ''} |")
    if comp:
        lines += ["", "## Bias compensation per option", "",
                  "Loss increase (nats/token) of one block changed on the dense model, with and without FLAP's bias "
                  "compensation:", "",
                  "| option | mean with | mean without | compensation better in |", "|---|---|---|---|"]
        by = {}
        for r in comp:
            by.setdefault((r["option"].replace(" no-bias", ""), r["block"]), {})[r["option"].endswith("no-bias")] = r["dloss"]
        for lab in dict.fromkeys(k[0] for k in by):
            pairs = [v for (l2, _), v in by.items() if l2 == lab]
            w, wo = [p[False] for p in pairs], [p[True] for p in pairs]
            lines.append(f"| {lab} | {sum(w) / len(w):+.4f} | {sum(wo) / len(wo):+.4f} | "
                         f"{sum(x < y for x, y in zip(w, wo))} of {len(w)} blocks |")
    first = next((r for r in runs if r.get("allocation")), None)
    if first and te is not None:
        stage0 = first["allocation"]["stages"][0]["blocks"]
        n_layers = len(stage0) // 2
        whole = {name: next(o["dloss"] for o in b["options"] if o["option"] == "remove") for name, b in stage0.items()}
        lines += ["", "## Transfer entropy against the measured responses", ""]
        for kind in ("attn", "mlp"):
            names = [b.name for b in all_blocks(n_layers) if b.kind == kind]
            idx = [i for i, b in enumerate(all_blocks(n_layers)) if b.kind == kind]
            rho = spearman([te[i] for i in idx], [whole[n] for n in names])
            lines.append(f"- {kind}: Spearman rank correlation of TE with the loss increase of removing the block "
                         f"whole: {rho:+.3f} ({len(names)} blocks)")
        lines += ["", "| block | TE (nats) | remove: loss increase (nats/token) |", "|---|---|---|"]
        for i, b in enumerate(all_blocks(n_layers)):
            lines.append(f"| {b.name} | {te[i]:.3f} | {whole[b.name]:.4f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
