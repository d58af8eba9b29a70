"""Does an LLM help the Self-Pruner search? LLM-driven against classic operators at the same number of fitness
evaluations, for a model, ratios, seeds, a proposer and formulations of what the LLM is asked (by default
SmolLM2-135M with the model being pruned as its own proposer: its offline GGUF in llama.cpp, answers under the
schemas' grammars).

    python benchmarks/self_pruner_claim.py --out runs/sp-claim            # the full comparison (resumable)
    python benchmarks/self_pruner_claim.py --out runs/sp-claim --report   # summary.md, curves.png again
    python benchmarks/self_pruner_claim.py --out runs/sp-claim --partial  # what OUT holds now, even mid-search
    python benchmarks/self_pruner_claim.py --out runs/sp-llm --ratios 0.2 --seeds 0 \
        --proposer-model qwen2.5-coder-1.5b --formulations vectors/llm edits/uniform --results benchmarks/results
    python benchmarks/self_pruner_claim.py --out runs/sp-long --proposers classic --generations 16 \
        --time-of runs/sp-claim/summary.json ...  # then:
    python benchmarks/self_pruner_claim.py --out runs/sp-long --time-matched runs/sp-claim/summary.json
    python benchmarks/self_pruner_claim.py --out runs/sp-all --merge runs/sp-a/summary.json runs/sp-b/summary.json
    python benchmarks/self_pruner_claim.py --out runs/sp-tiny --ratios 0.2 --seeds 0 --population 3 \
        --generations 1 --crossover 1 --mutation 1 --nsamples 2 --seqlen 64 --fitness-rows 1 --eval-rows 2

``--proposer-model``: an embedded model's name or a GGUF chat model file (default: the model itself).
``--formulations``: one LLM search per ``TASK/START`` (``--llm-task`` / ``--llm-start`` of ``secateurs prune
--method self-pruner``); ``vectors/llm`` is named ``local`` (the runs before formulations existed), the others
``local-TASK-START``. ``--responses``: the LLM is shown tell's cached per-block responses for this model and
calibration (when the cache holds them; said in the output).

One process: the model, the calibration rows, the one-shot Wanda-sp scores of the fitness (``MaskedFitness``)
and the proposer's GGUF are loaded once. For every ratio and seed, each proposer runs the same search
(``evolve``; the calibration is the same for all seeds, the seed drives the search's random draws and the
LLM's sampling). Then, for each (ratio, seed), both searches are cut at the same number of fitness
evaluations ``E`` (the smaller of the two totals: an LLM may propose vectors already evaluated, which cost
no evaluation) and the best vector within ``E`` of each is pruned for real (the full sequential wanda-sp, as
``secateurs prune --method self-pruner`` does) and measured on wiki:test.

Writes ``OUT/<proposer>-r<ratio>-s<seed>/search.jsonl``, ``OUT/summary.json`` (settings, per run: the curve of
best fitness against evaluations, the LLM's answer counts, tokens and seconds per answer, seconds per fitness
evaluation; per (ratio, seed): ``E``, best fitness and wiki:test perplexity of every proposer), ``OUT/summary.md``
and ``OUT/curves.png``, written again after every (ratio, seed) (``missing`` lists those not measured yet). A run
whose search is complete is not redone; an interrupted one resumes from its log (every generation is logged).
``--partial`` (the same arguments) writes the summary of what OUT holds at that moment without loading the model:
searches as far as logged (a running one's log is only read; seconds per evaluation then come from the log's
wall times less the LLM's seconds), pairs whose final plans are measured.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path


def curve(records: list[dict]) -> list[float]:
    """Best fitness after each new evaluation, in the order the search evaluated them."""
    best, out = float("inf"), []
    for r in records:
        for p in r["proposals"]:
            if not p["cached"]:
                best = min(best, p["fitness"])
                out.append(best)
    return out


def best_within(records: list[dict], budget: int) -> tuple[list[float], float]:
    """The best vector among the first ``budget`` evaluations."""
    n, best = 0, (None, float("inf"))
    for r in records:
        for p in r["proposals"]:
            if not p["cached"]:
                n += 1
                if n > budget:
                    return best
                if p["fitness"] < best[1]:
                    best = (p["rates"], p["fitness"])
    return best


def run_names(settings: dict) -> list[str]:
    """The searches of every (ratio, seed): classic and one per LLM formulation (see the module docstring)."""
    names = ["classic"] if "classic" in settings["proposers"] else []
    if "local" in settings["proposers"]:
        for f in settings.get("formulations") or ["vectors/llm"]:
            names.append("local" if f == "vectors/llm" else "local-" + f.replace("/", "-"))
    return names


def label(name: str, settings: dict) -> str:
    if name == "classic":
        return "classic operators"
    who = settings.get("proposer_model") or f"{settings['model']} itself"
    form = "vectors/llm" if name == "local" else name.removeprefix("local-").replace("-", "/")
    return f"LLM ({who}, {form})"


def plot(summary: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    s = summary["settings"]
    ratios = s["ratios"]
    fig = Figure(figsize=(5.5 * len(ratios), 4.2))
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for k, ratio in enumerate(ratios):
        ax = fig.add_subplot(1, len(ratios), k + 1)
        for c, prop in enumerate(run_names(s)):
            runs = [r for r in summary["runs"] if r["ratio"] == ratio and r["proposer"] == prop]
            if not runs:
                continue
            for r in runs:
                ax.plot(range(1, len(r["curve"]) + 1), r["curve"], color=palette[c % 5], alpha=0.35, lw=1)
            n = min(len(r["curve"]) for r in runs)
            med = [statistics.median(r["curve"][i] for r in runs) for i in range(n)]
            ax.plot(range(1, n + 1), med, color=palette[c % 5], lw=2.2,
                    label=f"{label(prop, s)}, median of {len(runs)} seed(s)")
        ax.set_yscale("log")
        ax.set_xlabel("fitness evaluations")
        ax.set_ylabel("best fitness so far (calibration perplexity)")
        ax.set_title(f"{s['model']}, ratio {ratio:.0%}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(summary: dict) -> str:
    s = summary["settings"]
    names = [n for n in run_names(s) if all(n in p for p in summary["pairs"])]
    slash = " / ".join(names)
    lines = [f"Searches: {'; '.join(f'{n} = {label(n, s)}' for n in names)}.", "",
             f"| ratio | seed | E | best fitness {slash} | wiki:test PPL {slash} | evaluations {slash} |",
             "|---|---|---|---|---|---|"]
    for p in summary["pairs"]:
        col = lambda key, fmt: " / ".join(format(p[n][key], fmt) for n in names)
        lines.append(f"| {p['ratio']:.0%} | {p['seed']} | {p['budget']} | {col('best_fitness', '.2f')} | "
                     f"{col('ppl_test', '.2f')} | {col('evaluations', 'd')} |")
    lines += ["", "LLM answers (rate vectors and selections) per run: usable = no classical fallback; retried = a "
              "second attempt was needed; projected = rate vectors the mean-rate projection changed; repeats = rate "
              "vectors already evaluated (no new evaluation). Seconds per answer and per fitness evaluation were "
              "measured under the load stated in the results file.", "",
              "| search | ratio | seed | LLM answers | usable (no fallback) | retried | repaired | projected | repeats "
              "| fallback | s per answer, median / mean | s per fitness evaluation | prompt / completion tokens per answer |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        a = r.get("llm_answers")
        if not a:
            continue
        n = a["answers"]
        fit = r.get("fitness_seconds_per_evaluation")
        todo = "" if r.get("complete", True) else f" (generation {r['generations_logged']} of {s['generations']})"
        lines.append(f"| {r['proposer']}{todo} | {r['ratio']:.0%} | {r['seed']} | {n} | {a['usable']} ({a['usable'] / n:.1%}) | "
                     f"{a['retried']} | {a['repaired']} | {a['projected']} | {a['repeats']} | {a['fallback']} | "
                     f"{a['seconds_per_answer_median']:.1f} / {a['seconds_per_answer']:.1f} | "
                     f"{'-' if fit is None else format(fit, '.2f')} | "
                     f"{r['tokens']['prompt'] / n:.0f} / {r['tokens']['completion'] / n:.0f} |")
    if summary.get("missing"):
        going = {}  # (ratio, seed) -> where each of its searches stands
        for r in summary["runs"]:
            going.setdefault((r["ratio"], r["seed"]), []).append(f"{r['proposer']} " + (
                "done" if r.get("complete", True) else f"at generation {r['generations_logged']} of {s['generations']}"))
        lines += ["", "**Partial**: not measured yet (no final plans): " + "; ".join(
            f"{m['ratio']:.0%} seed {m['seed']}" + (f" ({', '.join(going[(m['ratio'], m['seed'])])})"
                                                    if going.get((m['ratio'], m['seed'])) else " (not started)")
            for m in summary["missing"]) + "."
                  + (f" Read {summary['partial_read']} by `--partial`." if summary.get("partial_read") else "")]
    for part in summary.get("parts") or [summary]:  # a merged summary: each run of the script
        m = part.get("machine") or {}
        where = f"Ratios {part['ratios']}, seeds {part['seeds']}: " if "ratios" in part else ""
        if m:
            lines += ["", where + f"load average (1, 5, 15 min) at the start {m['load_average_start']}, at the end "
                      f"{m['load_average_end']}; {m['cpus']} CPUs; wall {m['wall_s'] / 60:.0f} min."
                      + (f" Note: {part['note']}" if part.get("note") else "")]
        if part.get("command"):
            lines += ["", f"Command: `{part['command']}`"]
    return "\n".join(lines) + "\n"


def write(summary: dict, out: Path, results: str | None) -> None:
    """OUT/summary.json, summary.md and curves.png; with ``--results DIR``, copies as DIR/self-pruner-claim-MODEL.*"""
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(table(summary))
    plot(summary, out / "curves.png")
    if results:
        Path(results).mkdir(parents=True, exist_ok=True)
        stem = Path(results) / (summary["settings"].get("name") or f"self-pruner-claim-{summary['settings']['model']}")
        for src, suffix in (("summary.json", ".json"), ("summary.md", "-table.md"), ("curves.png", ".png")):
            shutil.copyfile(out / src, f"{stem}{suffix}")
    print(table(summary))


# The settings that change a search's figures: summaries merged into one must share them.
SAME_SEARCH = ("model", "proposer_model", "population", "generations", "crossover", "mutation", "nsamples", "seqlen",
               "fitness_rows", "eval_rows", "batch_size", "responses")


def merge(paths: list[str], name: str | None) -> dict:
    """One summary from the summaries of several runs of this script (other ratios or seeds, other sessions): their
    runs and pairs together, each part's command, note and machine kept. Refused when a setting of SAME_SEARCH
    differs or a (search, ratio, seed) comes twice."""
    parts = [json.loads(Path(x).read_text()) for x in paths]
    first = parts[0]["settings"]
    differ = [f"{k} ({', '.join(repr(q['settings'].get(k)) for q in parts)})" for k in SAME_SEARCH
              if len({json.dumps(q["settings"].get(k)) for q in parts}) > 1]
    if differ:
        raise SystemExit(f"self_pruner_claim: --merge: the summaries differ in {'; '.join(differ)}")
    seen, runs, pairs = set(), [], []
    for q in parts:
        for r in q["runs"]:
            key = (r["proposer"], r["ratio"], r["seed"])
            if key in seen:
                raise SystemExit(f"self_pruner_claim: --merge: {key} is in more than one summary")
            seen.add(key)
            runs.append(r)
        pairs += q["pairs"]
    forms = list(dict.fromkeys(f for q in parts for f in q["settings"].get("formulations") or ["vectors/llm"]))
    props = list(dict.fromkeys(x for q in parts for x in q["settings"].get("proposers", ["classic", "local"])))
    settings = {**first, "ratios": sorted({x for q in parts for x in q["settings"]["ratios"]}),
                "seeds": sorted({x for q in parts for x in q["settings"]["seeds"]}), "formulations": forms,
                "proposers": props, "name": name or first.get("name")}
    return {"settings": settings, "ppl_test_dense": parts[0]["ppl_test_dense"],
            "parts": [part for x, q in zip(paths, parts) for part in q.get("parts") or [  # a merged summary: its parts
                {"file": x, "command": q.get("command"), "note": q.get("note"), "machine": q.get("machine"),
                 "ratios": q["settings"]["ratios"], "seeds": q["settings"]["seeds"]}]],
            "runs": sorted(runs, key=lambda r: (r["ratio"], r["seed"], r["proposer"])),
            "pairs": sorted(pairs, key=lambda p: (p["ratio"], p["seed"])), "versions": parts[-1].get("versions"),
            "missing": [m for q in parts for m in q.get("missing") or []]}


def report(out: Path, results: str | None, note: str | None = None) -> None:
    """OUT/summary.md and OUT/curves.png again from OUT/summary.json, each run's answer counts from its log."""
    from secateurs.search.evolution import llm_answer_stats, read_log

    summary = json.loads((out / "summary.json").read_text())
    if note:
        summary["note"] = note
    for r in summary["runs"]:  # the counts again from the logs where this folder has them (a merge may not)
        log = out / f"{r['proposer']}-r{r['ratio']:g}-s{r['seed']}" / "search.jsonl"
        if log.exists():
            r["llm_answers"] = llm_answer_stats(read_log(log))
    summary["settings"].setdefault("proposers", ["classic", "local"])
    write(summary, out, results)


def evaluations_in_llm_time(llm_summary: dict) -> dict:
    """(ratio, seed) -> the evaluations an LLM search's wall time buys at the seconds per fitness evaluation measured
    in that same search (same machine, same load); the largest where a summary has several LLM searches there."""
    got = {}
    for r in llm_summary["runs"]:
        fit = r.get("fitness_seconds_per_evaluation")
        if r["proposer"] != "classic" and fit:
            key = (r["ratio"], r["seed"])
            got[key] = max(got.get(key, 0), round(r["search_wall_s"] / fit))
    return got


def time_matched(out: Path, llm_summary: str, results: str | None) -> None:
    """``--time-matched LLM_SUMMARY``: does the LLM pay for itself in time? OUT holds longer classic searches (more
    generations, same seeds); for every LLM search of LLM_SUMMARY, the evaluations its wall time would have bought
    at the seconds per fitness evaluation measured in that same search (same machine, same load), and the classic
    search's best fitness at that many evaluations against the LLM's, with both final plans on wiki:test (the classic
    one cut there when OUT was searched with ``--time-of LLM_SUMMARY``)."""
    mine, theirs = json.loads((out / "summary.json").read_text()), json.loads(Path(llm_summary).read_text())
    if mine["settings"]["model"] != theirs["settings"]["model"]:
        raise SystemExit(f"self_pruner_claim: --time-matched: {llm_summary} is about {theirs['settings']['model']}, "
                         f"OUT about {mine['settings']['model']}")
    classic = {(r["ratio"], r["seed"]): r for r in mine["runs"] if r["proposer"] == "classic"}
    finals = {(p["ratio"], p["seed"]): {**p["classic"], "cut": p["budget"]} for p in mine["pairs"] if "classic" in p}
    rows = []
    for r in theirs["runs"]:
        key, fit = (r["ratio"], r["seed"]), r.get("fitness_seconds_per_evaluation")
        if r["proposer"] == "classic" or key not in classic or not fit:
            continue
        pair = next(p for p in theirs["pairs"] if (p["ratio"], p["seed"]) == key)
        c = classic[key]["curve"]
        e_time = round(r["search_wall_s"] / fit)  # this search's own (evaluations_in_llm_time: the largest there)
        at = min(e_time, len(c))
        rows.append({"search": r["proposer"], "ratio": r["ratio"], "seed": r["seed"], "llm_evaluations": pair["budget"],
                     "llm_wall_s": r["search_wall_s"], "seconds_per_evaluation": fit, "classic_evaluations_in_llm_time": e_time,
                     "classic_evaluations_run": len(c), "llm_best_fitness": pair[r["proposer"]]["best_fitness"],
                     "classic_best_fitness_at_llm_evaluations": c[pair["budget"] - 1],
                     "classic_best_fitness_in_llm_time": c[at - 1],
                     "llm_ppl_test": pair[r["proposer"]]["ppl_test"],
                     "classic_ppl_test_long": (finals.get(key) or {}).get("ppl_test"),
                     "classic_ppl_test_long_evaluations": (finals.get(key) or {}).get("cut")})
    if not rows:
        raise SystemExit(f"self_pruner_claim: --time-matched: no LLM search of {llm_summary} has a classic search of the "
                         f"same ratio and seed in {out}")
    lines = [f"Classic operators given the LLM's wall time, {mine['settings']['model']} (LLM searches: {llm_summary}; "
             f"classic: {out}, {mine['settings']['generations']} generations). E = the LLM search's evaluations; "
             "E(time) = its wall time over its own seconds per fitness evaluation (what that time buys classic). "
             "Best fitness is calibration perplexity on the fitness rows, lower is better.", "",
             "| search | ratio | seed | E | LLM wall s | s per evaluation | E(time) | best fitness LLM at E | classic at E | "
             "classic at E(time) | wiki:test LLM (at E) | wiki:test classic (evaluations) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        short = "" if x["classic_evaluations_run"] >= x["classic_evaluations_in_llm_time"] else \
            f" (only {x['classic_evaluations_run']} run)"
        ppl = x["classic_ppl_test_long"]
        lines.append(f"| {x['search']} | {x['ratio']:.0%} | {x['seed']} | {x['llm_evaluations']} | {x['llm_wall_s']:.0f} | "
                     f"{x['seconds_per_evaluation']:.2f} | {x['classic_evaluations_in_llm_time']}{short} | "
                     f"{x['llm_best_fitness']:.2f} | {x['classic_best_fitness_at_llm_evaluations']:.2f} | "
                     f"{x['classic_best_fitness_in_llm_time']:.2f} | {x['llm_ppl_test']:.2f} | "
                     + ("-" if ppl is None else f"{ppl:.2f} ({x['classic_ppl_test_long_evaluations']})") + " |")
    for part in mine.get("parts") or [mine]:  # a merged summary: each run of the script
        where = f"ratios {part['ratios']}, seeds {part['seeds']}: " if "ratios" in part else ""
        if part.get("command"):
            lines += ["", f"Classic command ({where}{part.get('note') or 'no note'}): `{part['command']}`"]
    if mine.get("missing"):
        lines += ["", "Not run yet (classic): " + "; ".join(f"{m['ratio']:.0%} seed {m['seed']}" for m in mine["missing"])
                  + "."]
    text = "\n".join(lines) + "\n"
    (out / "time-matched.json").write_text(json.dumps({"llm_summary": llm_summary, "rows": rows}, indent=1))
    (out / "time-matched.md").write_text(text)
    if results:
        stem = Path(results) / (mine["settings"].get("name") or f"self-pruner-claim-{mine['settings']['model']}")
        shutil.copyfile(out / "time-matched.json", f"{stem}-time-matched.json")
        shutil.copyfile(out / "time-matched.md", f"{stem}-time-matched.md")
    print(text)


def run_entry(name: str, ratio: float, seed: int, res, recs: list[dict], timed: dict | None, generations: int) -> dict:
    """One search's line in the summary. Seconds per fitness evaluation: timed in this process when it evaluated,
    else from the log (generation wall time less the LLM's seconds, over the new evaluations)."""
    from secateurs.search.evolution import llm_answer_stats

    if timed and timed["n"]:
        fit = timed["seconds"] / timed["n"]
    else:
        n = sum(r["new_evaluations"] for r in recs)
        fit = sum(r["wall_s"] - r.get("llm_seconds", 0.0) for r in recs) / n if n else None
    return {"proposer": name, "ratio": ratio, "seed": seed, "curve": curve(recs), "evaluations": res.evaluations,
            "best_fitness": res.best.fitness, "uniform_fitness": res.uniform.fitness, "search_wall_s": res.wall_s,
            "by_source": res.stats["by_source"], "tokens": res.stats["tokens"], "llm_answers": llm_answer_stats(recs),
            "proposer_model": res.stats["proposer_model"], "fitness_seconds_per_evaluation": fit,
            "generations_logged": len(recs) - 1, "complete": len(recs) >= generations + 1}


def summary_of(a, runs: list[dict], pairs: list[dict], ppl_dense, t_start: float, load_start,
               responses_shown: bool) -> dict:
    """The summary of what is measured so far: ``missing`` names each (ratio, seed) without a final pair yet."""
    from secateurs.result import versions

    done = {(p["ratio"], p["seed"]) for p in pairs}
    argv = [sys.executable, *sys.argv]
    return {
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " " + shlex.join(argv),
        "settings": {**vars(a), "calibration": "wiki (= wiki:calib), seed 0, the same for every run",
                     "eval": f"wiki:test, {a.eval_rows} rows of {a.seqlen} tokens", "rate_bounds": [0.0, 0.9, 0.01],
                     "llm": "temperature 0.7, top-k 40, retries 2", "model": a.model,
                     "responses_shown": responses_shown},
        "note": a.note, "ppl_test_dense": ppl_dense, "runs": runs, "pairs": pairs,
        "missing": [{"ratio": r, "seed": s} for r in a.ratios for s in a.seeds if (r, s) not in done],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_start": load_start,
                    "load_average_end": os.getloadavg(), "wall_s": time.time() - t_start,
                    "cpu_s_this_process": time.process_time()},
        "versions": versions(),
    }


def partial(a) -> None:
    """``--partial``: the summary of what OUT holds now (searches as logged, finished pairs) without loading a
    model or evaluating anything; the logs of a search still running are only read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from secateurs.importance.width import mean_rate_for_ratio
    from secateurs.models import get_adapter
    from secateurs.search.evolution import SearchSpace, restore
    from secateurs.sources import resolve

    out, t_start, load_start = Path(a.out), time.time(), os.getloadavg()
    with torch.device("meta"):  # the layer sizes only: no weights
        config = AutoConfig.from_pretrained(resolve(a.model, progress=False))
        spec = get_adapter(AutoModelForCausalLM.from_config(config)).spec()
    dense = out / "dense.json"
    ppl_dense = json.loads(dense.read_text())["ppl_test"] if dense.exists() else None
    runs, pairs = [], []
    cut = evaluations_in_llm_time(json.loads(Path(a.time_of).read_text())) if a.time_of else {}
    for ratio in a.ratios:
        space = SearchSpace(spec.n_layers, mean_rate_for_ratio(spec, ratio))
        for seed in a.seeds:
            logs = {}
            for name in run_names(vars(a)):
                log = out / f"{name}-r{ratio:g}-s{seed}" / "search.jsonl"
                got = restore(space, log)  # a running search's torn last line is left out
                if got is None:
                    continue
                res, recs = got
                runs.append(run_entry(name, ratio, seed, res, recs, None, a.generations))
                if runs[-1]["complete"]:
                    logs[name] = recs
            if len(logs) < len(run_names(vars(a))):
                continue
            budget = min([len(curve(r)) for r in logs.values()] + ([cut[(ratio, seed)]] if (ratio, seed) in cut else []))
            finals = {n: out / f"{n}-r{ratio:g}-s{seed}" / f"final-{budget}.json" for n in logs}
            if all(f.exists() for f in finals.values()):
                pairs.append({"ratio": ratio, "seed": seed, "budget": budget,
                              **{n: json.loads(f.read_text()) for n, f in finals.items()}})
    summary = summary_of(a, runs, pairs, ppl_dense, t_start, load_start, a.responses)
    summary["partial_read"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    write(summary, out, a.results)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--proposers", nargs="+", default=["classic", "local"], choices=["classic", "local"])
    p.add_argument("--proposer-model", default=None, help="the LLM: an embedded model's name or a GGUF chat model "
                   "file (default: the model itself, its offline GGUF)")
    p.add_argument("--formulations", nargs="+", default=["vectors/llm"], help="TASK/START of each LLM search: "
                   "TASK vectors or edits (--llm-task), START llm or uniform (--llm-start)")
    p.add_argument("--responses", action="store_true", help="show the LLM tell's cached per-block responses")
    p.add_argument("--name", default=None, help="stem of the files copied to --results (default "
                   "self-pruner-claim-MODEL)")
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--generations", type=int, default=5)
    p.add_argument("--crossover", type=int, default=4)
    p.add_argument("--mutation", type=int, default=4)
    p.add_argument("--nsamples", type=int, default=8, help="calibration rows (scores and the final sequential plan)")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--fitness-rows", type=int, default=2)
    p.add_argument("--eval-rows", type=int, default=16, help="wiki:test rows of --seqlen tokens")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default $OMP_NUM_THREADS)")
    p.add_argument("--results", default=None, help="also copy the summary, table and plot to this folder "
                   "(benchmarks/results) as NAME.json, NAME-table.md and NAME.png")
    p.add_argument("--note", default=None, help="what else ran on the machine (recorded in summary.json)")
    p.add_argument("--merge", nargs="+", metavar="SUMMARY", help="write OUT/summary.* (and --results) from the "
                   "summary.json files of several runs (other ratios or seeds) instead of searching")
    p.add_argument("--partial", action="store_true", help="only write OUT/summary.* of what OUT holds now (searches "
                   "as logged, finished pairs; a running search's log is only read), without loading the model")
    p.add_argument("--report", action="store_true", help="only rebuild summary.md and curves.png from OUT/summary.json")
    p.add_argument("--time-of", metavar="LLM_SUMMARY", help="cut each (ratio, seed) at the evaluations the LLM "
                   "searches of LLM_SUMMARY there would have bought in their wall time (for --time-matched)")
    p.add_argument("--time-matched", metavar="LLM_SUMMARY", help="only compare OUT's (longer) classic searches with "
                   "the LLM searches of LLM_SUMMARY at the LLM's wall time (OUT/time-matched.*)")
    a = p.parse_args()
    for f in a.formulations:
        if f.count("/") != 1 or f.split("/")[0] not in ("vectors", "edits") or f.split("/")[1] not in ("llm", "uniform"):
            p.error(f"--formulations: {f!r} is not TASK/START with TASK vectors or edits, START llm or uniform")
    if a.merge:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        return write(merge(a.merge, a.name), out, a.results)
    if a.report:
        return report(Path(a.out), a.results, a.note)
    if a.time_matched:
        return time_matched(Path(a.out), a.time_matched, a.results)
    if a.partial:
        return partial(a)

    import torch

    from secateurs.data import calib_rows, eval_rows
    from secateurs.eval.perplexity import perplexity
    from secateurs.importance.sequential import sequential_plan
    from secateurs.importance.width import mean_rate_for_ratio
    from secateurs.methods import PruneContext
    from secateurs.methods.self_pruner import MaskedFitness
    from secateurs.models import get_adapter
    from secateurs.sources import load_model
    from secateurs.search.evolution import EvolutionConfig, SearchSpace, evolve, read_log, restore
    from secateurs.methods.self_pruner import SelfPrunerConfig, check_proposer_memory, proposer_gguf
    from secateurs.methods.tell import dense_responses
    from secateurs.search.proposers import ClassicProposer, LlamaCppProposer
    from secateurs.surgery import apply_plan

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start, load_start = time.time(), os.getloadavg()
    torch.manual_seed(0)
    model, tok = load_model(a.model, progress=False)
    ad = get_adapter(model)
    spec = ad.spec()
    calib = calib_rows(tok, model, "wiki", a.nsamples, a.seqlen, 0)
    test = eval_rows(tok, model, "wiki:test", a.seqlen, a.eval_rows)
    ctx = PruneContext.build(model, calib, tokenizer=tok, workdir=out, progress=False, model_ref=a.model)
    masked = MaskedFitness(model, MaskedFitness.scores(ctx, a.batch_size), calib[: a.fitness_rows].clone(), a.batch_size)
    timed = {"seconds": 0.0, "n": 0}

    def fitness(rates):
        t0 = time.perf_counter()
        try:
            return masked(rates)
        finally:
            timed["seconds"] += time.perf_counter() - t0
            timed["n"] += 1

    responses = dense_responses(ctx) if a.responses else None
    if a.responses:
        print(f"tell's response cache: {'responses of ' + str(len(responses)) + ' blocks shown' if responses else 'none for this model and calibration'}")
    proposers = {}
    if "classic" in a.proposers:
        proposers["classic"] = ClassicProposer()
    if "local" in a.proposers:
        gguf, source = proposer_gguf(SelfPrunerConfig(proposer="local", proposer_model=a.proposer_model), ctx, print)
        check_proposer_memory(gguf, model)
        chat = None
        for f, name in zip(a.formulations, run_names(vars(a))[1 if "classic" in a.proposers else 0:]):
            task, start = f.split("/")
            proposers[name] = LlamaCppProposer(gguf, threads=a.threads, source=source, task=task, start=start,
                                               responses=responses, chat=chat)
            chat = proposers[name].model  # one model in memory for every formulation
    cfg = dict(population=a.population, generations=a.generations, crossover=a.crossover, mutation=a.mutation)
    cut = evaluations_in_llm_time(json.loads(Path(a.time_of).read_text())) if a.time_of else {}
    ppl_dense = perplexity(model, test, a.batch_size).ppl
    (out / "dense.json").write_text(json.dumps({"ppl_test": ppl_dense}))  # for --partial
    runs, pairs = [], []
    for ratio in a.ratios:
        space = SearchSpace(spec.n_layers, mean_rate_for_ratio(spec, ratio))
        for seed in a.seeds:
            logs = {}
            for name, prop in proposers.items():
                folder = out / f"{name}-r{ratio:g}-s{seed}"
                folder.mkdir(exist_ok=True)
                log = folder / "search.jsonl"
                timed.update(seconds=0.0, n=0)
                if len(read_log(log)) < a.generations + 1:
                    print(f"[{time.strftime('%H:%M:%S')}] {name} ratio {ratio} seed {seed}", flush=True)
                    evolve(space, fitness, prop, EvolutionConfig(**cfg, seed=seed), log,
                           log=lambda m: print("  " + m, flush=True))
                res, recs = restore(space, log)  # the search as logged, read once
                logs[name] = recs
                runs.append(run_entry(name, ratio, seed, res, recs, timed, a.generations))
            budget = min([len(curve(r)) for r in logs.values()] + ([cut[(ratio, seed)]] if (ratio, seed) in cut else []))
            pair = {"ratio": ratio, "seed": seed, "budget": budget}
            for name, recs in logs.items():
                cache = out / f"{name}-r{ratio:g}-s{seed}" / f"final-{budget}.json"
                rates, best = best_within(recs, budget)
                same = [f for f in sorted(cache.parent.glob("final-*.json")) if json.loads(f.read_text())["rates"] == rates]
                if cache.exists() or same:  # measured, at this cut or at another with the same best vector
                    pair[name] = json.loads((cache if cache.exists() else same[0]).read_text())
                    continue
                ctx.ratio = ratio
                plan = sequential_plan(ctx, rates, a.batch_size, "self-pruner")
                pruned = copy.deepcopy(model)
                apply_plan(pruned, plan, spec)
                final = {"rates": rates, "best_fitness": best, "evaluations": len(curve(recs)),
                         "ratio_achieved": plan.ratio(spec), "ppl_test": perplexity(pruned, test, a.batch_size).ppl}
                del pruned
                cache.write_text(json.dumps(final))
                pair[name] = final
            pairs.append(pair)
            print(f"[{time.strftime('%H:%M:%S')}] ratio {ratio} seed {seed} at E={budget}: "
                  + ", ".join(f"{n} fitness {pair[n]['best_fitness']:.2f} wiki:test {pair[n]['ppl_test']:.2f}" for n in logs),
                  flush=True)
            write(summary_of(a, runs, pairs, ppl_dense, t_start, load_start, bool(responses)), out, a.results)
    for prop in proposers.values():  # the formulations share one model, closed by the proposer that opened it
        prop.close()


if __name__ == "__main__":
    main()
