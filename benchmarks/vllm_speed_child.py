"""Run by benchmarks/vllm_speed.py with the vLLM venv's python (make vllm): the speed of each folder of a job
in vLLM, one engine after another in this process.

Usage: python benchmarks/vllm_speed_child.py JOB.json RESULT.json. JOB: {"folders": [...], "dtype",
"prompt_len", "decode_tokens", "batches": [8, 32], "batch_prompt", "batch_tokens", "reps", "warmup", "seed"}.
Prompts are random token ids (a new draw for every request, prefix caching off), so nothing is reused.
"""
import gc
import json
import random
import statistics
import sys
import time


def engine() -> dict:
    """vLLM's version and the device it ran on (the GPU's name, or the CPU)."""
    import torch
    import vllm

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"vllm": vllm.__version__, "device": device}


def measure(folder: str, job: dict) -> dict:
    from vllm import LLM, SamplingParams

    rng = random.Random(job["seed"])
    t0 = time.perf_counter()
    llm = LLM(folder, dtype=job["dtype"], enforce_eager=True, trust_remote_code=True, seed=job["seed"],
              max_model_len=job["prompt_len"] + job["decode_tokens"] + 16, enable_prefix_caching=False)
    load_s = time.perf_counter() - t0
    vocab = llm.llm_engine.model_config.get_vocab_size()

    def prompts(n: int, length: int) -> list:
        return [{"prompt_token_ids": [rng.randrange(100, vocab - 100) for _ in range(length)]} for _ in range(n)]

    def timed(ps, tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(ps, params, use_tqdm=False)
        return time.perf_counter() - t

    def median(fn) -> float:
        for _ in range(job["warmup"]):
            fn()
        return statistics.median(fn() for _ in range(job["reps"]))

    out = {"load_s": load_s, **engine()}
    out["prefill_s"] = median(lambda: timed(prompts(1, job["prompt_len"]), 1))
    d = job["decode_tokens"]
    short = median(lambda: timed(prompts(1, 16), 1))
    long = median(lambda: timed(prompts(1, 16), d))
    out["decode_tokens_per_s"] = (d - 1) / (long - short)
    for n in job["batches"]:
        s = median(lambda: timed(prompts(n, job["batch_prompt"]), job["batch_tokens"]))
        out[f"throughput_{n}_tokens_per_s"] = n * job["batch_tokens"] / s
    del llm
    gc.collect()
    return out


if __name__ == "__main__":
    job = json.load(open(sys.argv[1]))
    result = []  # in job order (a folder may come twice: the dense one first and last, to see the drift)
    for folder in job["folders"]:
        result.append({"folder": folder, **measure(folder, job)})
        print(f"vllm_speed_child: {result[-1]}", flush=True)
    json.dump(result, open(sys.argv[2], "w"), indent=1)
