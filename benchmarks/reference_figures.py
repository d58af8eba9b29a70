"""The figures the README quotes outside the benchmark tables, each measured here with its settings.

    PYTHONPATH=src python benchmarks/reference_figures.py                      # all figures
    PYTHONPATH=src python benchmarks/reference_figures.py --figures dense,layer28
    PYTHONPATH=src python benchmarks/reference_figures.py --figures demo

Figures:
- ``dense``: perplexity of the dense SmolLM2-135M (a) in the reference setting of the offline-assets notes (all
  2,938 Wikipedia paragraphs joined in their stored order, the first 8 rows of 512 tokens; the notes give 20.4),
  and (b) as ``secateurs eval smollm2-135m`` measures it by default (wiki:test, the first 16 rows of 512);
- ``layer28``: the same (b) perplexity with only layer 28 removed (both blocks: the first layer uniform-drop
  removes); ``secateurs apply`` with the plan recorded in the JSON gives the same number;
- ``demo``: ``make demo`` from scratch (its folder is deleted first), the output recorded as printed.

Writes ``benchmarks/results/reference-smollm2-135m.{json,md}`` (dense, layer28) and
``benchmarks/results/demo-smollm2-135m.{json,md}`` (demo). Each file records its settings, versions, the
wall time and the load average (the machine may be shared: perplexity is not affected by load, timings are).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m"
LAYER = 28


def _load():
    return [round(x, 2) for x in os.getloadavg()]


def _md_header(title: str, command: str, data: dict) -> list[str]:
    return [f"# {title}", "", f"Command: `{command}`", "",
            f"Measured {data['when']}, CPU, float32, {data['threads']} thread(s); load average before / after: "
            f"{data['load_before']} / {data['load_after']} (2-core machine, shared with other jobs when above 1). "
            f"Versions: {data['versions']}.", ""]


def reference(figures: list[str]) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from secateurs.data import _wiki_paragraphs, eval_rows, needs_bos, tokenize_rows
    from secateurs.eval.perplexity import HELD_OUT_ROWS, HELD_OUT_SEQLEN, perplexity
    from secateurs.models import get_adapter
    from secateurs.sources import load_model
    from secateurs.result import versions
    from secateurs.plan import PruningPlan
    from secateurs.surgery import apply_plan

    t0, load_before = time.time(), _load()
    model, tok = load_model(MODEL, progress=False)
    spec = get_adapter(model).spec()
    test = eval_rows(tok, model, "wiki:test", HELD_OUT_SEQLEN, HELD_OUT_ROWS)
    data = {"model": MODEL, "figures": {}}
    if "dense" in figures:
        ref_rows = tokenize_rows(tok, list(_wiki_paragraphs()), 512, needs_bos(model))[:8]
        data["figures"]["dense_reference_setting"] = {
            "setting": "all 2,938 wiki paragraphs joined in stored order (calib and test), first 8 rows of 512",
            "reference_value": 20.4, **perplexity(model, ref_rows).as_dict()}
        data["figures"]["dense_eval_default"] = {
            "setting": f"wiki:test, first {HELD_OUT_ROWS} rows of {HELD_OUT_SEQLEN} (`secateurs eval {MODEL}`)",
            **perplexity(model, test).as_dict()}
    if "layer28" in figures:
        plan = PruningPlan.from_removed_blocks(spec, [(LAYER, "attn"), (LAYER, "mlp")], "hand-made")
        dense = perplexity(model, test).as_dict()
        pruned = apply_plan(copy.deepcopy(model), plan, spec)
        data["figures"]["drop_layer_28"] = {
            "setting": f"layer {LAYER} of {spec.n_layers} removed (attention and MLP); wiki:test, first "
                       f"{HELD_OUT_ROWS} rows of {HELD_OUT_SEQLEN}",
            "ratio": plan.ratio(spec), "dense": dense, "pruned": perplexity(pruned, test).as_dict(),
            "plan": plan.to_dict()}
    data.update(when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), threads=torch.get_num_threads(),
                seconds=round(time.time() - t0, 1), load_before=load_before, load_after=_load(), versions=versions())
    path = RESULTS / "reference-smollm2-135m.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    data["figures"] = {**old.get("figures", {}), **data["figures"]}  # a partial run keeps the other figures
    path.write_text(json.dumps(data, indent=1) + "\n")
    f = data["figures"]
    md = _md_header("Reference figures on SmolLM2-135M", "PYTHONPATH=src python benchmarks/reference_figures.py "
                    "--figures dense,layer28", data)
    if "dense_reference_setting" in f:
        a, b = f["dense_reference_setting"], f["dense_eval_default"]
        md += ["## Dense perplexity", "",
               f"- {a['setting']}: **{a['ppl']:.2f}** (the offline-assets notes give {a['reference_value']}).",
               f"- {b['setting']}: **{b['ppl']:.2f}**.", ""]
    if "drop_layer_28" in f:
        d = f["drop_layer_28"]
        plan_file = "reference-layer28-plan.json"
        (RESULTS / plan_file).write_text(json.dumps(d["plan"], indent=1) + "\n")
        md += [f"## Dropping only layer {LAYER}", "",
               f"{d['setting']}: perplexity **{d['dense']['ppl']:.2f} -> {d['pruned']['ppl']:.2f}** (ratio "
               f"{d['ratio']:.4f}). The same through the CLI: `secateurs apply benchmarks/results/{plan_file} "
               f"{MODEL} --out runs/drop-layer-{LAYER}`.", ""]
    (RESULTS / "reference-smollm2-135m.md").write_text("\n".join(md))
    print(f"wrote {path} and its .md", flush=True)


def demo() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from secateurs.demo import CHOICE, out_folder
    from secateurs.result import versions

    folder = ROOT / out_folder(CHOICE["method"], CHOICE["ratio"])
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(folder.with_name(folder.name + ".partial"), ignore_errors=True)
    t0, load_before = time.time(), _load()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "secateurs.demo"], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # CPU time: what the demo costs on a quiet machine
    sys.stdout.write(r.stdout)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-3000:])
        raise SystemExit(f"make demo failed with exit code {r.returncode}")
    data = {"command": "make demo (python -m secateurs.demo), from scratch", "stdout": r.stdout,
            "seconds": round(seconds, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "result": json.loads((folder / "result.json").read_text()),
            "bench": json.loads((folder / "bench.json").read_text()),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": os.environ.get("OMP_NUM_THREADS", "all"),
            "load_before": load_before, "load_after": _load(), "versions": versions()}
    (RESULTS / "demo-smollm2-135m.json").write_text(json.dumps(data, indent=1) + "\n")
    md = _md_header("`make demo` output", "PYTHONPATH=src python benchmarks/reference_figures.py --figures demo", data)
    md += [f"The demo ran from scratch in {seconds / 60:.1f} min of wall time ({data['cpu_seconds'] / 60:.1f} min of CPU "
           "time: about its wall time on a quiet machine at one thread) and printed:", "", "```", r.stdout.rstrip(), "```", ""]
    (RESULTS / "demo-smollm2-135m.md").write_text("\n".join(md))
    print(f"wrote {RESULTS / 'demo-smollm2-135m.json'} and its .md", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--figures", default="dense,layer28,demo", help="comma-separated: dense, layer28, demo")
    a = p.parse_args(argv)
    figures = [f.strip() for f in a.figures.split(",") if f.strip()]
    unknown = set(figures) - {"dense", "layer28", "demo"}
    if unknown:
        p.error(f"unknown figure(s) {', '.join(sorted(unknown))}")
    if {"dense", "layer28"} & set(figures):
        reference(figures)
    if "demo" in figures:
        demo()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
