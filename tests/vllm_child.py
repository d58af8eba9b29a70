"""Run by tests/test_vllm.py with the vLLM venv's python (make vllm), never imported by pytest: greedy tokens
and their log-probabilities from vLLM for every folder of a job, in one process (one engine after another).

Usage: python tests/vllm_child.py JOB.json RESULT.json, where JOB is {"cases": [{"folder", "prompts": [[token
ids]], "tokens", "dtype", "skip_tokenizer_init"}]} and RESULT gets, per folder, one {"tokens", "logprobs", "load_s"} per prompt.
vLLM starts its workers by spawn, hence the ``__main__`` guard.
"""
import gc
import json
import sys
import time


def run_case(case: dict) -> list[dict]:
    from vllm import LLM, SamplingParams

    bare = case.get("skip_tokenizer_init", False)  # a folder without a tokenizer (the tests' random models)
    t0 = time.perf_counter()
    llm = LLM(case["folder"], dtype=case["dtype"], enforce_eager=True, max_model_len=case.get("max_model_len", 512), trust_remote_code=True,
              seed=0, skip_tokenizer_init=bare)
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=case["tokens"], ignore_eos=True, logprobs=1,
                            detokenize=not bare)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in case["prompts"]], params, use_tqdm=False)
    rows = []
    for o in outs:
        c = o.outputs[0]
        rows.append({"tokens": list(c.token_ids), "load_s": load_s,
                     "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]})
    del llm
    gc.collect()
    return rows


if __name__ == "__main__":
    job = json.load(open(sys.argv[1]))
    result = {case["folder"]: run_case(case) for case in job["cases"]}
    json.dump(result, open(sys.argv[2], "w"))
