"""Quality against measured speed: every method at several ratios on one model, through the CLI.

For each method and ratio: ``secateurs prune`` (same calibration for all), ``secateurs eval`` (held-out
perplexity), then the prefill latency of the pruned model measured alternately with the dense model in this one
process (``secateurs.importance.cost.paired_latency``: one pass each, warm-up first, median of each side).
Writes ``RESULTS/tradeoff-<model>.md`` (table, the settings, and every method's perplexity at equal measured
speedups, ``--at``, interpolated along its own curve), ``RESULTS/tradeoff-<model>.png`` (perplexity
against measured speedup, one line per method) and ``RESULTS/tradeoff-<model>.json`` (the raw rows and settings;
``--render FILE.json`` redraws the table and plot from it).

Resumable: a run folder that already has ``result.json`` is not pruned again, one with ``eval.json`` not
evaluated again, one with ``latency.json`` not timed again (``--retime`` times all again, against the dense model
of this process). Methods that are not registered are skipped with a message. ``--resume-from FILE.json`` fills
the run folders from a results JSON of an earlier run with the same settings (its rows keep their own figures,
each speedup measured against the dense model of its own process; only the runs it lacks are measured), so a
committed partial result can be finished on a fresh machine; its hand-written notes are carried over.

A method may carry options: ``tell[assign=uniform]`` runs ``--method tell --assign uniform`` under its own name;
``as=LABEL`` names the line instead (``blockpruner[from-order=order.json,as=blockpruner]`` takes the plans from a
removal order searched elsewhere, e.g. on a GPU, with the same calibration); ``ratios=0.25;0.35`` runs that
method at these ratios only (a slow search, say).
``--speedups 1.2,1.4`` adds runs with ``--speedup S`` instead of ``--ratio`` for methods that accept it (tell).

    PYTHONPATH=src python benchmarks/tradeoff.py --model smollm2-135m --methods tell,uniform-drop
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_method(text: str) -> tuple[str, dict]:
    m = re.fullmatch(r"([\w.-]+)(?:\[(.*)\])?", text.strip())
    if not m:
        raise SystemExit(f"bad method spec {text!r}: expected NAME or NAME[opt=value,...]")
    opts = {}
    for kv in filter(None, (m.group(2) or "").split(",")):
        k, _, v = kv.partition("=")
        opts[k.strip().replace("_", "-")] = v.strip()
    return m.group(1), opts


def label(name: str, opts: dict) -> str:
    if "as" in opts:
        return opts["as"]
    return name + "".join(f"-{k}-{v}" for k, v in opts.items())


def cli(args: list[str], log_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "secateurs", *args]
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"command failed ({r.returncode}), see {log_path}: {' '.join(args)}")


def folders(a) -> tuple[Path, Path, Path]:
    """(run folders of the model, results folder, command log) of a benchmark run through the CLI, created:
    the convention this script shares with the other CLI-driven benchmarks (heal, gguf_speed)."""
    work = Path(a.work) / a.model
    work.mkdir(parents=True, exist_ok=True)
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    return work, results, work / "commands.log"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default="tell,blockpruner,shortgpt,wanda-sp,flap",
                   help="comma-separated; NAME[opt=value] passes options (default: %(default)s)")
    p.add_argument("--ratios", default="0.15,0.25,0.35")
    p.add_argument("--speedups", default="", help="extra runs with --speedup S (methods that accept it)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--calib", default="wiki")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-set", default="wiki:test")
    p.add_argument("--eval-rows", type=int, default=32)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--latency-len", type=int, default=256, help="prompt length of the latency measurement")
    p.add_argument("--latency-reps", type=int, default=7)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="cpu: this process's CPU time on one thread (robust on a shared CPU); wall: wall time")
    p.add_argument("--work", default=str(ROOT / "runs" / "tradeoff"), help="run folders (pruned models)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--retime", action="store_true", help="measure every latency again")
    p.add_argument("--drop-weights", action="store_true", help="delete a run's model.safetensors once measured")
    p.add_argument("--at", default="1.15,1.3,1.5", help="speedups at which every method's perplexity is read off its curve")
    p.add_argument("--name", default="", help="results file names without suffix (default tradeoff-MODEL)")
    p.add_argument("--resume-from", metavar="JSON", help="take the runs of a results JSON of an earlier run with "
                   "the same settings as measured, and measure only the others")
    p.add_argument("--render", metavar="JSON", help="redraw the table and plot from a results JSON this script wrote")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.render:
        data = json.loads(Path(a.render).read_text())
        a = argparse.Namespace(**{**vars(a), **data["settings"], "render": a.render})
        stem = Path(a.render).with_name(Path(a.render).stem)  # a dotted model name keeps its dots
        write_table(a, data["rows"], Path(f"{stem}.md"), data["command"], data.get("notes", ""))
        plot(data["rows"], Path(f"{stem}.png"), a)
        print(f"tradeoff: redrew {stem}.md and .png from {a.render}")
        return 0

    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from secateurs.importance.cost import paired_latency
    from secateurs.methods import all_methods
    from secateurs.sources import load_model

    registered = all_methods()
    stem = a.name or f"tradeoff-{a.model}"
    ratios = [float(r) for r in a.ratios.split(",") if r]
    speedups = [float(s) for s in a.speedups.split(",") if s]
    work, results, log_path = folders(a)
    notes = resume_from(a, work) if a.resume_from else ""

    runs = []  # (label, method, opts, budget flag, value)
    for spec in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", a.methods):
        name, opts = parse_method(spec)
        if name not in registered:
            print(f"tradeoff: skipping {name}: not registered here (available: {', '.join(registered)})", flush=True)
            continue
        own = [float(x) for x in opts.pop("ratios").split(";") if x] if "ratios" in opts else ratios
        for r in own:
            runs.append((label(name, opts), name, opts, "ratio", r))
        if speedups and any(f.name == "speedup" for f in __import__("dataclasses").fields(registered[name].config_cls)):
            for s in speedups:
                runs.append((label(name, opts), name, opts, "speedup", s))

    common = ["--calib", a.calib, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--seed", str(a.seed),
              "--eval", "", "--device", "cpu", "--quiet"]
    eval_args = ["--ppl", a.eval_set, "--seqlen", str(a.eval_seqlen), "--rows", str(a.eval_rows), "--device", "cpu", "--quiet"]

    def evaluate(folder: Path, model_arg: str):
        if not (folder / "eval.json").exists():
            cli(["eval", model_arg, *eval_args, "--json", str(folder / "eval.json")], log_path)
        return json.loads((folder / "eval.json").read_text())["ppl"][a.eval_set]["ppl"]

    t_start = time.time()
    dense_dir = work / "dense"
    dense_dir.mkdir(exist_ok=True)
    print(f"tradeoff: {a.model}: {len(runs)} runs; dense perplexity ...", flush=True)
    dense_ppl = evaluate(dense_dir, a.model)
    dense = None  # loaded at the first timing: a search before it (tell's workers) has the memory to itself
    rows = [{"method": "dense", "budget": "-", "ratio": 0.0, "ppl": dense_ppl, "speedup": 1.0, "dense_ms": None,
             "pruned_ms": None, "search_s": 0.0, "removed": ""}]
    for n, (lab, name, opts, flag, value) in enumerate(runs, 1):
        folder = work / f"{lab}-{flag}{value:g}"
        head = f"tradeoff: [{n}/{len(runs)}] {lab} --{flag} {value:g}"
        if not (folder / "result.json").exists():
            print(f"{head}: pruning ({time.time() - t_start:.0f}s elapsed)", flush=True)
            extra = [x for k, v in opts.items() if k != "as" for x in (f"--{k}", v)]
            cli(["prune", a.model, "--method", name, f"--{flag}", str(value), *common, *extra,
                 "--out", str(folder), "--overwrite"], log_path)
        result = json.loads((folder / "result.json").read_text())
        print(f"{head}: ratio {result['ratio_achieved']:.4f}; evaluating", flush=True)
        ppl = evaluate(folder, str(folder))
        lat_path = folder / "latency.json"
        if a.retime or not lat_path.exists():
            if not (folder / "model.safetensors").exists():
                raise SystemExit(f"{folder} has no weights left to time (was --drop-weights used?); prune it again")
            if dense is None:
                dense, _ = load_model(a.model, progress=False)
            pruned, _ = load_model(str(folder), progress=False)
            pairs = paired_latency(dense, pruned, a.latency_len, a.latency_reps, a.seed, a.clock)
            del pruned
            d, q = statistics.median(x for x, _ in pairs), statistics.median(y for _, y in pairs)
            lat_path.write_text(json.dumps({"dense_ms": d, "pruned_ms": q, "speedup": d / q, "pairs": pairs,
                                            "prompt_len": a.latency_len, "reps": a.latency_reps, "clock": a.clock,
                                            "threads": torch.get_num_threads()}, indent=1))
        lat = json.loads(lat_path.read_text())
        if a.drop_weights and (folder / "model.safetensors").exists():
            (folder / "model.safetensors").unlink()
        print(f"{head}: {a.eval_set} ppl {ppl:.2f}, prefill speedup {lat['speedup']:.3f}", flush=True)
        rows.append({"method": lab, "budget": f"{flag} {value:g}", "ratio": result["ratio_achieved"], "ppl": ppl,
                     "speedup": lat["speedup"], "dense_ms": lat["dense_ms"], "pruned_ms": lat["pruned_ms"],
                     "search_s": result["search_seconds"], "ppl_evaluations": result.get("ppl_evaluations"),
                     "removed": f"{len(result['removed_blocks'])} blocks", "removed_blocks": result["removed_blocks"],
                     "options": opts, "pairs": lat["pairs"], "folder": folder.name})
        write_table(a, rows, results / f"{stem}.md", notes=notes)  # after every run: partial results survive
        plot(rows, results / f"{stem}.png", a)
    print(f"tradeoff: wrote {results}/{stem}.md, .json and .png ({time.time() - t_start:.0f}s)", flush=True)
    return 0


# The settings a resumed run must share with the results it resumes: those that change a figure.
SAME = ("model", "nsamples", "seqlen", "calib", "seed", "eval_set", "eval_rows", "eval_seqlen", "latency_len",
        "latency_reps", "clock")


def resume_from(a, work: Path) -> str:
    """Write each measured row of ``a.resume_from`` into its run folder as the files a finished run leaves
    (``result.json``, ``eval.json``, ``latency.json``; ``dense/eval.json``), where the folder has none yet;
    returns the results' notes. A file of other settings is refused: its figures would not compare."""
    data = json.loads(Path(a.resume_from).read_text())
    theirs = data["settings"]
    differ = [f"{k} {theirs.get(k)!r} there, {getattr(a, k)!r} here" for k in SAME if theirs.get(k) != getattr(a, k)]
    if differ:
        raise SystemExit(f"tradeoff: --resume-from {a.resume_from}: other settings ({'; '.join(differ)})")
    for r in data["rows"]:
        folder = work / ("dense" if r["method"] == "dense" else r["folder"])
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "eval.json").exists():
            (folder / "eval.json").write_text(json.dumps({"ppl": {a.eval_set: {"ppl": r["ppl"]}},
                                                          "resumed_from": a.resume_from}, indent=1))
        if r["method"] == "dense":
            continue
        if not (folder / "result.json").exists():
            (folder / "result.json").write_text(json.dumps({
                "ratio_achieved": r["ratio"], "search_seconds": r["search_s"], "removed_blocks": r["removed_blocks"],
                "ppl_evaluations": r.get("ppl_evaluations"), "resumed_from": a.resume_from}, indent=1))
        if not (folder / "latency.json").exists():
            (folder / "latency.json").write_text(json.dumps({
                "dense_ms": r["dense_ms"], "pruned_ms": r["pruned_ms"], "speedup": r["speedup"], "pairs": r["pairs"],
                "resumed_from": a.resume_from}, indent=1))
    print(f"tradeoff: resumed {len(data['rows'])} rows from {a.resume_from}", flush=True)
    return data.get("notes", "")


def at_speedup(points: list[tuple[float, float]], s: float) -> float | None:
    """Perplexity at speedup ``s`` on a method's curve: linear in log perplexity between the two measured points
    that bracket ``s`` (nearest in speedup on each side); None when ``s`` is outside the measured range."""
    import math

    below = [p for p in points if p[0] <= s]
    above = [p for p in points if p[0] >= s]
    if not below or not above:
        return None
    (x0, y0), (x1, y1) = max(below), min(above)
    if x1 == x0:
        return min(y0, y1)
    t = (s - x0) / (x1 - x0)
    return math.exp((1 - t) * math.log(y0) + t * math.log(y1))


def equal_speed_table(a, rows) -> list[str]:
    targets = [float(x) for x in str(getattr(a, "at", "1.15,1.3,1.5")).split(",") if x]
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    lines = ["", "## At equal measured speedup", "",
             "Perplexity read off each method's curve (all its runs, sorted by measured speedup) at the speedup of the "
             "column: linear interpolation of log perplexity between the two runs that bracket it; '-' where the "
             "method's runs do not reach that far on either side. Best of each column in bold.", "",
             "| method | " + " | ".join(f"{t:g}x" for t in targets) + " |", "|---|" + "---|" * len(targets)]
    table = {m: [at_speedup([(r["speedup"], r["ppl"]) for r in rows[1:] if r["method"] == m], t) for t in targets]
             for m in methods}
    best = [min((v[i] for v in table.values() if v[i] is not None), default=None) for i in range(len(targets))]
    for m in methods:
        cells = []
        for i, v in enumerate(table[m]):
            cells.append("-" if v is None else (f"**{v:.1f}**" if v == best[i] else f"{v:.1f}"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def write_table(a, rows, path: Path, command: str | None = None, notes: str = "") -> None:
    """The markdown table, and beside it the raw rows and settings as JSON (``--render`` redraws from it);
    ``notes``: markdown kept under the table (and in the JSON)."""
    command = command or f"PYTHONPATH=src python benchmarks/tradeoff.py {' '.join(sys.argv[1:])}"
    settings = {k: v for k, v in vars(a).items() if k != "render"}
    path.with_suffix(".json").write_text(json.dumps({"command": command, "settings": settings, "rows": rows, "notes": notes}, indent=1) + "\n")
    lines = [
        f"# Perplexity against measured prefill speedup: {a.model}",
        "",
        f"Command: `{command}`",
        "",
        f"- Calibration: `{a.calib}`, {a.nsamples} rows of {a.seqlen} tokens, seed {a.seed} (same for every method).",
        f"- Perplexity: `{a.eval_set}`, first {a.eval_rows} rows of {a.eval_seqlen} tokens (BOS per row where the "
        "model needs it).",
        f"- Speed: CPU, float32, batch 1, prefill of {a.latency_len} random tokens (logits of the last position only, as generation computes them), one warm-up pass "
        f"each, then {a.latency_reps} alternated dense/pruned passes in one process; speedup = median dense / "
        "median pruned; clock: " + ("CPU time of the process on one thread (the machine is shared; wall time "
        "swings by seconds there)" if a.clock == "cpu" else "wall time") + ".",
        "- Ratio: papers' definition (all parameters, embeddings included, tied weights once).",
        "",
        "| method | budget | ratio | ppl | speedup | dense ms | pruned ms | search s | removed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"| {r['method']} | {r['budget']} | {r['ratio']:.3f} | {r['ppl']:.2f} | {r['speedup']:.3f} | "
                     f"{ms(r['dense_ms'])} | {ms(r['pruned_ms'])} | {r['search_s']:.0f} | {r['removed']} |")
    lines += equal_speed_table(a, rows)
    path.write_text("\n".join(lines) + "\n" + (f"\n{notes.strip()}\n" if notes.strip() else ""))


def plot(rows, path: Path, a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = rows[0]
    ax.scatter([dense["speedup"]], [dense["ppl"]], marker="*", s=150, color="black", label="dense", zorder=3)
    methods = sorted({r["method"] for r in rows[1:]})
    for m in methods:
        for kind, style in (("ratio", "-o"), ("speedup", "s")):
            pts = sorted((r["speedup"], r["ppl"], r["ratio"]) for r in rows[1:]
                         if r["method"] == m and r["budget"].startswith(kind))
            if not pts:
                continue
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                           label=m if kind == "ratio" else f"{m} (--speedup)")[0]
            for x, y, rr in pts:
                ax.annotate(f"{rr:.2f}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7,
                            color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel(f"measured prefill speedup (CPU, {a.latency_len} tokens, {a.clock} clock)")
    ax.set_ylabel(f"{a.eval_set} perplexity (log)")
    ax.set_title(f"{a.model}: quality vs speed (labels: parameter ratio)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
