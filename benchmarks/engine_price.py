"""The price of pruning for the engine you serve on: tell constrained to the plans vLLM holds (``--engine vllm``:
every query head kept) against tell unconstrained, each at its own measured speed in each engine.

Reads a trade-off run (``benchmarks/tradeoff.py``, its results JSON and run folders) that holds both variants at
the same budgets and calibration (their perplexities and PyTorch prefill speedups come from there), then times
every run folder of both variants in llama.cpp (``secateurs export --type T`` and ``secateurs bench`` against the
dense GGUF: prompt and generation tokens/s, alternated in one process) and in vLLM (``secateurs export --format
vllm --type f32``, then one vLLM process, ``benchmarks/vllm_speed_child.py``, measures the dense folder first
and last and every exported folder between: batch-1 prefill, batch-1 decode, 8 and 32 concurrent prompts).
An unconstrained plan that vLLM cannot hold (a layer with fewer query heads) is recorded with the export's
refusal instead of a speed.

Then every variant's perplexity is read off its own curve at equal measured speedups (``--at``; linear in log
perplexity between the two runs that bracket the speedup, as tradeoff.py does), per engine and measurement. The
price of ``--engine vllm`` at a speed: the constrained plan's perplexity in vLLM against the unconstrained
plan's in PyTorch and in llama.cpp at that speed; and, engine for engine, the two variants in PyTorch and in
llama.cpp.

Writes ``RESULTS/engine-price-<model>.md``, ``.json`` (settings, machine load, every row) and ``.png``.
Resumable: exports, ``bench-<type>.json`` files and the vLLM measurement (``WORK/engine-price/vllm-speed.json``,
redone with ``--remeasure``) are reused.

    PYTHONPATH=src python benchmarks/tradeoff.py --model smollm2-135m \\
        --methods "tell[assign=response,response-dtype=bfloat16,response-loss=kl,ratios=,as=tell-kl],\\
tell[assign=response,response-dtype=bfloat16,response-loss=kl,engine=vllm,ratios=,as=tell-kl-vllm]" \\
        --speedups 1.1,1.15,1.3,1.5,1.65 --eval-rows 16 --latency-reps 5 --name tradeoff-tell-engine-smollm2-135m
    PYTHONPATH=src python benchmarks/engine_price.py --tradeoff benchmarks/results/tradeoff-tell-engine-smollm2-135m.json
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_speed import machine_state  # noqa: E402
from tradeoff import at_speedup, cli  # noqa: E402
from vllm_speed import engine, ideal_flops, measure  # noqa: E402

# (engine, measurement, the key of a row's speedups, label)
CURVES = [("pytorch", "prefill", "pytorch_prefill", "PyTorch prefill"),
          ("llama.cpp", "prefill", "llamacpp_prefill", "llama.cpp prompt"),
          ("llama.cpp", "decode", "llamacpp_decode", "llama.cpp generation"),
          ("vllm", "prefill", "vllm_prefill", "vLLM prefill"),
          ("vllm", "decode", "vllm_decode", "vLLM decode"),
          ("vllm", "throughput", "vllm_throughput_32", "vLLM 32 prompts")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tradeoff", required=True, help="results JSON of a tradeoff.py run that holds both variants")
    p.add_argument("--unconstrained", default="tell-kl", help="the trade-off's label of tell without --engine")
    p.add_argument("--constrained", default="tell-kl-vllm", help="the trade-off's label of tell --engine vllm")
    p.add_argument("--work", default=None, help="the trade-off's run folders (default: its settings' work/model)")
    p.add_argument("--gguf-type", default="q8_0", help="llama.cpp's weight type (dense and pruned alike)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--batch-prompt", type=int, default=64)
    p.add_argument("--batch-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--at", default="1.15,1.3,1.5", help="speedups at which each curve's perplexity is read")
    p.add_argument("--remeasure", action="store_true", help="time every folder again (llama.cpp and vLLM)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    trade = json.loads(Path(a.tradeoff).read_text())
    ts = trade["settings"]
    model = ts["model"]
    work = Path(a.work) if a.work else Path(ts["work"]) / model
    here = work / "engine-price"
    here.mkdir(parents=True, exist_ok=True)
    log = here / "commands.log"
    rows = [r for r in trade["rows"] if r["method"] in (a.unconstrained, a.constrained)]
    if not rows or {r["method"] for r in rows} != {a.unconstrained, a.constrained}:
        raise SystemExit(f"engine_price: {a.tradeoff} needs rows of both {a.unconstrained!r} and {a.constrained!r}; "
                         f"it has {sorted({r['method'] for r in trade['rows']})}")
    missing = [r["folder"] for r in rows if not (work / r["folder"] / "model.safetensors").exists()]
    if missing:
        raise SystemExit(f"engine_price: no weights in {work} for {', '.join(missing)}: run the trade-off there "
                         "without --drop-weights")
    before, t0 = machine_state(), time.time()
    threads = ["--threads", os.environ.get("OMP_NUM_THREADS", "1")]

    dense_gguf = here / f"dense-{a.gguf_type}.gguf"
    if not dense_gguf.exists():
        cli(["export", model, "--type", a.gguf_type, "--out", str(dense_gguf), "--quiet", *threads], log)
    dense_vllm = here / "dense-vllm"
    if not dense_vllm.exists():
        cli(["export", model, "--format", "vllm", "--type", "f32", "--out", str(dense_vllm), "--quiet"], log)

    for r in rows:
        folder = work / r["folder"]
        gg, bj = folder / f"model-{a.gguf_type}.gguf", folder / f"bench-{a.gguf_type}.json"
        if not gg.exists():
            cli(["export", str(folder), "--type", a.gguf_type, "--out", str(gg), "--quiet", *threads], log)
        if a.remeasure or not bj.exists():
            print(f"engine_price: {r['folder']}: llama.cpp ({time.time() - t0:.0f}s elapsed)", flush=True)
            cli(["bench", str(gg), "--against", str(dense_gguf), "--prompt-len", str(a.prompt_len),
                 "--decode-tokens", str(a.decode_tokens), "--reps", str(max(a.reps, 3)), "--warmup", str(a.warmup),
                 "--seed", str(ts["seed"]), "--quiet", *threads, "--json", str(bj)], log)
        b = json.loads(bj.read_text())
        r["llamacpp"] = {"speedup": b["speedup"], "ideal": b["ideal_speedup"]}
        r["llamacpp_prefill"], r["llamacpp_decode"] = b["speedup"]["prefill"], b["speedup"]["decode"]
        r["pytorch_prefill"] = r["speedup"]
        vdir = folder / "vllm"
        if not (vdir / "config.json").exists():
            refused = folder / "vllm-refused.txt"
            if not refused.exists():
                env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
                p = subprocess.run([sys.executable, "-m", "secateurs", "export", str(folder), "--format", "vllm",
                                    "--type", "f32", "--out", str(vdir), "--quiet"], capture_output=True, text=True,
                                   env=env)
                if p.returncode == 2:  # a plan vLLM cannot hold: the refusal is the result
                    refused.write_text(p.stderr.strip().splitlines()[-1])
                elif p.returncode != 0:
                    raise SystemExit(f"engine_price: export of {folder} failed ({p.returncode}): {p.stderr.strip()}")
            if refused.exists():
                r["vllm_refused"] = refused.read_text().strip()
    held = [r for r in rows if "vllm_refused" not in r]
    speed_path = here / "vllm-speed.json"
    names = [str(dense_vllm)] + [str(work / r["folder"] / "vllm") for r in held] + [str(dense_vllm)]
    speed = json.loads(speed_path.read_text()) if speed_path.exists() and not a.remeasure else None
    if speed is None or [s["folder"] for s in speed] != names:
        print(f"engine_price: {len(names)} folders in vLLM ({time.time() - t0:.0f}s elapsed)", flush=True)
        speed = measure(names, a, ts["seed"], here, speed_path, log)
    d0, d1 = speed[0], speed[-1]
    for r, s in zip(held, speed[1:-1]):
        r["vllm"] = s
        r["vllm_prefill"] = d0["prefill_s"] / s["prefill_s"]
        r["vllm_decode"] = s["decode_tokens_per_s"] / d0["decode_tokens_per_s"]
        r["vllm_throughput_32"] = s["throughput_32_tokens_per_s"] / d0["throughput_32_tokens_per_s"]
    ideal = argparse.Namespace(prompt_len=a.prompt_len, decode_tokens=a.decode_tokens, batch_prompt=a.batch_prompt,
                               batch_tokens=a.batch_tokens)
    fd = ideal_flops(Path(model), ideal)
    for r in rows:
        f = ideal_flops(work / r["folder"], ideal)
        r["ideal_vllm"] = {k: fd[k] / f[k] for k in fd}
    targets = [float(x) for x in a.at.split(",") if x]
    at = {}
    for variant in (a.unconstrained, a.constrained):
        for _, _, key, lab in CURVES:
            pts = [(r[key], r["ppl"]) for r in rows if r["method"] == variant and key in r]
            if pts:
                at[f"{variant} @ {lab}"] = [at_speedup(pts, t) for t in targets]
    dense_ppl = next(r["ppl"] for r in trade["rows"] if r["method"] == "dense")
    out = {"command": "PYTHONPATH=src python benchmarks/engine_price.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "settings": {**vars(a), "tradeoff_settings": ts}, "machine_before": before, "machine_after": machine_state(),
           "seconds": time.time() - t0, "dense_ppl": dense_ppl, "vllm_dense": [d0, d1], "rows": rows,
           "at_speedups": targets, "at": at}
    Path(a.results).mkdir(parents=True, exist_ok=True)
    md = Path(a.results) / f"engine-price-{model}.md"  # with its suffix: a model name may hold a dot
    md.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    write_table(out, md)
    plot(out, md.with_suffix(".png"))
    print(f"engine_price: wrote {md}, .json and .png ({time.time() - t0:.0f}s)")
    return 0


def short(refusal: str) -> str:
    """The export's refusal up to its reason (the JSON keeps it whole)."""
    return refusal.removeprefix("secateurs: error: ").split(" (vLLM's")[0].split("; ")[0]


def write_table(out: dict, path: Path) -> None:
    a, ts = out["settings"], out["settings"]["tradeoff_settings"]
    u, c = a["unconstrained"], a["constrained"]
    d0, d1 = out["vllm_dense"]
    x = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    lines = [f"# The price of `--engine vllm`: {ts['model']}", "", f"Command: `{out['command']}`", "",
             f"- Plans and perplexities: the trade-off run `{a['tradeoff']}` (calibration `{ts['calib']}` "
             f"{ts['nsamples']} x {ts['seqlen']}, seed {ts['seed']}; `{ts['eval_set']}` {ts['eval_rows']} x "
             f"{ts['eval_seqlen']}, dense {out['dense_ppl']:.2f}); `{u}` is tell unconstrained, `{c}` the same with "
             "`--engine vllm`.",
             f"- PyTorch: the trade-off's prefill speedup (float32, {ts['latency_len']} tokens, {ts['clock']} clock, "
             f"{ts['latency_reps']} alternated pairs).",
             f"- llama.cpp: `secateurs bench` {a['gguf_type']} against the dense {a['gguf_type']}, prompt of "
             f"{a['prompt_len']} tokens and {a['decode_tokens']} generated, alternated in one process, medians.",
             f"- vLLM: {engine(d0)}, float32, eager, prefix caching off: batch-1 prefill of {a['prompt_len']} tokens, "
             f"batch-1 decode ({a['decode_tokens']} tokens), 32 concurrent prompts of {a['batch_prompt']} tokens "
             f"generating {a['batch_tokens']}; medians of {a['reps']} after {a['warmup']} warm-up; the dense folder "
             f"first and last (drift: prefill {d0['prefill_s'] * 1000:.0f} -> {d1['prefill_s'] * 1000:.0f} ms, "
             f"decode {d0['decode_tokens_per_s']:.1f} -> {d1['decode_tokens_per_s']:.1f} tok/s).",
             f"- OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}. Machine before: load "
             f"{out['machine_before']['loadavg']}; after: {out['machine_after']['loadavg']}. Busy at the start: "
             + ("; ".join(f"`{b}`" for b in out["machine_before"]["busy"]) or "none") + ".", "",
             "## Every plan", "",
             "| variant | budget | ratio | ppl | PyTorch prefill | llama.cpp prompt / gen | vLLM prefill / decode / "
             "32 prompts (ideal prefill) |", "|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        v = (f"{x(r['vllm_prefill'])} / {x(r['vllm_decode'])} / {x(r['vllm_throughput_32'])} "
             f"({x(r['ideal_vllm']['prefill'])})" if "vllm" in r else "cannot hold: " + short(r.get("vllm_refused", "?")))
        lines.append(f"| {r['method']} | {r['budget']} | {r['ratio']:.3f} | {r['ppl']:.2f} | {x(r['pytorch_prefill'])} | "
                     f"{x(r['llamacpp_prefill'])} / {x(r['llamacpp_decode'])} | {v} |")
    lines += ["", "## Perplexity at equal measured speedup", "",
              "Each variant's perplexity read off its own curve in that engine and measurement (log-linear between "
              "the two runs that bracket the speedup; '-' outside its runs).", "",
              "| variant @ engine, measurement | " + " | ".join(f"{t:g}x" for t in out["at_speedups"]) + " |",
              "|---|" + "---|" * len(out["at_speedups"])]
    for k, vals in out["at"].items():
        lines.append(f"| {k} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in vals) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = out["settings"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    styles = {"pytorch_prefill": "-o", "llamacpp_prefill": "--s", "vllm_prefill": ":^"}
    for variant, color in ((a["unconstrained"], "tab:blue"), (a["constrained"], "tab:orange")):
        for _, _, key, lab in CURVES:
            if key not in styles:
                continue
            pts = sorted((r[key], r["ppl"]) for r in out["rows"] if r["method"] == variant and key in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[key], color=color, label=f"{variant}, {lab}")
    ax.axhline(out["dense_ppl"], color="black", lw=0.8, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("measured prefill speedup against the dense model in the same engine")
    ax.set_ylabel(f"{a['tradeoff_settings']['eval_set']} perplexity (log)")
    ax.set_title(f"{a['tradeoff_settings']['model']}: tell unconstrained vs --engine vllm, per engine")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
