"""Who proposes the search's vectors: the ``Proposer`` interface and its three implementations.

- ``ClassicProposer``: the ordinary numeric genetic operators (random initial vectors around the mean,
  tournament selection, per-layer uniform crossover, Gaussian mutation). The control experiment, and the
  fallback of the LLM proposers.
- ``LlamaCppProposer`` (``--proposer local``): a GGUF chat model run in-process by llama.cpp
  (``secateurs.llamacpp.chat.ChatModel``), every answer decoded under its JSON schema's grammar.
- ``OpenAIProposer`` (``--proposer openai``): any OpenAI-compatible chat endpoint (vLLM, llama.cpp's servers,
  Ollama, hosted APIs), asked for structured output where it takes it.

An LLM proposer performs each operator by a chat request. The prompt shows one screen (``search.screen``: the
task, the rules with the mean stated as the sum the rates must keep, the best evaluated plans with their
fitness, what the last generations changed, and tell's measured per-layer responses when cached), then the
operator; no example answer (a small model copies one). Rates appear in prompts and answers as whole percents.
What is asked (``--llm-task``): ``vectors``, a whole rate vector per child; or ``edits``, 2 to ``EDITS``
``{"layer", "rate"}`` changes to the child's parent (the first parent of a crossover, the uniform plan for the
first population), applied to it before the projection. Who writes the first population (``--llm-start``):
``llm``, or ``uniform``: the classic operators' perturbations of the uniform rates, the LLM taking over from the
first selection.

The answer's JSON schema (``rates_schema``, ``edits_schema``, ``selection_schema``) is exact: a fixed-length list of integers
from an ``enum`` (the rates' percent range; for selection the population's indices). The same schema is the
grammar of the local proposer (llama.cpp's converter turns ``enum`` and ``minItems = maxItems`` into exact
rules) and the ``response_format`` sent to an endpoint. No schema language can state the mean, so after
decoding every rate vector is **projected** (``SearchSpace.repair``): for rates within the bounds that is the
Euclidean projection onto {bounds, mean} (every rate shifted by one constant, clipped; the constant found by
bisection), then rounded to the grid keeping the sum. ``projected`` marks an answer the projection changed,
and ``answer`` keeps the rates as the LLM wrote them.

Every answer is still parsed strictly as JSON (``json`` module; the first JSON value in the text, so a code
fence around it is accepted; nothing is ever evaluated as code) and validated (shape, numbers, indices): an
endpoint may ignore ``response_format``. Out-of-bounds rates are clipped and a selection with the wrong
number of parents cut or filled in (``llm-repaired``); an unusable answer is retried; after the retries the
classical operator fills in (``fallback``). Failed attempts keep their reason in the log.

An endpoint that does not answer (timeout, dropped connection, HTTP 5xx or 429) is not a bad answer: the
request is repeated, with a message, until it answers or ``wait`` seconds have passed; then the search stops
with ``EndpointDown`` (a user error) and the same command resumes it from ``search.jsonl``.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError
from .evolution import Individual, InvalidAnswer, Proposal, SearchSpace, Selection
from .screen import Screen, pct, pct_bounds, pct_sum

TASKS = ("vectors", "edits")  # --llm-task: an answer is a whole rate vector, or a few edits of its parent
STARTS = ("llm", "uniform")  # --llm-start: the LLM writes the first population, or the classic perturbations
EDITS = 8  # the most layers one edits answer may change


class Proposer:
    """The four operators of the evolutionary loop."""

    name = "proposer"

    def observe(self, records: list[dict]) -> None:
        """The search log's generation records so far, given before every generation (an LLM is shown them)."""

    def initial(self, space: SearchSpace, n: int, rng: random.Random) -> list[Proposal]:
        raise NotImplementedError

    def select(self, space: SearchSpace, population: list[Individual], n_cross: int, n_mut: int, rng: random.Random) -> Selection:
        raise NotImplementedError

    def crossover(self, space: SearchSpace, population: list[Individual], i: int, j: int, rng: random.Random) -> Proposal:
        """A child of ``population[i]`` and ``population[j]`` (the population is sorted, best first)."""
        raise NotImplementedError

    def mutate(self, space: SearchSpace, population: list[Individual], i: int, rng: random.Random) -> Proposal:
        raise NotImplementedError

    def describe(self) -> dict:
        """Who proposes (recorded in search.jsonl and result.json)."""
        return {"kind": self.name}

    def close(self) -> None:
        pass


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


# --- the answers' schemas ---------------------------------------------------------------------------------

def _int_list(values: range, n: int) -> dict:
    return {"type": "array", "items": {"type": "integer", "enum": list(values)}, "minItems": n, "maxItems": n}


def rates_schema(space: SearchSpace) -> dict:
    """``{"rates": [n whole percents within the bounds]}``."""
    lo, hi = pct_bounds(space)
    return {"type": "object", "properties": {"rates": _int_list(range(lo, hi + 1), space.n)},
            "required": ["rates"], "additionalProperties": False}


def edits_schema(space: SearchSpace) -> dict:
    """``{"edits": [2 to EDITS {"layer": index, "rate": whole percent within the bounds}]}``."""
    lo, hi = pct_bounds(space)
    edit = {"type": "object", "properties": {"layer": {"type": "integer", "enum": list(range(space.n))},
                                             "rate": {"type": "integer", "enum": list(range(lo, hi + 1))}},
            "required": ["layer", "rate"], "additionalProperties": False}
    return {"type": "object", "properties": {"edits": {"type": "array", "items": edit, "minItems": 2,
                                                       "maxItems": min(EDITS, space.n)}},
            "required": ["edits"], "additionalProperties": False}


def selection_schema(n_pop: int, n_cross: int, n_mut: int) -> dict:
    """``{"crossover": [n_cross pairs of indices], "mutation": [n_mut indices]}``, indices in ``0..n_pop-1``."""
    pair = _int_list(range(n_pop), 2)
    cross = {"type": "array", "items": pair, "minItems": n_cross, "maxItems": n_cross}
    return {"type": "object", "properties": {"crossover": cross, "mutation": _int_list(range(n_pop), n_mut)},
            "required": ["crossover", "mutation"], "additionalProperties": False}


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


# --- LLM proposers ----------------------------------------------------------------------------------------

SYSTEM = ("You are the optimizer of an evolutionary search over pruning plans for a language model. You answer "
          "with one JSON object and nothing else.")


@dataclass
class Asked:
    """The outcome of one request cycle (all attempts)."""

    value: object = None  # the parsed answer; None when every attempt failed
    attempts: int = 0
    errors: list = field(default_factory=list)
    tokens: dict = field(default_factory=lambda: {"prompt": 0, "completion": 0})
    seconds: float = 0.0
    endpoint_errors: list = field(default_factory=list)


class LLMProposer(Proposer):
    """Builds the prompts, parses, validates, projects, retries; subclasses only implement ``chat``."""

    def __init__(self, retries: int = 2, temperature: float = 0.7, max_tokens: int = 1024, show: int = 8,
                 fallback: ClassicProposer | None = None, task: str = "vectors", start: str = "llm",
                 responses: dict | None = None):
        if task not in TASKS or start not in STARTS:
            raise UserError(f"--llm-task is one of {', '.join(TASKS)} and --llm-start one of {', '.join(STARTS)} "
                            f"(got {task!r}, {start!r})")
        self.retries, self.temperature, self.max_tokens = retries, temperature, max_tokens
        self.task_kind, self.start = task, start
        self.screen = Screen(show, responses=responses)
        self.fallback = fallback or ClassicProposer()
        self.endpoint_errors: list[str] = []  # what went wrong on the way during the current request

    def observe(self, records):
        self.screen.observe(records)

    def formulation(self) -> dict:
        """What the LLM is asked and shown (recorded with the proposer)."""
        return {"task": self.task_kind, "start": self.start, "responses_shown": bool(self.screen.responses)}

    def chat(self, messages: list[dict], schema: dict, seed: int, max_tokens: int) -> tuple[str, dict]:
        """The answer text and token counts ``{"prompt": n, "completion": m}``; ``schema`` is the answer's JSON
        schema (a proposer constrains the decoding to it where it can)."""
        raise NotImplementedError

    # --- prompts (what is shown: ``search.screen``) --------------------------------------------------------
    def population_text(self, space, population) -> str:
        return self.screen.population(space, population)

    def rates_format(self, space) -> str:
        return (f'Answer with a JSON object whose only key "rates" holds a list of exactly {space.n} whole '
                f'numbers, one per layer.')

    def edits_format(self, space, parent: list[float]) -> str:
        return (f'Answer with a JSON object whose only key "edits" holds a list of 2 to {min(EDITS, space.n)} '
                f'changes, each {{"layer": a layer number from 0 to {space.n - 1}, "rate": its new rate}}; the '
                f'layers you do not list keep their rate. The plan you change adds up to {round(100 * sum(parent))}; '
                f'after your changes the rates must still add up to {pct_sum(space)}: lower some layers by as much '
                f'as you raise others.')

    # --- the ask / validate / retry cycle -----------------------------------------------------------------
    def ask(self, prompt: str, schema: dict, parse: Callable, rng: random.Random, max_tokens: int) -> Asked:
        out = Asked()
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        for attempt in range(1, self.retries + 2):
            out.attempts = attempt
            t0 = time.perf_counter()
            self.endpoint_errors = []
            text = ""
            try:
                text, used = self.chat(messages, schema, rng.randrange(2**31), min(max_tokens, self.max_tokens))
                for k in out.tokens:
                    out.tokens[k] += int(used.get(k, 0))
                out.value = parse(first_json(text))
                return out
            except InvalidAnswer as e:
                out.errors.append(f"{e}; answer began {text[:120]!r}")
            finally:
                out.seconds += time.perf_counter() - t0
                out.endpoint_errors += self.endpoint_errors
        return out

    def rates_answer(self, space: SearchSpace, prompt: str, op: str, rng, fallback: Callable[[], Proposal],
                     parent: list[float] | None = None) -> Proposal:
        """A whole rate vector, or (``--llm-task edits``, given the ``parent``) a few layers' new rates applied
        to the parent; then clipped and projected onto the mean like any vector."""
        def parse_vector(obj):
            raw = obj.get("rates") if isinstance(obj, dict) else obj
            rates = space.check(raw)
            return rates, [int(x) if x == int(x) else x for x in rates]

        def parse_edits(obj):
            edits = obj.get("edits") if isinstance(obj, dict) else obj
            if not isinstance(edits, list) or not edits:
                raise InvalidAnswer('expected an object whose key "edits" holds a list of {"layer", "rate"} changes')
            x, written = [100 * r for r in parent], []
            for e in edits:
                layer, rate = (e.get("layer"), e.get("rate")) if isinstance(e, dict) else (None, None)
                if not (isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < space.n):
                    raise InvalidAnswer(f"every edit needs a layer number from 0 to {space.n - 1}")
                if not (isinstance(rate, (int, float)) and not isinstance(rate, bool) and math.isfinite(rate)):
                    raise InvalidAnswer("every edit needs a finite rate")
                x[layer] = rate
                written.append([layer, int(rate) if rate == int(rate) else rate])
            return x, written

        if parent is None:
            got = self.ask(prompt + "\n" + self.rates_format(space), rates_schema(space), parse_vector, rng,
                           8 * space.n + 40)
        else:
            got = self.ask(prompt + "\n" + self.edits_format(space, parent), edits_schema(space), parse_edits, rng,
                           16 * min(EDITS, space.n) + 40)
        if got.value is None:
            p = fallback()
            p.source = "fallback"
        else:
            vector, written = got.value
            decoded = [x / 100 for x in vector]
            rates, notes = space.repair(decoded)
            clipped = [min(max(r, space.low), space.high) for r in decoded]
            repairs = [n for n in notes if n.startswith("clipped")]
            p = Proposal(rates, op, "llm-repaired" if repairs else "llm", repairs=repairs, answer=written,
                         projected=space.key(rates) != space.key(clipped))
        p.attempts, p.errors, p.tokens = got.attempts, got.errors, got.tokens
        p.seconds, p.endpoint_errors = got.seconds, got.endpoint_errors
        return p

    # --- the operators ------------------------------------------------------------------------------------
    def initial(self, space, n, rng):
        if self.start == "uniform":  # the classic operators' first population: perturbations of the uniform rates
            return self.fallback.initial(space, n, rng)
        out = []
        lo, hi = pct_bounds(space)
        uniform = space.uniform()
        head = "\n".join(x for x in (self.screen.task(space), self.screen.response_lines()) if x)
        for _ in range(n):
            shown = "\n".join(pct(p.rates) for p in out[-self.screen.show:]) or "(none yet)"
            if self.task_kind == "edits":
                prompt = (f"{head}\nThe first population is being written by changing the uniform plan in a few "
                          f"layers. The uniform plan: {pct(uniform)}\nPlans written so far (not evaluated yet):\n"
                          f"{shown}\nChange the uniform plan into a new plan, different from these: prune some "
                          f"layers more and others less, anywhere between {lo} and {hi}.")
                parent = uniform
            else:
                prompt = (f"{head}\nThe first population is being written; the uniform plan (every layer at "
                          f"{100 * space.mean:.1f}) is already in it. Plans written so far (not evaluated yet):\n"
                          f"{shown}\nWrite one new plan, different from these: prune some layers more and others "
                          f"less, anywhere between {lo} and {hi}.")
                parent = None
            out.append(self.rates_answer(space, prompt, "init", rng, lambda: self.fallback.initial(space, 1, rng)[0],
                                         parent))
        return out

    def select(self, space, population, n_cross, n_mut, rng):
        n = len(population)

        def parse(obj):
            if not isinstance(obj, dict):
                raise InvalidAnswer('expected an object with the keys "crossover" and "mutation"')
            pairs, singles = obj.get("crossover", []), obj.get("mutation", [])
            ok = lambda i: isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and all(map(ok, p)) for p in pairs):
                raise InvalidAnswer(f"crossover must be a list of [i, j] pairs of indices in 0..{n - 1}")
            if not isinstance(singles, list) or not all(map(ok, singles)):
                raise InvalidAnswer(f"mutation must be a list of indices in 0..{n - 1}")
            if (n_cross and not pairs) or (n_mut and not singles):
                raise InvalidAnswer("no parents chosen")
            return [tuple(p) for p in pairs], list(singles)

        shown = min(n, self.screen.show)
        prompt = (f"{self.population_text(space, population)}"
                  f"Choose the parents of the next generation by their # number (0 to {shown - 1}): {n_cross} pairs "
                  f"of plans to cross over and {n_mut} plans to mutate. Prefer plans with a low fitness, but keep "
                  f"some variety.\nAnswer with a JSON object with two keys: \"crossover\", a list of {n_cross} "
                  f"pairs of plan numbers, and \"mutation\", a list of {n_mut} plan numbers.")
        got = self.ask(prompt, selection_schema(shown, n_cross, n_mut), parse, rng, 12 * (n_cross + n_mut) + 40)
        classic = self.fallback.select(space, population, n_cross, n_mut, rng)
        extra = dict(attempts=got.attempts, errors=got.errors, tokens=got.tokens, seconds=got.seconds,
                     endpoint_errors=got.endpoint_errors)
        if got.value is None:
            return Selection(classic.pairs, classic.singles, "fallback", **extra)
        pairs, singles = got.value
        repairs = []
        if len(pairs) != n_cross or len(singles) != n_mut:  # wrong counts: cut, or fill in classically
            repairs.append(f"got {len(pairs)} pairs and {len(singles)} mutations, wanted {n_cross} and {n_mut}; "
                           "cut or filled in by tournament selection")
            pairs = (pairs + classic.pairs)[:n_cross]
            singles = (singles + classic.singles)[:n_mut]
        return Selection(pairs, singles, "llm-repaired" if repairs else "llm", repairs=repairs, **extra)

    def crossover(self, space, population, i, j, rng):
        a, b = population[i], population[j]
        edits = self.task_kind == "edits"
        how = (f"change parent A where parent B looks better: the child is A with the changes you list (for "
               f"instance B's rate on some layers, or a value between them)" if edits else
               "combine them into one child plan that keeps the good parts of both (layer by layer, the rate of "
               "either parent or a value between them)")
        prompt = (f"{self.population_text(space, population)}"
                  f"Crossover of parent A (#{i}) and parent B (#{j}): {how}.\n"
                  f"A (fitness {a.fitness:.3f}): {pct(a.rates)}\nB (fitness {b.fitness:.3f}): {pct(b.rates)}")
        return self.rates_answer(space, prompt, "crossover", rng, lambda: self.fallback.crossover(space, population, i, j, rng),
                                 a.rates if edits else None)

    def mutate(self, space, population, i, rng):
        a = population[i]
        edits = self.task_kind == "edits"
        how = ("change plan #{i} in a few layers to explore nearby plans" if edits else
               "write a plan close to plan #{i} that explores nearby plans: raise the rates of a few layers and "
               "lower others by the same total").format(i=i)
        prompt = (f"{self.population_text(space, population)}"
                  f"Mutation: {how}.\nPlan #{i} (fitness {a.fitness:.3f}): {pct(a.rates)}")
        return self.rates_answer(space, prompt, "mutation", rng, lambda: self.fallback.mutate(space, population, i, rng),
                                 a.rates if edits else None)


class LlamaCppProposer(LLMProposer):
    """A GGUF chat model in llama.cpp; every answer is decoded under its schema's grammar."""

    name = "local"

    def __init__(self, gguf_path, threads: int | None = None, source: str = "", chat=None, **kw):
        """``chat``: a ``ChatModel`` of that file already open (another proposer's: it stays open when this one
        closes)."""
        super().__init__(**kw)
        from ..llamacpp.chat import ChatModel

        self.shared = chat is not None
        self.model = chat if chat is not None else ChatModel(gguf_path, threads=threads)
        self.source = source  # how the file was chosen (recorded)

    def chat(self, messages, schema, seed, max_tokens):
        r = self.model.complete(messages, schema, self.temperature, seed, max_tokens)
        return r.text, {"prompt": r.prompt_tokens, "completion": r.completion_tokens}

    def describe(self):
        return {"kind": self.name, "engine": "llama.cpp", "constraint": "grammar from the JSON schema",
                "source": self.source, **self.model.describe(), **self.formulation()}

    def close(self):
        if not self.shared:
            self.model.close()


class EndpointDown(UserError):
    """The endpoint did not answer within the wait."""


STRUCTURED = ("json_schema", "json_object+schema", "none")  # the response_format forms tried, in order


class OpenAIProposer(LLMProposer):
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint. The key comes from ``OPENAI_API_KEY`` only (a
    local server needs none); it is never logged or saved. Structured output is asked for with the OpenAI form
    (``{"type": "json_schema", ...}``); an endpoint that refuses it (HTTP 400/422) is asked with llama.cpp's
    form (``{"type": "json_object", "schema": ...}``), then without; the form that worked is kept and recorded."""

    name = "openai"
    first_delay = 1.0  # seconds before the first retry of an endpoint that did not answer (doubling, up to 30)

    def __init__(self, base_url: str | None, model: str | None = None, timeout: float = 120.0, wait: float = 600.0,
                 say: Callable[[str], None] | None = None, **kw):
        super().__init__(**kw)
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise UserError("--proposer openai needs --endpoint URL (alias --llm-base-url; or $OPENAI_BASE_URL), "
                            "e.g. http://127.0.0.1:8000/v1; the key, if any, is read from $OPENAI_API_KEY")
        try:
            import openai
        except ImportError as e:
            raise UserError("--proposer openai needs the openai package (pip install 'secateurs[openai]')") from e
        self.openai, self.base_url, self.timeout, self.wait = openai, base_url.rstrip("/"), timeout, wait
        self.model = model or os.environ.get("SECATEURS_LLM_MODEL")  # None: the endpoint's first model
        self.client = openai.OpenAI(base_url=self.base_url, api_key=os.environ.get("OPENAI_API_KEY") or "none",
                                    timeout=timeout, max_retries=0)
        self.say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.form = 0  # index into STRUCTURED

    def describe(self):
        return {"kind": self.name, "endpoint": self.base_url, "model": self.model, "structured_output": STRUCTURED[self.form],
                **self.formulation()}

    def _why(self, e) -> str:
        o = self.openai
        if isinstance(e, o.APITimeoutError):
            return f"did not answer within {self.timeout:g} s (--endpoint-timeout)"
        if isinstance(e, o.APIConnectionError):
            cause = e.__cause__ or e.__context__
            return f"dropped or refused the connection ({type(cause).__name__ if cause else 'connection error'})"
        if isinstance(e, o.APIStatusError):
            return f"answered HTTP {e.status_code}: {str(getattr(e, 'message', e))[:200]}"
        return f"failed: {type(e).__name__}: {str(e)[:200]}"

    def _call(self, fn, formatted: bool = False):
        """``fn()``, repeated while the endpoint is unreachable, slow or failing (5xx, 429), up to ``wait`` s.
        A refused request (4xx) is a user error, unless it asked for a response format (``formatted``) and the
        refusal is a 400/422 or names ``response_format`` (llama-cpp-python's server answers HTTP 500 to a form
        it does not know): then ``_FormatRefused``."""
        o = self.openai
        start, delay = time.monotonic(), self.first_delay
        while True:
            try:
                return fn()
            except o.APIStatusError as e:
                if formatted and (e.status_code in (400, 422) or "response_format" in str(e)):
                    raise _FormatRefused(self._why(e)) from e
                if e.status_code < 500 and e.status_code != 429:
                    raise UserError(f"the endpoint {self.base_url} refused the request: {self._why(e)}") from e
                failure = e
            except o.APIConnectionError as e:  # includes timeouts
                failure = e
            waited = time.monotonic() - start
            why = self._why(failure)
            self.endpoint_errors.append(f"{why} (after {waited:.0f} s)")
            if waited + delay > self.wait:
                raise EndpointDown(f"the endpoint {self.base_url} {why}; it has not answered for {waited:.0f} s "
                                   f"(--endpoint-wait {self.wait:g})") from failure
            self.say(f"self-pruner: the endpoint {self.base_url} {why}; trying again in {delay:.0f} s "
                     f"(waiting up to {self.wait:g} s)")
            time.sleep(delay)
            delay = min(2 * delay, 30.0)

    def _model_id(self) -> str:
        if self.model is None:
            models = self._call(lambda: self.client.models.list()).data
            if not models:
                raise UserError(f"the endpoint {self.base_url} lists no model; pass --proposer-model MODEL_ID")
            self.model = models[0].id
        return self.model

    def _response_format(self, schema):
        form = STRUCTURED[self.form]
        if form == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
        if form == "json_object+schema":
            return {"type": "json_object", "schema": schema}
        return None

    def chat(self, messages, schema, seed, max_tokens):
        model = self._model_id()
        while True:
            fmt = self._response_format(schema)
            extra = {"response_format": fmt} if fmt else {}
            try:
                r = self._call(lambda: self.client.chat.completions.create(
                    model=model, messages=messages, temperature=self.temperature, max_tokens=max_tokens, seed=seed,
                    **extra), formatted=fmt is not None)
                break
            except _FormatRefused as e:
                self.say(f"self-pruner: the endpoint {self.base_url} refused a request with response_format "
                         f"{STRUCTURED[self.form]} ({e}); trying {STRUCTURED[self.form + 1]}")
                self.form += 1
        if not r.choices:
            raise InvalidAnswer("the endpoint answered without a choice")
        u = r.usage
        return (r.choices[0].message.content or ""), {"prompt": getattr(u, "prompt_tokens", 0) or 0,
                                                      "completion": getattr(u, "completion_tokens", 0) or 0}


class _FormatRefused(Exception):
    pass


def make_proposer(kind: str, *, gguf=None, gguf_source="", endpoint=None, model=None, retries=2, temperature=0.7,
                  max_tokens=1024, timeout=120.0, wait=600.0, task="vectors", start="llm", responses=None,
                  threads=None) -> Proposer:
    kw = dict(retries=retries, temperature=temperature, max_tokens=max_tokens, task=task, start=start,
              responses=responses)
    if kind == "classic":
        return ClassicProposer()
    if kind == "openai":
        return OpenAIProposer(endpoint, model, timeout=timeout, wait=wait, **kw)
    if kind == "local":
        return LlamaCppProposer(gguf, source=gguf_source, threads=threads, **kw)
    raise UserError(f"unknown proposer {kind!r}; choose classic, local or openai")
