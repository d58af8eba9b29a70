"""`make demo`: prune the embedded SmolLM2-135M by about 25% with the best method available and show what it
cost: parameters, calibration and held-out perplexity, and prefill latency before and after.

The run is written to runs/demo-<method>/ (resumable; a finished run is reused: delete the folder to redo it).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

PREFERRED = ["blockpruner", "uniform-drop"]  # best first; the first registered one is used
# small calibration so that the full greedy search fits in minutes on a 2-core CPU
SETTINGS = dict(model="smollm2-135m", ratio=0.25, calib="wiki", nsamples=2, seqlen=64, seed=0,
                eval="wiki:test", eval_rows=16)


def main() -> int:
    from .errors import UserError
    from .eval.bench import prefill_ms
    from .methods import all_methods
    from .models import load_model
    from .pipeline import PruneSettings, run_prune

    method = next(m for m in PREFERRED if m in all_methods())
    out = Path("runs") / f"demo-{method}"
    print(f"secateurs demo: {SETTINGS['model']}, method {method}, target ratio {SETTINGS['ratio']}, "
          f"calibration {SETTINGS['nsamples']} rows x {SETTINGS['seqlen']} tokens of {SETTINGS['calib']}", flush=True)
    try:
        if (out / "result.json").exists():
            print(f"(reusing the finished run in {out}; delete it to recompute)")
            r = json.loads((out / "result.json").read_text())
        else:
            r = run_prune(PruneSettings(method=method, **SETTINGS), out)
            r.pop("_model"), r.pop("_tokenizer")
        dense, _ = load_model(SETTINGS["model"], progress=False)
        pruned, _ = load_model(str(out), progress=False)
    except UserError as e:
        print(f"secateurs: error: {e}", file=sys.stderr)
        return 2
    # prefill latency, dense and pruned alternating in this process, medians
    t_dense, t_pruned = [], []
    for _ in range(3):
        t_dense.append(prefill_ms(dense, 512, reps=3))
        t_pruned.append(prefill_ms(pruned, 512, reps=3))
    td, tp = sorted(t_dense)[1], sorted(t_pruned)[1]
    rows = [
        ("parameters", f"{r['params_before']:,}", f"{r['params_after']:,}"),
        (f"calibration ppl ({SETTINGS['calib']})", f"{r['ppl_calib_before']:.2f}", f"{r['ppl_calib_after']:.2f}"),
        (f"held-out ppl ({r['eval_set']}, {SETTINGS['eval_rows']} rows of {SETTINGS['seqlen']})",
         f"{r['ppl_test_before']:.2f}", f"{r['ppl_test_after']:.2f}"),
        ("prefill latency, 512 tokens, batch 1 (ms)", f"{td:.1f}", f"{tp:.1f}"),
    ]
    print(f"\nratio achieved {r['ratio_achieved']:.4f}; removed {', '.join(r['removed_blocks']) or 'nothing'}; "
          f"search {r['search_seconds']:.0f} s, {r['ppl_evaluations']} perplexity evaluations")
    w = max(len(x[0]) for x in rows)
    print(f"{'':<{w}}  {'dense':>14}  {'pruned':>14}")
    for name, a, b in rows:
        print(f"{name:<{w}}  {a:>14}  {b:>14}")
    print(f"prefill speedup: {td / tp:.2f}x (measured side by side on this machine)\nfolder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
