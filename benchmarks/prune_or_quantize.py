"""Prune, or quantize harder? The user's alternative to pruning, measured inside llama.cpp on the same rows.

For one model: the dense model exported at each of ``--dense-types`` (default q4_k_m, q3_k_m, q2_k), and each
pruned folder of ``--pruned`` exported at ``--pruned-type`` (default q4_k_m), all through ``secateurs export``
(f32 GGUF, then llama.cpp's own quantizer; a pruned folder whose weights were dropped has its plan re-applied
with ``secateurs apply`` first). For every file: perplexity in llama.cpp (``secateurs eval FILE
--ppl SET --rows R --seqlen L``: the same rows for all), file size, and prompt / generation speed measured
against the dense file of the first dense type, alternating in one process (``secateurs bench FILE --against
DENSE``). ``--source-gguf`` adds the file the user started from (measured, not re-exported).

Writes ``RESULTS/NAME.md`` (table, answer at equal size and equal speed, settings, what else was running),
``.json`` (raw rows, settings) and ``.png`` (perplexity against file size and against generation speed).
Resumable: files, ``eval-*.json`` and ``bench-*.json`` that exist are reused. ``--resume-from FILE.json`` takes
the rows of an earlier run with the same settings as measured (each speed against the dense file of its own
process), so a committed result can be extended with new pruned files on a fresh machine: only the reference
file is exported again, to time the new ones against.

    PYTHONPATH=src python benchmarks/prune_or_quantize.py --model qwen2.5-coder-1.5b \\
        --pruned flap-0.15=runs/tradeoff/qwen2.5-coder-1.5b/flap-ratio0.15,...
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_speed import machine_state  # noqa: E402
from tradeoff import cli, folders  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the dense model (embedded name or folder)")
    p.add_argument("--pruned", default="", help="LABEL=FOLDER,... pruned folders of that model")
    p.add_argument("--dense-types", default="q4_k_m,q3_k_m,q2_k")
    p.add_argument("--pruned-type", default="q4_k_m")
    p.add_argument("--source-gguf", default="", help="LABEL=FILE: the GGUF the user started from, measured as is")
    p.add_argument("--eval-set", default="wiki:test")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default=str(ROOT / "runs" / "prune-or-quantize"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--name", default="", help="results file names without suffix (default prune-or-quantize-MODEL)")
    p.add_argument("--render", metavar="JSON", help="redraw the table and plot from a results JSON")
    p.add_argument("--resume-from", metavar="JSON", help="take the rows of a results JSON of an earlier run with "
                   "the same settings as measured, and measure only the other files")
    p.add_argument("--apply-max-memory", default=None,
                   help="--max-memory of the re-application (layer by layer: the same weights in less memory)")
    p.add_argument("--prepare-only", action="store_true",
                   help="export and perplexity only (both hold under load); run again without it on a quiet machine to time")
    return p


def pairs(text: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, text.split(",")):
        label, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"expected LABEL=PATH, got {item!r}")
        out.append((label.strip(), path.strip()))
    return out


def timed(path: Path, reference: Path, a, out: Path, log: Path) -> None:
    """``secateurs bench FILE --against REFERENCE`` as a library call in a fresh process, mixed tensor types
    allowed (the command refuses them: this benchmark compares across types on purpose)."""
    s = dict(prompt_len=a.prompt_len, decode_tokens=a.decode_tokens, reps=a.reps, warmup=a.warmup, threads=a.threads or 0)
    code = ("import json, sys; from secateurs.llamacpp.bench import LlamaBenchSettings, bench; "
            "from secateurs.result import versions; from secateurs.files import atomic_write_text; "
            f"r = bench({str(path)!r}, {str(reference)!r}, LlamaBenchSettings(**{s!r}), mixed_types=True); "
            f"r['versions'] = versions(); atomic_write_text({str(out)!r}, json.dumps(r, indent=1))")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "a") as f:
        f.write(f"$ bench {path} --against {reference} {s} (mixed types allowed)\n")
        f.flush()
        r = subprocess.run([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"bench of {path} failed ({r.returncode}), see {log}")


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.render:
        data = json.loads(Path(a.render).read_text())
        stem = Path(a.render).with_name(Path(a.render).stem)  # a dotted model name keeps its dots
        write(data, stem)
        return 0
    work, results, log = folders(a)
    threads = ["--threads", str(a.threads)] if a.threads else []
    before, t0 = machine_state(), time.time()
    files = []  # (label, kind, type, file)
    for t in filter(None, a.dense_types.split(",")):
        files.append((f"dense {t}", "dense", t, work / f"dense-{t}.gguf", a.model))
    for label, path in pairs(a.source_gguf):
        files.append((label, "source", "as shipped", Path(path).expanduser(), None))
    for label, folder in pairs(a.pruned):
        files.append((label, "pruned", a.pruned_type, work / f"{label}-{a.pruned_type}.gguf", folder))
    plans = {label: folder for label, folder in pairs(a.pruned)}
    reference = files[0][3]
    earlier = resumed(a)
    rows = []
    for label, kind, t, gg, src in files:
        if label in earlier:
            rows.append(earlier[label])
            if gg != reference or all(f[0] in earlier for f in files):
                continue
        if src is not None and not gg.exists():
            applied = None
            if kind == "pruned" and not any(Path(src).glob("*.safetensors")):  # weights dropped once measured
                applied = work / f"{label}-applied"
                print(f"prune_or_quantize: re-applying {src}/plan.json to {a.model} ({time.time() - t0:.0f}s)", flush=True)
                budget = ["--max-memory", a.apply_max_memory] if a.apply_max_memory else []
                cli(["apply", str(Path(src) / "plan.json"), a.model, "--out", str(applied), "--eval", "", "--overwrite",
                     "--quiet", *budget], log)
            print(f"prune_or_quantize: exporting {label} ({time.time() - t0:.0f}s)", flush=True)
            cli(["export", str(applied or src), "--format", "gguf", "--type", t, "--out", str(gg), "--quiet", *threads], log)
            if applied is not None:
                shutil.rmtree(applied)
        ej = work / f"eval-{gg.stem}.json"
        if label not in earlier and not ej.exists():
            print(f"prune_or_quantize: perplexity of {label} ({time.time() - t0:.0f}s)", flush=True)
            cli(["eval", str(gg), "--ppl", a.eval_set, "--rows", str(a.rows), "--seqlen", str(a.seqlen), "--quiet",
                 *threads, "--json", str(ej)], log)
        bj = work / f"bench-{gg.stem}.json"
        if label not in earlier and not a.prepare_only and not bj.exists():
            print(f"prune_or_quantize: speed of {label} against {reference.name} ({time.time() - t0:.0f}s)", flush=True)
            timed(gg, reference, a, bj, log)
        if label in earlier:
            continue  # the reference, exported again only to time the new files against
        e = json.loads(ej.read_text())
        b = json.loads(bj.read_text()) if bj.exists() else None
        src_result = Path(plans[label]) / "result.json" if kind == "pruned" else None
        rows.append({"label": label, "kind": kind, "type": t, "file": str(gg), "mib": gg.stat().st_size / 2**20,
                     "ppl": e["ppl"][a.eval_set]["ppl"],
                     "prompt_tps": b and b["prompt_tokens_per_s"], "gen_tps": b and b["decode_tokens_per_s"],
                     "prompt_speedup": b and b["speedup"]["prefill"], "gen_speedup": b and b["speedup"]["decode"],
                     "machine": b and b.get("load"),
                     "ratio": json.loads(src_result.read_text())["ratio_achieved"] if src_result else None})
        # the results so far, after every file: a run cut off leaves what it measured, saying what is missing
        missing = [f[0] for f in files[len(rows):]]
        save(a, argv, before, t0, rows, missing, results)
    if a.prepare_only:
        print(f"prune_or_quantize: files and perplexities ready in {work} ({time.time() - t0:.0f}s); time them without --prepare-only")
    return 0


# The settings a resumed run must share with the rows it takes over: those that change a figure.
SAME = ("model", "eval_set", "rows", "seqlen", "prompt_len", "decode_tokens", "reps", "warmup", "threads", "dense_types",
        "pruned_type")


def resumed(a) -> dict[str, dict]:
    """The rows of ``a.resume_from`` by label ({} without it); a file of other settings is refused."""
    if not a.resume_from:
        return {}
    data = json.loads(Path(a.resume_from).read_text())
    differ = [f"{k} {data['settings'].get(k)!r} there, {getattr(a, k)!r} here" for k in SAME
              if data["settings"].get(k) != getattr(a, k)]
    if differ:
        raise SystemExit(f"prune_or_quantize: --resume-from {a.resume_from}: other settings ({'; '.join(differ)})")
    print(f"prune_or_quantize: {len(data['rows'])} rows taken from {a.resume_from}", flush=True)
    return {r["label"]: {**r, "resumed_from": a.resume_from} for r in data["rows"]}


def save(a, argv, before, t0, rows: list[dict], missing: list[str], results: Path) -> None:
    data = {"command": "PYTHONPATH=src python benchmarks/prune_or_quantize.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "settings": vars(a), "machine_before": before, "machine_after": machine_state(),
            "seconds": time.time() - t0, "rows": rows, "missing": missing,
            "untimed": [r["label"] for r in rows if r["gen_tps"] is None]}
    stem = results / (a.name or f"prune-or-quantize-{a.model}")
    Path(f"{stem}.json").write_text(json.dumps(data, indent=1))
    write(data, stem)


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Perplexity at ``x`` along a curve of (x, ppl) points (linear in log-perplexity), None outside it."""
    import math

    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            w = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return math.exp((1 - w) * math.log(y0) + w * math.log(y1))
    return None


def answer(rows: list[dict]) -> list[str]:
    """Each pruned file against the dense quantization curve at its own size and its own speeds. Speeds are
    compared as speedups against the reference file timed in the same process: tokens/s of rows timed in other
    processes (another load, another session under --resume-from) do not compare."""
    dense = [r for r in rows if r["kind"] == "dense"]
    out = []
    for r in (r for r in rows if r["kind"] == "pruned"):
        parts = []
        for key, what in (("mib", "file size"), ("prompt_speedup", "prompt speedup"),
                          ("gen_speedup", "generation speedup")):
            if r[key] is None or any(d[key] is None for d in dense):
                parts.append(f"at its {what}: not timed yet")
                continue
            q = interpolate([(d[key], d["ppl"]) for d in dense], r[key])
            if q is None:
                f = ".0f" if key == "mib" else ".2f"
                span = f"{min(d[key] for d in dense):{f}}-{max(d[key] for d in dense):{f}}"
                parts.append(f"at its {what} ({r[key]:{f}}) no dense quantization compares (dense span {span})")
            else:
                better = "pruning wins" if r["ppl"] < q else "quantizing harder wins"
                f = ".0f" if key == "mib" else ".2f"
                parts.append(f"at equal {what} ({r[key]:{f}}) dense quantization reads {q:.2f} against its {r['ppl']:.2f}: {better}")
        out.append(f"- **{r['label']}** ({r['type']}): " + "; ".join(parts) + ".")
    return out


def write(data: dict, stem: Path) -> None:
    a, rows = data["settings"], data["rows"]
    mb, ma = data["machine_before"], data["machine_after"]
    lines = [f"# Prune, or quantize harder? {a['model']} inside llama.cpp", "",
             f"Command: `{data['command']}` ({data['seconds'] / 60:.0f} min)", "",
             f"- Perplexity: llama.cpp, `{a['eval_set']}`, {a['rows']} rows of {a['seqlen']} tokens, the same rows for "
             "every file.",
             f"- Speed: batch 1, prompt of {a['prompt_len']} tokens, {a['decode_tokens']} greedy tokens, alternating "
             f"with `{Path(rows[0]['file']).name}` in one process, {a['warmup']} warm-up round(s) dropped, medians of "
             f"{a['reps']}; threads {a['threads'] or 'default'}.",
             f"- Machine before: load {mb['loadavg']} on {mb['cpus']} CPUs; after: load {ma['loadavg']}. Busy at the "
             "start: " + ("; ".join(f"`{b}`" for b in mb["busy"]) or "none") + ".", "",
             "| file | type | ratio | MiB | wiki ppl | prompt tok/s | gen tok/s | prompt x | gen x |",
             "|---|---|---|---|---|---|---|---|---|"]
    def num(x, f):
        return "not timed" if x is None else format(x, f)

    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"| {r['label']} | {r['type']} | {ratio} | {r['mib']:.0f} | {r['ppl']:.2f} | {num(r['prompt_tps'], '.1f')} | "
                     f"{num(r['gen_tps'], '.2f')} | {num(r['prompt_speedup'], '.2f')} | {num(r['gen_speedup'], '.2f')} |")
    if data.get("missing") or data.get("untimed"):
        lines += ["", "**Incomplete.** " + (f"Not measured yet: {', '.join(data['missing'])}. " if data.get("missing") else "")
                  + (f"Not timed yet: {', '.join(data['untimed'])} (the same command again resumes: files, perplexities "
                     "and timings that exist are reused)." if data.get("untimed") else "")]
    lines += ["", "## The answer, read off the dense quantization curve (linear in log-perplexity)", "", *answer(rows)]
    if data.get("notes", "").strip():  # written by hand into the JSON; --render keeps them
        lines += ["", data["notes"].strip()]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(rows, Path(f"{stem}.png"), a)
    print(f"prune_or_quantize: wrote {stem}.md, .json and .png")


def plot(rows: list[dict], path: Path, a: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, xlabel in ((axes[0], "mib", "file size (MiB)"), (axes[1], "gen_speedup", "generation speedup against dense q4_k_m (llama.cpp)")):
        if any(r[key] is None for r in rows):
            ax.text(0.5, 0.5, "not timed yet", ha="center", transform=ax.transAxes)
            rows_here = [r for r in rows if r[key] is not None]
        else:
            rows_here = rows
        dense = sorted((r for r in rows_here if r["kind"] == "dense"), key=lambda r: r[key])
        ax.plot([r[key] for r in dense], [r["ppl"] for r in dense], "o-", color="tab:blue", label="dense, quantized harder")
        for r in rows_here:
            style = {"dense": ("o", "tab:blue"), "source": ("s", "tab:gray"), "pruned": ("D", "tab:red")}[r["kind"]]
            ax.plot(r[key], r["ppl"], style[0], color=style[1], label=None)
            ax.annotate(f"{r['label']}", (r[key], r["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        pr = [r for r in rows_here if r["kind"] == "pruned"]
        if pr:
            ax.plot([], [], "D", color="tab:red", label=f"pruned, {a['pruned_type']}")
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{a['eval_set']} perplexity (lower is better)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{a['model']}: prune or quantize harder? (llama.cpp, same rows)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
