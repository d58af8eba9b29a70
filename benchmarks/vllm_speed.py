"""The speed a vLLM user gets: pruned folders against the dense one in a real vLLM (``make vllm``), in turn.

For each method at each ratio (default: blockpruner from the saved removal order, and flap with ``--engine
vllm``, at 0.15 and 0.25 of SmolLM2-135M): ``secateurs prune ... --export vllm --export-type f32``; the dense
model: ``secateurs export MODEL --format vllm --type f32``. One vLLM process (benchmarks/vllm_speed_child.py,
in .venv-vllm) then measures every folder in turn, the dense one first and last (its drift shows the noise):
batch-1 prefill of ``--prompt-len`` tokens (one request with max_tokens 1), batch-1 decode tokens/s (from
``--decode-tokens`` and 1-token requests on a 16-token prompt), and throughput on 8 and 32 concurrent prompts
(``--batch-prompt`` tokens each, ``--batch-tokens`` generated). Float32, eager, prefix caching off, random
prompts, medians of ``--reps`` after ``--warmup``.

On a GPU (``--device cuda --dtype bfloat16``, with SECATEURS_VLLM_PYTHON naming the python of an environment
where ``pip install vllm`` put a CUDA vLLM): the pruning runs on the GPU and vLLM serves bfloat16 folders; the
child records vLLM's version and device. Expected on an H100/H200: about 10 minutes for SmolLM2 and 15 for the
1.5B (the prunes take seconds there; most of it is vLLM's engine starts, one per folder).

Ideal = dense FLOPs / pruned FLOPs (``secateurs.eval.bench.model_flops`` on the pruned model: matmuls and
attention from the plan's sizes), per measurement; share = measured / ideal. Writes
``RESULTS/vllm-speed-<model>.md`` and ``.json`` with the command, the settings and the machine's load.

    PYTHONPATH=src python benchmarks/vllm_speed.py                               # the full measurement
    PYTHONPATH=src python benchmarks/vllm_speed.py --ratios 0.25 --methods flap[engine=vllm] --reps 1 --warmup 0
    SECATEURS_VLLM_PYTHON=~/vllm/bin/python PYTHONPATH=src python benchmarks/vllm_speed.py --device cuda \
        --dtype bfloat16 --model qwen2.5-coder-1.5b --results benchmarks/results/gpu
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
from gguf_speed import ORDER, machine_state  # noqa: E402
from tradeoff import cli, folders, label, parse_method  # noqa: E402

VLLM_PYTHON = Path(os.environ.get("SECATEURS_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
CHILD = Path(__file__).with_name("vllm_speed_child.py")
EXPORT_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}  # vLLM's dtype -> the export's --type


def ideal_flops(folder: Path, a) -> dict:
    """FLOPs of each measurement for the model of ``folder`` (a pruned secateurs folder or an embedded name)."""
    import torch

    from secateurs.eval.bench import model_flops
    from secateurs.sources import load_model

    torch.set_num_threads(1)
    model, _ = load_model(str(folder), device="cpu", progress=False)
    prefill, _ = model_flops(model, a.prompt_len)
    _, decode = model_flops(model, 16 + a.decode_tokens // 2)
    b_prefill, b_decode = model_flops(model, a.batch_prompt + a.batch_tokens // 2)
    b_first, _ = model_flops(model, a.batch_prompt)
    return {"prefill": prefill, "decode": decode, "throughput": b_first + a.batch_tokens * b_decode}


def measure(names: list[str], a, seed: int, where: Path, result: Path, log: Path, dtype: str = "float32") -> list[dict]:
    """Every folder of ``names`` timed in turn in one vLLM process (``vllm_speed_child.py`` in the vLLM venv, the
    job written to ``where/job.json``, its output to ``result``; ``a``: prompt_len, decode_tokens, batch_prompt,
    batch_tokens, reps, warmup; ``dtype``: vLLM's); the list of the child's measurements, in order."""
    job = {"folders": names, "dtype": dtype, "prompt_len": a.prompt_len, "decode_tokens": a.decode_tokens,
           "batches": [8, 32], "batch_prompt": a.batch_prompt, "batch_tokens": a.batch_tokens, "reps": a.reps,
           "warmup": a.warmup, "seed": seed}
    (where / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with open(log, "a") as f:
        r = subprocess.run([str(VLLM_PYTHON), str(CHILD), str(where / "job.json"), str(result)], env=env,
                           stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"{Path(sys.argv[0]).stem}: vLLM failed ({r.returncode}), see {log}")
    return json.loads(result.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default=f"blockpruner[from-order={ORDER},as=blockpruner],flap[engine=vllm,as=flap-vllm]")
    p.add_argument("--ratios", default="0.15,0.25")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--calib", default="wiki")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--batch-prompt", type=int, default=64)
    p.add_argument("--batch-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where the pruning runs: cpu or cuda (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=sorted(EXPORT_TYPES), help="the folders' tensors and vLLM's "
                   "dtype (default: %(default)s; bfloat16 on a GPU)")
    p.add_argument("--work", default=str(ROOT / "runs" / "vllm-speed"))
    p.add_argument("--prepare-only", action="store_true", help="prune and export only (the timing can then run on a "
                   "quiet machine)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    if not VLLM_PYTHON.exists():
        raise SystemExit(f"vllm_speed: {VLLM_PYTHON} is missing: run `make vllm`")
    work, results, log = folders(a)
    before = machine_state()
    t0 = time.time()
    dense = work / "dense-vllm"
    if not dense.exists():
        cli(["export", a.model, "--format", "vllm", "--type", EXPORT_TYPES[a.dtype], "--out", str(dense), "--quiet"],
            log)
    common = ["--calib", a.calib, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--seed", str(a.seed),
              "--eval", "", "--device", a.device, "--quiet", "--export", "vllm", "--export-type", EXPORT_TYPES[a.dtype]]
    runs = []
    for ratio in (float(r) for r in a.ratios.split(",") if r):
        for spec in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", a.methods):
            name, opts = parse_method(spec)
            folder = work / f"{label(name, opts)}-ratio{ratio:g}"
            if not (folder / "result.json").exists():
                print(f"vllm_speed: {folder.name}: pruning ({time.time() - t0:.0f}s elapsed)", flush=True)
                extra = [x for k, v in opts.items() if k != "as" for x in (f"--{k}", v)]
                cli(["prune", a.model, "--method", name, "--ratio", str(ratio), *common, *extra, "--out", str(folder),
                     "--overwrite"], log)
            runs.append((label(name, opts), folder, json.loads((folder / "result.json").read_text())))
    if a.prepare_only:
        print(f"vllm_speed: folders ready in {work} ({time.time() - t0:.0f}s); time them without --prepare-only")
        return 0
    flops = {"dense": ideal_flops(Path(a.model), a)}
    for lab, folder, _ in runs:
        flops[folder.name] = ideal_flops(folder, a)
    names = [str(dense)] + [str(f / "vllm") for _, f, _ in runs] + [str(dense)]
    print(f"vllm_speed: measuring {len(names)} folders in vLLM ({time.time() - t0:.0f}s elapsed)", flush=True)
    speed = measure(names, a, a.seed, work, work / "speed.json", log, a.dtype)
    out = {"command": "PYTHONPATH=src python benchmarks/vllm_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "settings": vars(a), "machine_before": before, "machine_after": machine_state(),
           "seconds": time.time() - t0, "dense": [speed[0], speed[-1]], "flops": flops,
           "dense_architecture": json.loads((dense / "config.json").read_text())["architectures"][0],
           "rows": [{"method": lab, "folder": folder.name, "ratio": res["ratio_achieved"],
                     "architecture": res["vllm"]["architecture"], "speed": s}
                    for (lab, folder, res), s in zip(runs, speed[1:-1])]}
    md = results / f"vllm-speed-{a.model}.md"  # with its suffix: a model name may hold a dot (qwen2.5-...)
    md.with_suffix(".json").write_text(json.dumps(out, indent=1))
    write_table(out, md)
    print(f"vllm_speed: wrote {md} and .json ({time.time() - t0:.0f}s)")
    return 0


def engine(m: dict) -> str:
    """vLLM's version and device as the child measured them (results before it recorded them: the CPU build)."""
    return f"vllm {m['vllm']} on {m['device']}" if "vllm" in m else "vllm-cpu 0.32.0 (`make vllm`)"


MEASURES = [("prefill", "prefill_s", True), ("decode", "decode_tokens_per_s", False),
            ("throughput", "throughput_8_tokens_per_s", False), ("throughput", "throughput_32_tokens_per_s", False)]


def write_table(out: dict, path: Path) -> None:
    a, d0, d1 = out["settings"], out["dense"][0], out["dense"][1]
    lines = [f"# Pruned against dense in vLLM: {a['model']}", "", f"Command: `{out['command']}`", "",
             f"- vLLM: {engine(d0)}, {a.get('dtype', 'float32')}, eager, prefix caching off, OMP_NUM_THREADS="
             f"{os.environ.get('OMP_NUM_THREADS', '1')}; random prompts; medians of {a['reps']} after {a['warmup']} warm-up.",
             f"- prefill: one request of {a['prompt_len']} tokens, max_tokens 1 (ms); decode: batch-1 tokens/s after a "
             f"16-token prompt ({a['decode_tokens']} tokens); throughput: 8 and 32 concurrent prompts of {a['batch_prompt']} "
             f"tokens, {a['batch_tokens']} generated each (tokens/s).",
             "- Speedup against the dense folder measured first; the dense one measured last shows the drift: "
             + ", ".join(f"{k} {d0[k]:.4g} -> {d1[k]:.4g}" for _, k, _ in MEASURES) + ".",
             "- Ideal = dense FLOPs / pruned FLOPs (secateurs.eval.bench.model_flops), share = speedup / ideal.",
             f"- Machine before: load {out['machine_before']['loadavg']} on {out['machine_before']['cpus']} CPUs; after: "
             f"load {out['machine_after']['loadavg']}. Busy at the start: "
             + ("; ".join(f"`{b}`" for b in out["machine_before"]["busy"]) or "none") + ".", "",
             "| plan | ratio | vLLM model | prefill ms | prefill speedup (ideal, share) | decode tok/s | decode speedup "
             "(ideal, share) | 8 prompts tok/s | speedup (ideal, share) | 32 prompts tok/s | speedup (ideal, share) |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| dense | 0 | {out.get('dense_architecture', 'LlamaForCausalLM')} | " + " | ".join(
                 f"{d0[k] * (1000 if inv else 1):.1f} | 1.00x" for _, k, inv in MEASURES) + " |"]
    fd = out["flops"]["dense"]
    for r in out["rows"]:
        s, f = r["speed"], out["flops"][r["folder"]]
        cells = []
        for kind, k, inv in MEASURES:
            sp = d0[k] / s[k] if inv else s[k] / d0[k]
            ideal = fd[kind] / f[kind]
            cells.append(f"{s[k] * (1000 if inv else 1):.1f} | {sp:.2f}x ({ideal:.2f}x, {sp / ideal:.0%})")
        lines.append(f"| {r['method']} | {r['ratio']:.3f} | {r['architecture']} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
