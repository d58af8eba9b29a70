"""Time per LLM proposal of the local proposer (a timing: run it on a quiet machine), and the usable-answer rate.

    OMP_NUM_THREADS=1 python benchmarks/self_pruner_proposal_time.py --json runs/sp-proposal-time.json
    OMP_NUM_THREADS=1 python benchmarks/self_pruner_proposal_time.py --generations 0 --population 3   # quick check

The model being pruned (SmolLM2-135M, its offline Q4_1 GGUF) proposes for a 30-layer search at a 20% ratio
(mean rate 0.253) with a population of 8: the same prompts, schemas and answer lengths as a real search. The
fitness is a synthetic function (a quadratic distance to a fixed vector, scaled like a perplexity), so only
the proposer's time is measured. Two samplers run the same search in turn, alternating per round:

- ``secateurs``: ``secateurs.llamacpp.chat.ChatModel`` (the grammar applied to the top-40 tokens, the whole
  vocabulary only when none of them is valid; KV prefix reuse);
- ``llama-cpp-python``: the binding's own ``create_chat_completion(grammar=...)`` (the grammar applied to the
  whole vocabulary at every token), same temperature, top-k 40, same schema.

Reported per sampler: seconds per answer (median and mean over all answers), seconds per completion token,
prompt and completion tokens per answer, and how many answers were usable without the classical fallback.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--generations", type=int, default=2)
    p.add_argument("--crossover", type=int, default=4)
    p.add_argument("--mutation", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (seeds) per sampler")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args()

    from llama_cpp import LlamaGrammar

    from secateurs.llamacpp.binding import quiet
    from secateurs.sources import embedded_gguf
    from secateurs.search.evolution import EvolutionConfig, SearchSpace, evolve
    from secateurs.search.proposers import LlamaCppProposer

    class BindingSampler(LlamaCppProposer):
        """The same proposer, decoding with llama-cpp-python's own grammar sampling."""

        def chat(self, messages, schema, seed, max_tokens):
            grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
            with quiet():
                r = self.model.llm.create_chat_completion(messages, grammar=grammar, temperature=self.temperature,
                                                          top_k=40, seed=seed, max_tokens=max_tokens)
            u = r["usage"]
            return r["choices"][0]["message"]["content"], {"prompt": u["prompt_tokens"], "completion": u["completion_tokens"]}

    gguf = embedded_gguf("smollm2-135m")
    samplers = {"secateurs": LlamaCppProposer(gguf, threads=a.threads), "llama-cpp-python": BindingSampler(gguf, threads=a.threads)}
    space = SearchSpace(30, 0.2533)
    target = space.repair([0.05 + 0.4 * i / 29 for i in range(30)])[0]
    fitness = lambda r: 20.0 + 400.0 * sum((x - t) ** 2 for x, t in zip(r, target))
    answers = {k: [] for k in samplers}
    load0 = os.getloadavg()
    for rnd in range(a.rounds):
        for name, prop in samplers.items():
            with tempfile.TemporaryDirectory() as tmp:
                evolve(space, fitness, prop, EvolutionConfig(a.population, a.generations, a.crossover, a.mutation, rnd),
                       Path(tmp) / "s.jsonl")
                for line in (Path(tmp) / "s.jsonl").read_text().splitlines():
                    rec = json.loads(line)
                    items = [x for x in rec["proposals"] if x["source"] != "uniform"] + ([rec["selection"]] if rec["selection"] else [])
                    answers[name] += [{"seconds": x["seconds"], "source": x["source"], **x["tokens"]} for x in items]
            print(f"round {rnd}: {name} done", flush=True)
    out = {"settings": {**vars(a), "model": str(gguf), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                        "load_average_start": load0, "load_average_end": os.getloadavg(),
                        "date": time.strftime("%Y-%m-%d %H:%M")}}
    for name, xs in answers.items():
        s = [x["seconds"] for x in xs]
        comp = sum(x["completion"] for x in xs)
        out[name] = {"answers": len(xs), "usable": sum(x["source"] != "fallback" for x in xs),
                     "seconds_per_answer_median": statistics.median(s), "seconds_per_answer_mean": statistics.mean(s),
                     "seconds_per_completion_token": sum(s) / comp,
                     "prompt_tokens_per_answer": sum(x["prompt"] for x in xs) / len(xs), "completion_tokens_per_answer": comp / len(xs)}
        print(name, json.dumps(out[name]))
    out["speedup_per_answer_median"] = out["llama-cpp-python"]["seconds_per_answer_median"] / out["secateurs"]["seconds_per_answer_median"]
    print("median time per answer, llama-cpp-python's sampler / secateurs':", f"{out['speedup_per_answer_median']:.2f}x")
    for prop in samplers.values():
        prop.close()
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
