"""How much of the dense model's next-token distribution tell's ``--kl-top K`` leaves out.

``--response-loss kl`` with ``--kl-top K`` (and auto, which keeps ``KL_TOP_AUTO`` tokens where the whole
vocabulary does not fit) keeps each dense distribution's K most probable tokens and merges the rest into one
bucket. Its responses are exact where the rest holds no mass. This script measures that mass on the calibration
rows a tell run draws (``--calib``, ``--nsamples``, ``--seqlen``, ``--seed``): one forward pass of the dense
model, float64 softmax, per position the probability outside the top K, for every K asked.

Writes ``RESULTS/kl-top-mass-<model>.json`` and ``.md`` (settings included).

    PYTHONPATH=src python benchmarks/kl_top_mass.py --model smollm2-135m --nsamples 4 --seqlen 128
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default="wiki")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tops", default="64,256,1024,4096")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from secateurs.data import calib_rows
    from secateurs.sources import load_model

    tops = [int(k) for k in a.tops.split(",") if k]
    t0 = time.time()
    model, tok = load_model(a.model, dtype=a.dtype, progress=False)
    rows = calib_rows(tok, model, a.calib, a.nsamples, a.seqlen, a.seed)
    out = {k: [] for k in tops}
    with torch.inference_mode():
        for r in rows:  # one row at a time: the float64 distributions of a row at a time
            logits = model(input_ids=r[None], use_cache=False).logits[0, :-1].double()
            prob = torch.softmax(logits, -1)
            for k in tops:
                out[k].append(1 - prob.topk(min(k, prob.shape[-1]), -1).values.sum(-1))
    vocab = int(prob.shape[-1])
    stats = {}
    for k, parts in out.items():
        rest = torch.cat(parts).clamp_min(0)
        stats[k] = {"mean": float(rest.mean()), "median": float(rest.median()),
                    "p99": float(rest.quantile(0.99)), "max": float(rest.max()),
                    "share_of_vocab": min(k, vocab) / vocab}
    settings = {**vars(a), "vocab": vocab, "positions": int(rows.shape[0] * (rows.shape[1] - 1)),
                "seconds": round(time.time() - t0, 1), "dtype_used": str(next(model.parameters()).dtype)}
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    stem = res / f"kl-top-mass-{a.model}"
    Path(f"{stem}.json").write_text(json.dumps({"settings": settings, "rest_mass": stats}, indent=1))
    lines = [f"# Dense next-token mass outside the top K tokens: {a.model}", "",
             f"Command: `python benchmarks/kl_top_mass.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"Calibration `{a.calib}`, {a.nsamples} x {a.seqlen} tokens, seed {a.seed} ({settings['positions']} "
             f"positions), {settings['dtype_used']}, vocabulary {vocab:,}. Per position: 1 - the probability of the "
             "K most probable tokens (float64 softmax of the dense logits).", "",
             "| K | share of vocabulary | mean | median | p99 | max |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {s['share_of_vocab']:.2%} | {s['mean']:.2e} | {s['median']:.2e} | {s['p99']:.2e} | {s['max']:.2e} |"
              for k, s in stats.items()]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
