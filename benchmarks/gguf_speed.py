"""The speedup a llama.cpp user gets: pruned GGUF files against the dense GGUF, measured side by side.

For each method (default: blockpruner from the saved removal order, flap, sleb, tell, all at ratio 0.25 of
SmolLM2-135M): ``secateurs prune`` (same calibration for all), ``secateurs export --type T`` for every type
(default q8_0 and q4_k_m; the dense model too), then ``secateurs bench PRUNED.gguf --against DENSE.gguf``:
prompt tokens/s (one batch of ``--prompt-len`` tokens) and generation tokens/s (``--decode-tokens`` greedy
tokens after it), alternating dense and pruned rounds in one process, same threads and type, medians;
peak memory in a fresh process each. Beside the measured speedup: the ideal one (dense FLOPs / pruned
FLOPs, from the plan's sizes; docs/gguf.md), and the measured share of it.

Writes ``RESULTS/gguf-speed-<model>.md`` and ``.json`` with the command, the settings, and what else was
running on the machine (load average and the busiest other processes, before and after). Resumable: run
folders with ``result.json``, files that exist and ``bench-<type>.json`` are reused (``--rebench`` measures
again).

    PYTHONPATH=src python benchmarks/gguf_speed.py                      # the full measurement (quiet machine)
    PYTHONPATH=src python benchmarks/gguf_speed.py --methods flap --nsamples 2 --seqlen 32 \\
        --prompt-len 32 --decode-tokens 8 --reps 1 --warmup 0 --types q8_0 --work /tmp/gguf-speed-tiny
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tradeoff import cli, folders, label, parse_method  # noqa: E402  (same run conventions as the trade-off benchmark)

ORDER = "benchmarks/results/order-smollm2-135m-16x256-fp32.json"


def machine_state() -> dict:
    """Load average and the busiest processes other than this benchmark (what else was running)."""
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    ps = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    mine = {str(os.getpid())}
    busy = [ln.strip()[:160] for ln in ps.splitlines()[1:]
            if ln.split()[0] not in mine and float(ln.split()[1]) >= 5.0][:8]
    return {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg": load, "cpus": os.cpu_count(), "busy": busy}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default=f"blockpruner[from-order={ORDER},as=blockpruner],flap,sleb,tell[assign=uniform,as=tell]",
                   help="comma-separated; NAME[opt=value] passes options (default: %(default)s)")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--types", default="q8_0,q4_k_m")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--calib", default="wiki")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: OMP_NUM_THREADS, else all cores)")
    p.add_argument("--flash-attn", action="store_true", help="llama.cpp's flash attention (bench-fa-<type>.json)")
    p.add_argument("--work", default=str(ROOT / "runs" / "gguf-speed"), help="run folders and GGUF files")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--rebench", action="store_true", help="measure every pair again")
    p.add_argument("--prepare-only", action="store_true",
                   help="prune and export only (safe under load); run again without it on a quiet machine to time")
    a = p.parse_args(argv)

    work, results, log = folders(a)
    types = [t for t in a.types.split(",") if t]
    threads = ["--threads", str(a.threads)] if a.threads else []
    before = machine_state()
    t0 = time.time()

    def export(src: str, out: Path, t: str) -> None:
        if not out.exists():
            cli(["export", src, "--type", t, "--out", str(out), "--quiet", *threads], log)

    for t in types:
        export(a.model, work / f"dense-{t}.gguf", t)
    common = ["--calib", a.calib, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--seed", str(a.seed),
              "--eval", "", "--device", "cpu", "--quiet"]
    rows = []
    for spec in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", a.methods):
        name, opts = parse_method(spec)
        lab = label(name, opts)
        folder = work / f"{lab}-ratio{a.ratio:g}"
        if not (folder / "result.json").exists():
            print(f"gguf_speed: {lab}: pruning ({time.time() - t0:.0f}s elapsed)", flush=True)
            extra = [x for k, v in opts.items() if k != "as" for x in (f"--{k}", v)]
            cli(["prune", a.model, "--method", name, "--ratio", str(a.ratio), *common, *extra, "--out", str(folder),
                 "--overwrite"], log)
        result = json.loads((folder / "result.json").read_text())
        for t in types:
            gg = folder / f"model-{t}.gguf"
            export(str(folder), gg, t)
            bj = folder / f"bench-{'fa-' if a.flash_attn else ''}{t}.json"
            if a.prepare_only:
                continue
            if a.rebench or not bj.exists():
                print(f"gguf_speed: {lab} {t}: measuring ({time.time() - t0:.0f}s elapsed)", flush=True)
                cli(["bench", str(gg), "--against", str(work / f"dense-{t}.gguf"), "--prompt-len", str(a.prompt_len),
                     "--decode-tokens", str(a.decode_tokens), "--reps", str(a.reps), "--warmup", str(a.warmup),
                     "--seed", str(a.seed), "--quiet", *threads, *(["--flash-attn"] if a.flash_attn else []),
                     "--json", str(bj)], log)
            b = json.loads(bj.read_text())
            rows.append({"method": lab, "type": t, "ratio": result["ratio_achieved"], "arch": b["arch"],
                         "removed": result["removed_blocks"], "bench": b})
            print(f"gguf_speed: {lab} {t}: prompt {b['speedup']['prefill']:.2f}x (ideal {b['ideal_speedup']['prefill']:.2f}x), "
                  f"generation {b['speedup']['decode']:.2f}x (ideal {b['ideal_speedup']['decode']:.2f}x)", flush=True)
    if a.prepare_only:
        print(f"gguf_speed: plans and GGUF files ready in {work} ({time.time() - t0:.0f}s); time them without --prepare-only")
        return 0
    after = machine_state()
    out = {"command": "PYTHONPATH=src python benchmarks/gguf_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "settings": vars(a), "machine_before": before, "machine_after": after, "seconds": time.time() - t0,
           "rows": rows}
    stem = results / f"gguf-speed-{a.model}{'-fa' if a.flash_attn else ''}"
    Path(f"{stem}.json").write_text(json.dumps(out, indent=1))
    write_table(out, Path(f"{stem}.md"))
    print(f"gguf_speed: wrote {stem}.md and .json ({time.time() - t0:.0f}s)")
    return 0


def write_table(out: dict, path: Path) -> None:
    a = out["settings"]
    rows = out["rows"]
    s0 = rows[0]["bench"]["settings"] if rows else {}
    lines = [
        f"# Pruned GGUF against dense GGUF in llama.cpp: {a['model']}",
        "",
        f"Command: `{out['command']}`",
        "",
        f"- Plans: ratio {a['ratio']} (papers' definition), calibration `{a['calib']}` {a['nsamples']} rows of "
        f"{a['seqlen']} tokens, seed {a['seed']}.",
        f"- llama.cpp (llama-cpp-python), CPU, threads: {s0.get('threads', '?')}, flash attention "
        f"{'on' if a['flash_attn'] else 'off'}, batch 1: prompt = one batch of "
        f"{a['prompt_len']} random tokens from an empty cache; generation = {a['decode_tokens']} greedy tokens after it. "
        f"Dense and pruned alternate in one process, {a['warmup']} warm-up rounds dropped, medians of {a['reps']}.",
        "- Ideal speedup: dense FLOPs / pruned FLOPs from the plan's sizes (matmuls and attention; the export's zero "
        "padding and minimal FFNs count as overhead). Share = measured / ideal.",
        f"- Machine before: load {out['machine_before']['loadavg']} on {out['machine_before']['cpus']} CPUs; after: "
        f"load {out['machine_after']['loadavg']}. Other busy processes at the start: "
        + ("; ".join(f"`{b}`" for b in out["machine_before"]["busy"]) or "none") + ".",
        "",
        "| method | type | ratio | arch | prompt tok/s dense / pruned | prompt speedup (ideal, share) | "
        "gen tok/s dense / pruned | gen speedup (ideal, share) | MiB dense / pruned | peak MiB dense / pruned |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, d = r["bench"], r["bench"]["against"]
        sp, ideal = b["speedup"], b["ideal_speedup"]
        mem = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        lines.append(
            f"| {r['method']} | {r['type']} | {r['ratio']:.3f} | {r['arch']} | "
            f"{d['prompt_tokens_per_s']:.0f} / {b['prompt_tokens_per_s']:.0f} | "
            f"{sp['prefill']:.2f}x ({ideal['prefill']:.2f}x, {sp['prefill'] / ideal['prefill']:.0%}) | "
            f"{d['decode_tokens_per_s']:.1f} / {b['decode_tokens_per_s']:.1f} | "
            f"{sp['decode']:.2f}x ({ideal['decode']:.2f}x, {sp['decode'] / ideal['decode']:.0%}) | "
            f"{d['file_bytes'] / 2**20:.0f} / {b['file_bytes'] / 2**20:.0f} | {mem(d['peak_memory_mb'])} / {mem(b['peak_memory_mb'])} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
