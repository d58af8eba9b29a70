"""tell's assignment on a small calibration against flap, at equal ratio: one ``secateurs prune`` per (method
variant, calibration size, seed), all measured on the same held-out rows. Perplexity only (no timing), so load
does not change the figures; search seconds are wall time and do.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/tell_small_calibration.py \\
        --shapes 4x128,4x256 --seeds 0,1,2 --variants flap,tell,tell-kl --work runs/tell-small \\
        --name tell-small-calibration-smollm2-135m-table --results benchmarks/results

Each run is a folder ``WORK/VARIANT-RxL-sSEED``; a folder with a ``result.json`` is taken as measured (resume:
the same command line goes on where it stopped). The table and its JSON (every run's settings and figures) are
written after every run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # name: the method's options
    "flap": ["--method", "flap"],
    "shortgpt": ["--method", "shortgpt"],
    "tell": ["--method", "tell", "--response-loss", "nll"],  # nll: the default until auto (kl where it fits)
    "tell-kl": ["--method", "tell", "--response-loss", "kl"],
    "tell-refine": ["--method", "tell", "--response-loss", "nll", "--refine", "20"],
    "tell-kl-refine": ["--method", "tell", "--response-loss", "kl", "--refine", "20"],
    "tell-kl-top256": ["--method", "tell", "--response-loss", "kl", "--kl-top", "256"],
    "tell-kl-top4096": ["--method", "tell", "--response-loss", "kl", "--kl-top", "4096"],
}


def folder_name(variant: str, rows: int, seqlen: int, seed: int) -> str:
    return f"{variant}-{rows}x{seqlen}-s{seed}"


def command(a, variant: str, rows: int, seqlen: int, seed: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "secateurs", "prune", a.model, *VARIANTS[variant], "--ratio", str(a.ratio),
            "--nsamples", str(rows), "--seqlen", str(seqlen), "--seed", str(seed), "--eval", a.eval_set,
            "--eval-rows", str(a.eval_rows), "--eval-seqlen", str(a.eval_seqlen), "--device", "cpu", "--quiet",
            "--dtype", a.dtype, *(["--workers", str(a.workers)] if a.workers and variant.startswith("tell") else []),
            "--out", str(out)]


def row(variant: str, rows: int, seqlen: int, seed: int, result: dict) -> dict:
    return {"variant": variant, "rows": rows, "seqlen": seqlen, "seed": seed, "ratio": result["ratio_achieved"],
            "calib_before": result["ppl_calib_before"], "calib_after": result["ppl_calib_after"],
            "test_before": result["ppl_test_before"], "test_after": result["ppl_test_after"],
            "search_s": result["search_seconds"], "settings": result["settings"]}


def table(runs: list[dict], variants: list[str]) -> str:
    """One line per (calibration, seed), one column per variant: held-out perplexity (best in bold)."""
    keys = sorted({(r["rows"], r["seqlen"], r["seed"]) for r in runs})
    by = {(r["rows"], r["seqlen"], r["seed"], r["variant"]): r for r in runs}
    lines = ["| calibration | seed | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for rows, seqlen, seed in keys:
        got = {v: by[(rows, seqlen, seed, v)]["test_after"] for v in variants if (rows, seqlen, seed, v) in by}
        best = min(got.values()) if got else None
        cells = [("-" if v not in got else (f"**{got[v]:.2f}**" if got[v] == best else f"{got[v]:.2f}"))
                 for v in variants]
        lines.append(f"| {rows} x {seqlen} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(a, runs: list[dict], variants: list[str], load: list) -> None:
    stem = Path(a.results) / a.name
    stem.parent.mkdir(parents=True, exist_ok=True)
    settings = dict(vars(a))
    Path(f"{stem}.json").write_text(json.dumps({"command": " ".join(sys.argv), "settings": settings,
                                                "load": load, "runs": runs}, indent=1))
    dense = runs[0]["test_before"] if runs else float("nan")
    text = (f"# tell on a small calibration: {a.model} at ratio {a.ratio}\n\n"
            f"Command: `{' '.join(['python', *sys.argv])}`\n\n"
            f"Held-out perplexity: `{a.eval_set}`, the first {a.eval_rows} rows of {a.eval_seqlen} tokens (dense "
            f"{dense:.2f}); calibration `wiki`, rows x tokens and seed as in the table. Variants: "
            + "; ".join(f"{v}: `{' '.join(VARIANTS[v])}`" for v in variants) + ".\n\n"
            + table(runs, variants) + "\n\nEvery run (calibration perplexity dense -> pruned, search seconds):\n\n"
            + "\n".join(f"- {folder_name(r['variant'], r['rows'], r['seqlen'], r['seed'])}: ratio {r['ratio']:.4f}, "
                        f"calib {r['calib_before']:.2f} -> {r['calib_after']:.2f}, held-out {r['test_after']:.2f}, "
                        f"search {r['search_s']:.0f} s" for r in runs)
            + "\n\nSearch seconds are wall time under the machine's load (perplexities do not depend on it): the load "
            "average at the start of each run this command ran: "
            + (", ".join(f"{n} {x:.1f}" for n, x in load) or "none (every run was taken from an earlier one)") + ".\n")
    Path(f"{stem}.md").write_text(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--shapes", default="4x128,4x256", help="calibration sizes ROWSxTOKENS, comma-separated")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default="flap,tell,tell-kl", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--dtype", default="auto", help="prune's --dtype (bfloat16 halves a 1.5B model's memory)")
    p.add_argument("--workers", type=int, default=0, help="prune's --workers for the tell variants (0: one process)")
    p.add_argument("--eval-set", default="wiki:test")
    p.add_argument("--eval-rows", type=int, default=16)
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--work", default=str(ROOT / "runs" / "tell-small"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="tell-small-calibration-table")
    a = p.parse_args()
    variants = a.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    try:
        shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
        seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        p.error("--shapes takes ROWSxTOKENS items (e.g. 4x128,4x256) and --seeds integers")
    runs, load = [], []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for rows, seqlen in shapes:
        for seed in seeds:
            for v in variants:
                out = Path(a.work) / folder_name(v, rows, seqlen, seed)
                if not (out / "result.json").exists():
                    print(f"{out.name}: running", flush=True)
                    load.append((out.name, os.getloadavg()[0]))
                    t0 = time.time()
                    r = subprocess.run(command(a, v, rows, seqlen, seed, out), env=env, capture_output=True, text=True)
                    if r.returncode != 0:
                        print(f"{out.name}: failed (exit {r.returncode})\n{r.stderr[-2000:]}", flush=True)
                        continue
                    print(f"{out.name}: done in {time.time() - t0:.0f} s", flush=True)
                result = json.loads((out / "result.json").read_text())
                want = {"model": a.model, "ratio": a.ratio, "nsamples": rows, "seqlen": seqlen, "seed": seed,
                        "eval": a.eval_set, "eval_rows": a.eval_rows, "eval_seqlen": a.eval_seqlen}
                other = {k: result["settings"].get(k) for k in want if result["settings"].get(k) != want[k]}
                if other:
                    sys.exit(f"{out}: made with other settings ({other}); remove it or use another --work")
                runs.append(row(v, rows, seqlen, seed, result))
                write(a, runs, variants, load)


if __name__ == "__main__":
    main()
