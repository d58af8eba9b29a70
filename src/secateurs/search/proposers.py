"""Who proposes the search's vectors: the ``Proposer`` interface and its three implementations.

- ``ClassicProposer``: the ordinary numeric genetic operators (random initial vectors around the mean,
  tournament selection, per-layer uniform crossover, Gaussian mutation). The control experiment, and the
  fallback of the LLM proposers.
- ``OpenAIProposer``: any OpenAI-compatible chat endpoint (vLLM, llama.cpp server, Ollama, hosted APIs).
- ``LocalProposer``: a chat model loaded in-process with transformers (default: the embedded SmolLM2).

An LLM proposer performs each operator by a chat request: the prompt shows the task, the constraint, the
population with its fitness (best first) and asks for JSON. Rates appear in prompts and answers as percents.
The answer is parsed strictly as JSON (``json`` module; the first JSON value in the text, so a code fence
around it is accepted; nothing is ever evaluated as code), validated (shape, numbers, indices), repaired
(clip to the bounds, project onto the mean: ``SearchSpace.repair``) or retried; after the retries the
classical operator fills in and the proposal is marked ``fallback``. Failed attempts keep their reason in
the log. A transport error (connection refused, HTTP error) counts as a failed attempt.
"""
from __future__ import annotations

import json
import os
import random
from typing import Callable

from ..errors import UserError
from .evolution import Individual, InvalidAnswer, Proposal, SearchSpace, Selection


class Proposer:
    """The four operators of the evolutionary loop."""

    name = "proposer"

    def initial(self, space: SearchSpace, n: int, rng: random.Random) -> list[Proposal]:
        raise NotImplementedError

    def select(self, space: SearchSpace, population: list[Individual], n_cross: int, n_mut: int, rng: random.Random) -> Selection:
        raise NotImplementedError

    def crossover(self, space: SearchSpace, population: list[Individual], i: int, j: int, rng: random.Random) -> Proposal:
        """A child of ``population[i]`` and ``population[j]`` (the population is sorted, best first)."""
        raise NotImplementedError

    def mutate(self, space: SearchSpace, population: list[Individual], i: int, rng: random.Random) -> Proposal:
        raise NotImplementedError


class ClassicProposer(Proposer):
    name = "classic"

    def __init__(self, spread: float = 0.1, mutation_sigma: float = 0.05, mutation_prob: float = 0.3, tournament: int = 3):
        self.spread, self.sigma, self.prob, self.tournament = spread, mutation_sigma, mutation_prob, tournament

    def _made(self, space, rates, op) -> Proposal:
        return Proposal(space.repair(rates)[0], op, "classic")

    def initial(self, space, n, rng):
        return [self._made(space, [space.mean + rng.gauss(0, self.spread) for _ in range(space.n)], "init") for _ in range(n)]

    def pick(self, population, rng) -> int:
        """Tournament: the best (lowest index = best fitness) of ``tournament`` random members."""
        return min(rng.sample(range(len(population)), min(self.tournament, len(population))))

    def select(self, space, population, n_cross, n_mut, rng):
        pairs = []
        for _ in range(n_cross):
            a = self.pick(population, rng)
            b = self.pick(population, rng)
            pairs.append((a, b))
        return Selection(pairs, [self.pick(population, rng) for _ in range(n_mut)])

    def crossover(self, space, population, i, j, rng):
        a, b = population[i].rates, population[j].rates
        return self._made(space, [x if rng.random() < 0.5 else y for x, y in zip(a, b)], "crossover")

    def mutate(self, space, population, i, rng):
        x = list(population[i].rates)
        genes = [i for i in range(space.n) if rng.random() < self.prob] or [rng.randrange(space.n)]
        for i in genes:
            x[i] += rng.gauss(0, self.sigma)
        return self._made(space, x, "mutation")


# --- LLM proposers ----------------------------------------------------------------------------------------

SYSTEM = ("You are the optimizer of an evolutionary search. You answer with one JSON object and nothing else.")


def first_json(text: str):
    """The first JSON object or array in ``text`` (strict JSON; surrounding prose or a code fence is skipped)."""
    dec = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                return dec.raw_decode(text, i)[0]
            except json.JSONDecodeError:
                continue
    raise InvalidAnswer("no JSON object in the answer")


def _pct(rates) -> str:
    return "[" + ", ".join(f"{100 * r:.0f}" for r in rates) + "]"


class LLMProposer(Proposer):
    """Builds the prompts, parses, validates, repairs and retries; subclasses only implement ``chat``."""

    def __init__(self, retries: int = 2, temperature: float = 0.7, max_tokens: int = 400, show: int = 8,
                 fallback: ClassicProposer | None = None):
        self.retries, self.temperature, self.max_tokens, self.show = retries, temperature, max_tokens, show
        self.fallback = fallback or ClassicProposer()

    def chat(self, messages: list[dict], seed: int, max_tokens: int, prefix: str = "") -> tuple[str, dict]:
        """Returns the answer text and token counts ``{"prompt": n, "completion": m}``. ``prefix`` is the
        opening of the JSON answer; a proposer may start the answer with it (a response prefix) or ignore it."""
        raise NotImplementedError

    # --- prompts ----------------------------------------------------------------------------------------
    def task(self, space: SearchSpace) -> str:
        return (f"Task: a language model with {space.n} layers must be pruned. A plan gives each layer a pruning "
                f"rate in percent (layer 0 first): the share of that layer's attention heads and MLP channels "
                f"that is removed. Constraint: a plan has exactly {space.n} rates, each between "
                f"{100 * space.low:.0f} and {100 * space.high:.0f}, and their mean must be {100 * space.mean:.1f}. "
                f"Fitness is the perplexity of the pruned model on calibration text: lower is better.")

    def table(self, population: list[Individual]) -> str:
        return "\n".join(f"#{i} fitness {p.fitness:.3f}: {_pct(p.rates)}" for i, p in enumerate(population[: self.show]))

    def rates_format(self, space) -> str:
        return f'Answer with JSON only: {{"rates": [...]}} where the list holds exactly {space.n} numbers, one per layer.'

    # --- the ask / validate / repair / retry / fallback cycle -----------------------------------------
    def ask(self, prompt: str, parse: Callable, rng: random.Random, max_tokens: int, prefix: str = ""):
        """(value, attempts, errors, tokens); value is None when every attempt failed."""
        errors, tokens = [], {"prompt": 0, "completion": 0}
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        for attempt in range(1, self.retries + 2):
            try:
                text, used = self.chat(messages, rng.randrange(2**31), min(max_tokens, self.max_tokens), prefix)
            except Exception as e:  # transport or server failure: a failed attempt, never a crash
                errors.append(f"request failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            for k in tokens:
                tokens[k] += int(used.get(k, 0))
            try:
                return parse(first_json(text)), attempt, errors, tokens
            except InvalidAnswer as e:
                errors.append(f"{e}; answer began {text[:120]!r}")
        return None, self.retries + 1, errors, tokens

    def rates_answer(self, space: SearchSpace, prompt: str, op: str, rng, fallback: Callable[[], Proposal]) -> Proposal:
        def parse(obj):
            raw = obj.get("rates") if isinstance(obj, dict) else obj
            return space.check(raw)

        pct, attempts, errors, tokens = self.ask(prompt + "\n" + self.rates_format(space), parse, rng, 5 * space.n + 40,
                                                 '{"rates": [')
        if pct is None:
            p = fallback()
            p.source, p.attempts, p.errors, p.tokens = "fallback", attempts, errors, tokens
            return p
        rates, repairs = space.repair([x / 100 for x in pct])
        return Proposal(rates, op, "llm-repaired" if repairs else "llm", [], attempts, repairs, errors, tokens)

    # --- the operators ------------------------------------------------------------------------------------
    def initial(self, space, n, rng):
        out = []
        for _ in range(n):
            shown = "\n".join(_pct(p.rates) for p in out[-self.show:]) or "(none yet)"
            prompt = (f"{self.task(space)}\nWrite one new plan for the initial population. Make it different from "
                      f"the plans already written, for example prune some layers more and others less.\n"
                      f"Plans already written:\n{shown}")
            out.append(self.rates_answer(space, prompt, "init", rng, lambda: self.fallback.initial(space, 1, rng)[0]))
        return out

    def select(self, space, population, n_cross, n_mut, rng):
        n = len(population)

        def parse(obj):
            if not isinstance(obj, dict):
                raise InvalidAnswer('expected {"crossover": [[i, j], ...], "mutation": [k, ...]}')
            pairs, singles = obj.get("crossover", []), obj.get("mutation", [])
            ok = lambda i: isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and all(map(ok, p)) for p in pairs):
                raise InvalidAnswer(f"crossover must be a list of [i, j] pairs of indices in 0..{n - 1}")
            if not isinstance(singles, list) or not all(map(ok, singles)):
                raise InvalidAnswer(f"mutation must be a list of indices in 0..{n - 1}")
            if (n_cross and not pairs) or (n_mut and not singles):
                raise InvalidAnswer("no parents chosen")
            return [tuple(p) for p in pairs], list(singles)

        prompt = (f"{self.task(space)}\nPopulation (best first):\n{self.table(population)}\n"
                  f"Choose parents for the next generation: {n_cross} pairs to cross over and {n_mut} plans to "
                  f"mutate, by their # number. Prefer good plans but keep some variety.\n"
                  f'Answer with JSON only, for example {{"crossover": [[0, 1], [2, 0]], "mutation": [1, 3]}} but '
                  f'with {n_cross} pairs and {n_mut} numbers.')
        got, attempts, errors, tokens = self.ask(prompt, parse, rng, 10 * (n_cross + n_mut) + 40, '{"crossover": [[')
        classic = self.fallback.select(space, population, n_cross, n_mut, rng)
        if got is None:
            return Selection(classic.pairs, classic.singles, "fallback", attempts, [], errors, tokens)
        pairs, singles = got
        repairs = []
        if len(pairs) != n_cross or len(singles) != n_mut:  # wrong counts: cut, or fill in classically
            repairs.append(f"got {len(pairs)} pairs and {len(singles)} mutations, wanted {n_cross} and {n_mut}; "
                           "cut or filled in by tournament selection")
            pairs = (pairs + classic.pairs)[:n_cross]
            singles = (singles + classic.singles)[:n_mut]
        return Selection(pairs, singles, "llm-repaired" if repairs else "llm", attempts, repairs, errors, tokens)

    def crossover(self, space, population, i, j, rng):
        a, b = population[i], population[j]
        prompt = (f"{self.task(space)}\nPopulation (best first):\n{self.table(population)}\n"
                  f"Crossover: combine parent A (#{i}) and parent B (#{j}) into one child plan that keeps the good "
                  f"parts of both.\nA (fitness {a.fitness:.3f}): {_pct(a.rates)}\nB (fitness {b.fitness:.3f}): {_pct(b.rates)}")
        return self.rates_answer(space, prompt, "crossover", rng, lambda: self.fallback.crossover(space, population, i, j, rng))

    def mutate(self, space, population, i, rng):
        a = population[i]
        prompt = (f"{self.task(space)}\nPopulation (best first):\n{self.table(population)}\n"
                  f"Mutation: change a few rates of plan #{i} to explore nearby plans (raise some, lower others by "
                  f"the same total).\nPlan #{i} (fitness {a.fitness:.3f}): {_pct(a.rates)}")
        return self.rates_answer(space, prompt, "mutation", rng, lambda: self.fallback.mutate(space, population, i, rng))


class OpenAIProposer(LLMProposer):
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint. The key comes from ``OPENAI_API_KEY`` only (a
    local server needs none); it is never logged or saved."""

    name = "openai"

    def __init__(self, base_url: str | None, model: str | None, timeout: float = 120.0, **kw):
        super().__init__(**kw)
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        model = model or os.environ.get("SECATEURS_LLM_MODEL")
        if not base_url or not model:
            raise UserError("--proposer openai needs --llm-base-url (or $OPENAI_BASE_URL) and --llm-model "
                            "(or $SECATEURS_LLM_MODEL); the key, if any, is read from $OPENAI_API_KEY")
        try:
            from openai import OpenAI
        except ImportError as e:
            raise UserError("--proposer openai needs the openai package (pip install 'secateurs[openai]')") from e
        self.model = model
        self.client = OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY") or "none",
                             timeout=timeout, max_retries=1)

    def chat(self, messages, seed, max_tokens, prefix=""):  # no response prefix: not every server supports one
        r = self.client.chat.completions.create(model=self.model, messages=messages, temperature=self.temperature,
                                                max_tokens=max_tokens, seed=seed)
        text = (r.choices[0].message.content or "") if r.choices else ""
        u = r.usage
        return text, {"prompt": getattr(u, "prompt_tokens", 0) or 0, "completion": getattr(u, "completion_tokens", 0) or 0}


class LocalProposer(LLMProposer):
    """A chat model run in-process with transformers (an embedded name, a folder or a hub id)."""

    name = "local"

    def __init__(self, model_name: str | None = None, device: str = "cpu", **kw):
        super().__init__(**kw)
        from ..models import load_model

        self.model, self.tok = load_model(model_name or "smollm2-135m", device=device, progress=False)
        if not getattr(self.tok, "chat_template", None):
            raise UserError(f"the local proposer model {model_name!r} has no chat template; use an instruct model")

    def chat(self, messages, seed, max_tokens, prefix=""):
        """The answer starts with ``prefix`` (a response prefix: a small model then only has to continue the
        JSON); a rate vector's answer stops at its closing bracket."""
        import torch

        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prefix
        ids = self.tok(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        torch.manual_seed(seed)
        stop = {"stop_strings": ["]"], "tokenizer": self.tok} if prefix.endswith("[") and not prefix.endswith("[[") else {}
        with torch.inference_mode():
            out = self.model.generate(**ids, max_new_tokens=max_tokens, do_sample=self.temperature > 0,
                                      temperature=self.temperature or None, top_p=0.95,
                                      pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id, **stop)
        n_in = ids["input_ids"].shape[1]
        new = out[0, n_in:]
        answer = prefix + self.tok.decode(new, skip_special_tokens=True)
        if stop and answer.rstrip().endswith("]"):
            answer = answer.rstrip() + "}"
        return answer, {"prompt": n_in, "completion": int(new.numel())}


def make_proposer(kind: str, *, llm_model=None, llm_base_url=None, retries=2, temperature=0.7, max_tokens=400,
                  device="cpu") -> Proposer:
    kw = dict(retries=retries, temperature=temperature, max_tokens=max_tokens)
    if kind == "classic":
        return ClassicProposer()
    if kind == "openai":
        return OpenAIProposer(llm_base_url, llm_model, **kw)
    if kind == "local":
        return LocalProposer(llm_model, device=device, **kw)
    raise UserError(f"unknown proposer {kind!r}; choose openai, local or classic")
