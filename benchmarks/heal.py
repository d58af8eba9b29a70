"""Healing after pruning: what `secateurs heal` recovers, against the token budget and the time it takes.

For each pruning method (same model, same target ratio, same calibration): ``secateurs prune``, then
``secateurs heal`` at each token budget (``kd``; ``lm`` too at the ``--lm-at`` budgets, same settings otherwise),
and ``secateurs eval`` of the dense, the pruned and every healed model: held-out perplexity (wiki:test) and the
zero-shot tasks (lm-evaluation-harness, ``--limit`` items each). All heal runs share one teacher cache
(``--teacher-cache``): the dense model's top-k is computed once for the rows any run uses; each run's time is
reported as its training time plus the teacher time of the rows it uses (at the teacher rate measured here), so
that it is the time the run would take alone.

"Gap closed" = ``(log ppl_pruned - log ppl_healed) / (log ppl_pruned - log ppl_dense)``: the fraction of the
log-perplexity gap to the dense model that healing recovers. The issue's goal: at the largest budget that fits an
hour on this CPU, at least 0.5, with a zero-shot mean no lower than the pruned model's.

Resumable: a finished folder (``result.json``, ``heal.json``, ``eval.json``) is reused. Writes
``RESULTS/heal-<model>.md``, ``.json`` and ``.png`` after every evaluation.

    PYTHONPATH=src python benchmarks/heal.py --budgets 50k,200k,500k --lm-at 200k --limit 200
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tradeoff import ROOT, cli, folders, label, parse_method  # noqa: E402 - the trade-off's CLI runner and method specs

TASKS = "piqa,arc_easy,arc_challenge,hellaswag,winogrande"
ORDER = "benchmarks/results/order-smollm2-135m-16x256-fp32.json"


def budget_value(text: str) -> int:
    t = text.strip().lower()
    return int(float(t[:-1]) * {"k": 1e3, "m": 1e6}[t[-1]]) if t[-1:] in "km" else int(t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default=f"flap,blockpruner[from-order={ORDER}],sleb",
                   help="comma-separated; NAME[opt=value,...] passes prune options, budgets=50k;500k replaces "
                        "--budgets for that method, lm=50k replaces --lm-at (default: %(default)s)")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--nsamples", type=int, default=16, help="pruning calibration rows (the trade-off's)")
    p.add_argument("--seqlen", type=int, default=256, help="pruning calibration row length")
    p.add_argument("--budgets", default="50k,200k,500k", help="heal token budgets (kd)")
    p.add_argument("--lm-at", default="200k", help="budgets at which lm is run too ('' for none)")
    p.add_argument("--max-epochs", type=float, default=3.0, help="passes over wiki:calib a budget may take")
    p.add_argument("--heal-args", default="", help="extra options for every `secateurs heal` (quoted)")
    p.add_argument("--eval-rows", type=int, default=32, help="wiki:test rows of 512 tokens")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--limit", type=int, default=200, help="items per zero-shot task")
    p.add_argument("--note", default="not recorded", help="what else was running on the machine (goes into the results)")
    p.add_argument("--work", default=str(ROOT / "runs" / "heal"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)

    work, results, log = folders(a)
    budgets = [b for b in a.budgets.split(",") if b]
    lm_at = [b for b in a.lm_at.split(",") if b]
    cache = work / "teacher-cache"
    eval_args = ["--ppl", "wiki:test", "--seqlen", "512", "--rows", str(a.eval_rows), "--tasks", a.tasks,
                 "--limit", str(a.limit), "--device", "cpu", "--quiet"]
    commands: list[list[str]] = []

    def run(args, done: Path):
        commands.append(args)
        if not done.exists():
            print(f"heal-bench: secateurs {shlex.join(args)}", flush=True)
            cli(args, log)

    def evaluate(target: str, folder: Path) -> dict:
        run(["eval", target, *eval_args, "--json", str(folder / "eval.json")], folder / "eval.json")
        return json.loads((folder / "eval.json").read_text())

    t_start = time.time()
    (work / "dense").mkdir(exist_ok=True)
    state = {"dense": evaluate(a.model, work / "dense"), "rows": []}
    for spec in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", a.methods):
        name, opts = parse_method(spec)
        lab = label(name, {k: v for k, v in opts.items() if k == "as"} or {})
        pruned = work / lab
        extra = [x for k, v in opts.items() if k not in ("as", "budgets", "lm") for x in (f"--{k}", v)]
        run(["prune", a.model, "--method", name, "--ratio", str(a.ratio), "--nsamples", str(a.nsamples),
             "--seqlen", str(a.seqlen), "--eval", "", "--quiet", *extra, "--out", str(pruned), "--overwrite"],
            pruned / "result.json")
        ev = evaluate(str(pruned), pruned)
        state["rows"].append(row(lab, None, None, pruned, ev))
        own = [b for b in opts.pop("budgets").split(";") if b] if "budgets" in opts else budgets
        own_lm = [b for b in opts.pop("lm").split(";") if b] if "lm" in opts else lm_at
        jobs = [(b, "kd") for b in own] + [(b, "lm") for b in own_lm]
        for b, loss in sorted(jobs, key=lambda j: (budget_value(j[0]), j[1])):
            out = work / f"{lab}-{loss}-{b}"
            run(["heal", str(pruned), "--out", str(out), "--tokens", b, "--loss", loss, "--max-epochs", str(a.max_epochs),
                 "--teacher-cache", str(cache), "--eval", "", "--quiet", *shlex.split(a.heal_args)], out / "heal.json")
            state["rows"].append(row(lab, b, loss, out, evaluate(str(out), out)))
            write(a, state, commands, results, time.time() - t_start)
    write(a, state, commands, results, time.time() - t_start)
    print(f"heal-bench: wrote {results}/heal-{a.model}.md, .json, .png ({time.time() - t_start:.0f}s)", flush=True)
    return 0


def row(method: str, budget: str | None, loss: str | None, folder: Path, ev: dict) -> dict:
    tasks = {t: v["acc"] for t, v in (ev.get("tasks") or {}).items()}
    r = {"method": method, "budget": budget, "loss": loss, "folder": str(folder), "ppl": ev["ppl"]["wiki:test"]["ppl"],
         "tasks": tasks, "zs_mean": sum(tasks.values()) / len(tasks) if tasks else None,
         "zs_se": math.sqrt(sum(v["acc_stderr"] ** 2 for v in ev["tasks"].values() if v["acc_stderr"])) / len(tasks) if tasks else None}
    if budget is not None:
        h = json.loads((folder / "heal.json").read_text())
        r.update(tokens=h["tokens_seen"], steps=h["steps"], passes=h["data"]["passes"], rows_used=h["data"]["rows_used"],
                 seqlen=h["data"]["seqlen"], train_s=h["seconds"]["train"], teacher_s=h["seconds"]["teacher"],
                 teacher_rows=h["teacher_rows_computed"], threads=h.get("threads"),
                 train_tok_s=h["train_tokens_per_second"])
    return r


def finish(rows: list[dict], dense: dict) -> None:
    """Gap closed, zero-shot change, and each run's time alone (training + the teacher time of its rows)."""
    teacher = [(r["teacher_s"], r["teacher_rows"] * r["seqlen"]) for r in rows if r.get("teacher_s")]
    rate = sum(t for _, t in teacher) / sum(s for s, _ in teacher) if teacher else None  # teacher tokens/s
    d = math.log(dense["ppl"]["wiki:test"]["ppl"])
    pruned = {r["method"]: r for r in rows if r["budget"] is None}
    for r in rows:
        base = pruned[r["method"]]
        gap = math.log(base["ppl"]) - d
        r["gap_closed"] = (math.log(base["ppl"]) - math.log(r["ppl"])) / gap if gap > 0 else None
        r["zs_change"] = r["zs_mean"] - base["zs_mean"] if r["zs_mean"] is not None and base["zs_mean"] is not None else None
        if r["budget"] is not None:
            teach = r["rows_used"] * r["seqlen"] / rate if (rate and r["loss"] != "lm") else 0.0
            r["time_alone_s"] = r["train_s"] + teach


def write(a, state, commands, results: Path, elapsed: float) -> None:
    rows, dense = state["rows"], state["dense"]
    finish(rows, dense)
    dz = dense.get("tasks") or {}
    dense_zs = sum(v["acc"] for v in dz.values()) / len(dz) if dz else None
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [f"# Healing after pruning: {a.model} at ratio {a.ratio}", "",
             f"- Pruning: calibration wiki (= wiki:calib), {a.nsamples} rows of {a.seqlen} tokens, seed 0.",
             f"- Healing: `secateurs heal` defaults unless listed ({a.heal_args or 'none'}); data wiki:calib, up to "
             f"{a.max_epochs:g} passes; one teacher cache shared by all runs.",
             f"- Perplexity: wiki:test, first {a.eval_rows} rows of 512 tokens. Zero-shot: {a.tasks}, first {a.limit} items "
             "each, acc (lm-evaluation-harness); the mean is over the tasks.",
             f"- Dense: ppl {dense['ppl']['wiki:test']['ppl']:.2f}, zero-shot mean {fmt(dense_zs, '.4f')}.",
             "- gap closed = (log ppl_pruned - log ppl_healed) / (log ppl_pruned - log ppl_dense); time alone = training "
             "time + the teacher time of the rows the run uses (at the teacher rate measured in these runs).",
             f"- Machine: the 2-core CPU of this project; torch threads of the heal runs: "
             f"{sorted({r.get('threads') for r in rows if r.get('threads')}) or '-'}. Also running: {a.note}.", "",
             "| method | loss | budget | tokens | passes | time alone s | train tok/s | wiki:test ppl | gap closed | "
             "zero-shot mean (SE) | change vs pruned |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['loss'] or '(pruned)'} | {r['budget'] or '-'} | {fmt(r.get('tokens'), ',')} | "
                     f"{fmt(r.get('passes'), '.2f')} | {fmt(r.get('time_alone_s'), '.0f')} | {fmt(r.get('train_tok_s'), '.1f')} | "
                     f"{r['ppl']:.2f} | {fmt(r['gap_closed'], '.3f')} | {fmt(r['zs_mean'], '.4f')} ({fmt(r['zs_se'], '.4f')}) | "
                     f"{fmt(r['zs_change'], '+.4f')} |")
    lines += ["", "Goal (the issue's): at the largest kd budget whose time alone fits an hour, gap closed >= 0.5 and a "
              "zero-shot mean no lower than the pruned model's:", ""]
    for m in dict.fromkeys(r["method"] for r in rows):
        fits = [r for r in rows if r["method"] == m and r["loss"] == "kd" and r["time_alone_s"] <= 3600]
        if not fits:
            lines.append(f"- {m}: no kd budget measured within an hour")
            continue
        r = max(fits, key=lambda r: r["tokens"])
        ok = r["gap_closed"] >= 0.5 and (r["zs_change"] is None or r["zs_change"] >= 0)
        lines.append(f"- {m}: {r['budget']} ({r['time_alone_s'] / 60:.0f} min): gap closed {r['gap_closed']:.3f}, zero-shot "
                     f"change {fmt(r['zs_change'], '+.4f')}: {'met' if ok else 'not met'}")
    lines += ["", f"Elapsed for this invocation: {elapsed:.0f} s. Commands (PYTHONPATH=src, from the repository root):", "", "```"]
    lines += ["python -m secateurs " + shlex.join(c) for c in commands]
    lines += ["python " + shlex.join(["benchmarks/heal.py", *sys.argv[1:]]), "```", ""]
    (results / f"heal-{a.model}.md").write_text("\n".join(lines))
    (results / f"heal-{a.model}.json").write_text(json.dumps({"settings": vars(a), "dense": dense, "rows": rows}, indent=1))
    plot(rows, results / f"heal-{a.model}.png", a, dense_zs)


def plot(rows, path: Path, a, dense_zs: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (FuncFormatter below)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    colors = dict(zip(dict.fromkeys(r["method"] for r in rows), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    for m, loss in sorted({(r["method"], r["loss"]) for r in rows if r["budget"]}):
        pts = sorted((r for r in rows if r["method"] == m and r["loss"] == loss), key=lambda r: r["tokens"])
        base = next(r for r in rows if r["method"] == m and r["budget"] is None)
        style = dict(color=colors[m], marker="o" if loss == "kd" else "s", linestyle="-" if loss == "kd" else ":",
                     label=f"{m} ({loss})")
        axes[0].plot([0] + [r["tokens"] for r in pts], [0] + [r["gap_closed"] for r in pts], **style)
        # time: one point per run, labelled with its budget (runs under different load are not one curve)
        axes[1].plot([r["time_alone_s"] / 60 for r in pts], [r["gap_closed"] for r in pts], **{**style, "linestyle": "none"})
        for r in pts:
            axes[1].annotate(r["budget"], (r["time_alone_s"] / 60, r["gap_closed"]), fontsize=7,
                             xytext=(3, 3), textcoords="offset points", color=colors[m])
        if base["zs_mean"] is not None:
            axes[2].plot([0] + [r["tokens"] for r in pts], [base["zs_mean"]] + [r["zs_mean"] for r in pts], **style)
    if dense_zs is not None:
        axes[2].axhline(dense_zs, color="black", lw=0.8, ls="--", label="dense")
        axes[2].legend(fontsize=7)
    for ax, xl in zip(axes, ("heal tokens", "heal time alone (min, this CPU)", "heal tokens")):
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
    for ax in (axes[0], axes[2]):
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k" if x else "0"))
    axes[0].set_ylabel("log-perplexity gap closed (wiki:test)")
    axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[1].axvline(60, color="grey", lw=0.8, ls="--")
    axes[2].set_ylabel(f"zero-shot mean acc ({a.limit} items/task)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"secateurs heal on {a.model} pruned at {a.ratio}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
