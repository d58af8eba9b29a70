"""Evolutionary search over per-layer pruning rates (the loop of Self-Pruner), resumable from its log.

The search space (``SearchSpace``): one rate per layer, each in ``[low, high]``, on a grid of ``step``, with
the mean fixed to ``mean``. Every candidate, whoever proposed it, passes through ``SearchSpace.repair``
(clip to the bounds, shift onto the mean, round to the grid keeping the sum), so the loop only ever
evaluates valid vectors.

The loop (``evolve``): an initial population (the uniform vector plus the proposer's vectors), then per
generation: the proposer selects parents, makes crossover children and mutation children; new vectors are
evaluated (a fitness cache keyed by the grid vector means no vector is evaluated twice), all of a generation
in one batch (``fitness_batch``, e.g. on a worker pool; the values come back in the order sent); the
survivors are the best ``population`` distinct vectors of parents and children. Lower fitness is better.

Every generation appends one JSON line to ``search.jsonl`` (proposals with their source, repairs and
errors, fitness, wall time, tokens). Started again on the same log, the search restores the fitness cache
and the last population and continues with the next generation; every generation draws its random numbers
from ``seed`` and its own number, so a resumed search makes the same choices as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UserError


class InvalidAnswer(ValueError):
    """A proposal that cannot be used as it is (not JSON, wrong shape, not numbers...)."""


@dataclass(frozen=True)
class SearchSpace:
    n: int  # layers
    mean: float  # required mean rate
    low: float = 0.0
    high: float = 0.9
    step: float = 0.01

    def __post_init__(self):
        if not (self.step > 0 and 0.0 <= self.low < self.high <= 1.0):
            raise UserError(f"rate bounds must satisfy 0 <= min < max <= 1 and step > 0 (got {self.low}, {self.high}, {self.step})")
        if not (self.low <= self.mean <= self.high):
            raise UserError(f"the mean rate {self.mean:.4f} needed for this ratio is outside the bounds [{self.low}, {self.high}]")
        if self.hi_units * self.n < self.target_units or self.lo_units * self.n > self.target_units:
            raise UserError(f"no vector on the {self.step} grid within [{self.low}, {self.high}] has mean {self.mean:.4f}")

    @property
    def lo_units(self) -> int:
        return math.ceil(self.low / self.step - 1e-9)

    @property
    def hi_units(self) -> int:
        return math.floor(self.high / self.step + 1e-9)

    @property
    def target_units(self) -> int:
        return round(self.mean * self.n / self.step)

    def uniform(self) -> list[float]:
        return self.repair([self.mean] * self.n)[0]

    def key(self, rates) -> tuple[int, ...]:
        return tuple(round(r / self.step) for r in rates)

    def check(self, raw) -> list[float]:
        """A list of ``n`` finite numbers, or InvalidAnswer saying what is wrong."""
        if not isinstance(raw, list):
            raise InvalidAnswer(f"expected a list of {self.n} numbers, got {type(raw).__name__}")
        if len(raw) != self.n:
            raise InvalidAnswer(f"expected {self.n} rates, got {len(raw)}")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in raw):
            raise InvalidAnswer("every rate must be a finite number")
        return [float(x) for x in raw]

    def repair(self, rates: list[float]) -> tuple[list[float], list[str]]:
        """Clip to the bounds, shift onto the mean (clipping again), round to the grid keeping the sum.
        Returns the vector and the repairs made (rounding alone is not counted as a repair)."""
        notes = []
        x = [min(max(r, self.low), self.high) for r in rates]
        if x != list(rates):
            notes.append(f"clipped {sum(a != b for a, b in zip(x, rates))} rates to [{self.low}, {self.high}]")
        m = sum(x) / self.n
        if abs(m - self.mean) > self.step / 2:
            notes.append(f"projected the mean {m:.4f} to {self.mean:.4f}")
        lo, hi = -1.0, 1.0  # shift c with mean(clip(x + c)) = mean, by bisection
        for _ in range(60):
            c = (lo + hi) / 2
            if sum(min(max(r + c, self.low), self.high) for r in x) / self.n < self.mean:
                lo = c
            else:
                hi = c
        units = [min(max((r + c) / self.step, self.lo_units), self.hi_units) for r in x]
        base = [min(max(math.floor(u), self.lo_units), self.hi_units) for u in units]
        short = self.target_units - sum(base)  # largest remainders first, within the bounds
        order = sorted(range(self.n), key=lambda i: -(units[i] - base[i]))
        for i in (order if short > 0 else order[::-1]):
            if short == 0:
                break
            if short > 0 and base[i] < self.hi_units:
                base[i] += 1
                short -= 1
            elif short < 0 and base[i] > self.lo_units:
                base[i] -= 1
                short += 1
        return [round(u * self.step, 10) for u in base], notes


@dataclass
class Proposal:
    """One candidate vector and how it came to be."""

    rates: list[float]
    op: str  # init | crossover | mutation
    source: str  # uniform | classic | llm | llm-repaired | fallback
    parents: list[int] = field(default_factory=list)
    attempts: int = 0
    repairs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tokens: dict = field(default_factory=dict)
    fitness: float | None = None
    cached: bool = False
    answer: list | None = None  # an LLM's rates as it wrote them (percent), before the projection
    projected: bool = False  # the projection onto the mean changed the LLM's answer
    seconds: float = 0.0  # time spent on the LLM's answer (all attempts)
    endpoint_errors: list[str] = field(default_factory=list)  # an endpoint's failures before it answered


@dataclass
class Selection:
    pairs: list[tuple[int, int]]  # crossover parents (indices into the population, best first)
    singles: list[int]  # mutation parents
    source: str = "classic"
    attempts: int = 0
    repairs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tokens: dict = field(default_factory=dict)
    seconds: float = 0.0
    endpoint_errors: list[str] = field(default_factory=list)


@dataclass
class Individual:
    rates: list[float]
    fitness: float


@dataclass
class EvolutionConfig:
    population: int = 30
    generations: int = 20
    crossover: int = 10
    mutation: int = 10
    seed: int = 0


@dataclass
class SearchResult:
    best: Individual
    uniform: Individual
    population: list[Individual]
    evaluations: int  # distinct vectors evaluated (including those restored from the log)
    new_evaluations: int  # evaluated by this run
    wall_s: float  # sum over generations, including those restored
    stats: dict


def rng_for(seed: int, gen: int) -> random.Random:
    return random.Random(f"secateurs-evolution:{seed}:{gen}")


def _tokens(items) -> dict:
    out = {"prompt": 0, "completion": 0}
    for t in items:
        for k in out:
            out[k] += int(t.get(k, 0))
    return out


def read_log(path: Path) -> list[dict]:
    """Complete generation records, in order; a torn last line (interrupted write) is ignored."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        if rec.get("gen") != len(records):
            break
        records.append(rec)
    return records


def evolve(space: SearchSpace, fitness: Callable[[list[float]], float] | None, proposer, cfg: EvolutionConfig,
           log_path: str | Path, log: Callable[[str], None] | None = None,
           fitness_batch: Callable[[list[list[float]]], list[float]] | None = None) -> SearchResult:
    """Runs (or resumes) the search; ``fitness`` scores one vector, or ``fitness_batch`` a generation's new ones."""
    if cfg.population < 2 or cfg.generations < 0 or cfg.crossover < 0 or cfg.mutation < 0:
        raise UserError("the search needs --population >= 2, --generations >= 0 and non-negative child counts")
    log_path = Path(log_path)
    records = read_log(log_path)
    cache = _cache(space, records)
    if records and log:
        log(f"self-pruner: resuming the search after generation {records[-1]['gen']} ({len(cache)} vectors evaluated)")
    log_path.write_text("".join(json.dumps(r) + "\n" for r in records))  # drop a torn line
    new_evals = 0
    batch = fitness_batch or (lambda vectors: [fitness(x) for x in vectors])

    def evaluate(props: list[Proposal]) -> None:
        nonlocal new_evals
        fresh = {}  # key -> rates, the vectors not seen before, in proposal order
        for p in props:
            k = space.key(p.rates)
            p.cached = k in cache or k in fresh
            if not p.cached:
                fresh[k] = p.rates
        for k, v in zip(fresh, batch(list(fresh.values())), strict=True):
            cache[k] = float(v)
        new_evals += len(fresh)
        for p in props:
            p.fitness = cache[space.key(p.rates)]

    def survivors(pool: list[Individual]) -> list[Individual]:
        seen, out = set(), []
        for ind in sorted(pool, key=lambda i: i.fitness):
            if space.key(ind.rates) not in seen:
                seen.add(space.key(ind.rates))
                out.append(ind)
        return out[: cfg.population]

    population = [Individual(**d) for d in records[-1]["population"]] if records else []
    for gen in range(len(records), cfg.generations + 1):
        t0 = time.time()
        rng = rng_for(cfg.seed, gen)
        selection = None
        proposer.observe(records)
        if gen == 0:
            props = [Proposal(space.uniform(), "init", "uniform")]
            props += proposer.initial(space, cfg.population - 1, rng)
        else:
            selection = proposer.select(space, population, cfg.crossover, cfg.mutation, rng)
            props = [proposer.crossover(space, population, a, b, rng) for a, b in selection.pairs]
            for p, pair in zip(props, selection.pairs):
                p.parents = list(pair)
            for i in selection.singles:
                props.append(proposer.mutate(space, population, i, rng))
                props[-1].parents = [i]
        evaluate(props)
        population = survivors(population + [Individual(p.rates, p.fitness) for p in props])
        parts = [selection] if selection else []
        rec = {
            "gen": gen,
            "proposer": proposer.name,
            "proposer_model": proposer.describe(),
            "selection": None if selection is None else asdict(selection),
            "proposals": [asdict(p) for p in props],
            "population": [asdict(i) for i in population],
            "best_fitness": population[0].fitness,
            "new_evaluations": sum(not p.cached for p in props),
            "fallbacks": sum(p.source == "fallback" for p in props) + sum(s.source == "fallback" for s in parts),
            "repaired": sum(p.source == "llm-repaired" for p in props) + sum(s.source == "llm-repaired" for s in parts),
            "projected": sum(p.projected for p in props),
            # LLM vectors that (after projection) repeat an evaluated one: no new evaluation
            "repeated": sum(p.cached for p in props if p.source in ("llm", "llm-repaired")),
            "tokens": _tokens([p.tokens for p in props] + [s.tokens for s in parts]),
            "llm_seconds": sum(p.seconds for p in props) + sum(s.seconds for s in parts),
            "wall_s": time.time() - t0,
        }
        with log_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        records.append(rec)
        if log:
            log(f"self-pruner: generation {gen}: best fitness {rec['best_fitness']:.4f}, {rec['new_evaluations']} new "
                f"evaluations, {rec['fallbacks']} fallbacks, {rec['repaired']} repaired, {rec['projected']} projected, "
                f"{rec['repeated']} repeated, "
                f"{rec['wall_s']:.1f}s")
    return _result(space, records, cache, new_evals)


def _cache(space: SearchSpace, records: list[dict]) -> dict[tuple, float]:
    """Fitness by grid vector, of every proposal the log holds."""
    return {space.key(p["rates"]): p["fitness"] for rec in records for p in rec["proposals"]}


def restore(space: SearchSpace, log_path: str | Path) -> tuple[SearchResult, list[dict]] | None:
    """A search as its log holds it now, read only (the log of a running search may be read: a torn last line is
    ignored), and the generation records it was built from; None for a log without a generation. No fitness is
    evaluated, nothing is written."""
    records = read_log(Path(log_path))
    return (_result(space, records, _cache(space, records), 0), records) if records else None


def llm_answer_stats(records: list[dict]) -> dict | None:
    """An LLM proposer's answers (rate vectors and selections) in a search log: how many were usable as they came
    (no fallback), retried, repaired, projected, fell back, or repeated an evaluated vector; seconds per answer.
    None for a search without LLM answers."""
    llm = [p for r in records for p in r["proposals"] if p["source"] != "uniform"]
    asked = [a for a in llm + [r["selection"] for r in records if r["selection"]]
             if a["source"] not in ("classic", "uniform")]
    if not asked:
        return None
    seconds = [a.get("seconds", 0.0) for a in asked]
    return {"answers": len(asked), "usable": sum(a["source"] != "fallback" for a in asked),
            "retried": sum(a.get("attempts", 1) > 1 for a in asked),
            "repaired": sum(a["source"] == "llm-repaired" for a in asked),
            "projected": sum(bool(p.get("projected")) for p in llm), "fallback": sum(a["source"] == "fallback" for a in asked),
            # rate vectors the LLM wrote that (after projection) were already evaluated: they cost no evaluation
            "repeats": sum(bool(p["cached"]) for p in llm if p["source"] in ("llm", "llm-repaired")),
            "seconds_per_answer": sum(seconds) / len(asked), "seconds_per_answer_median": statistics.median(seconds)}


def _result(space: SearchSpace, records: list[dict], cache: dict, new_evals: int) -> SearchResult:
    population = [Individual(**d) for d in records[-1]["population"]]
    uniform = space.uniform()
    llm = [p for r in records for p in r["proposals"] if p["source"] != "uniform"]
    sel = [r["selection"] for r in records if r["selection"]]
    stats = {
        "generations": len(records) - 1,
        "proposals": len(llm),
        "by_source": {s: sum(p["source"] == s for p in llm) for s in sorted({p["source"] for p in llm})},
        "selections_by_source": {s: sum(x["source"] == s for x in sel) for s in sorted({x["source"] for x in sel})},
        "failed_attempts": sum(len(p["errors"]) for p in llm) + sum(len(x["errors"]) for x in sel),
        "projected": sum(bool(p.get("projected")) for p in llm),
        "proposer_model": records[-1].get("proposer_model"),
        "tokens": _tokens(r["tokens"] for r in records),
        "llm_seconds": sum(r.get("llm_seconds", 0.0) for r in records),
        "endpoint_errors": sum(len(p.get("endpoint_errors", [])) for p in llm) + sum(len(x.get("endpoint_errors", [])) for x in sel),
        "best_by_generation": [r["best_fitness"] for r in records],
    }
    answers = llm_answer_stats(records)
    if answers:
        stats["llm_answers"] = answers
    return SearchResult(population[0], Individual(uniform, cache[space.key(uniform)]), population, len(cache),
                        new_evals, sum(r["wall_s"] for r in records), stats)
