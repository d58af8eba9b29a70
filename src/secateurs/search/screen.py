"""What an LLM proposer is shown: the one screen a human expert would want (``Screen``), in whole percents.

- **The task and its rules**: the number of rates, their bounds, and the mean-rate rule stated as a sum the
  answer can meet (the rates add up to exactly S; raising one layer means lowering others by as much).
- **The best evaluated plans**: per-layer rates and fitness, best first (``show`` of them).
- **What changed between generations** (``observe``: the search log so far): for the last ``history``
  generations, the best fitness before and after, how many children beat the previous best, and where the
  generation's best child differs from its parent, layer by layer.
- **Measured responses** (``responses``: ``methods.tell.dense_responses``, when tell's response cache holds
  them for this model and calibration): a line per layer, the calibration loss increase per token when its
  attention or MLP alone is narrowed or removed.

Only text is built here; the proposers (``search.proposers``) add the operator and the answer's form.
"""
from __future__ import annotations

import math

from .evolution import Individual, SearchSpace


def pct(rates) -> str:
    return "[" + ", ".join(f"{100 * r:.0f}" for r in rates) + "]"


def pct_bounds(space: SearchSpace) -> tuple[int, int]:
    """The whole percents a rate may take."""
    return math.ceil(100 * space.low - 1e-9), math.floor(100 * space.high + 1e-9)


def pct_sum(space: SearchSpace) -> int:
    """What the rates of a plan add up to, in whole percents."""
    return round(space.target_units * space.step * 100)


def _level(level: float, kind: str) -> str:
    if level >= 1:
        return "removed"
    return f"-{round(100 * level)}% {'heads' if kind == 'attn' else 'channels'}"


class Screen:
    def __init__(self, show: int = 8, history: int = 3, responses: dict | None = None):
        self.show, self.history, self.responses = show, history, responses
        self.records: list[dict] = []

    def observe(self, records: list[dict]) -> None:
        """The search log's generation records so far (``search.evolution``)."""
        self.records = records

    def task(self, space: SearchSpace) -> str:
        lo, hi = pct_bounds(space)
        return (f"Task: a language model with {space.n} layers must be pruned. A plan gives each layer a pruning "
                f"rate in percent (layer 0 first): the share of that layer's attention heads and MLP channels "
                f"that is removed. Rules: a plan has exactly {space.n} rates, whole numbers, each between {lo} "
                f"and {hi}, and their mean must be {100 * space.mean:.1f}: the rates add up to exactly "
                f"{pct_sum(space)}, so if you raise one layer, lower another by the same amount. Fitness is the "
                f"perplexity of the pruned model on calibration text: lower is better.")

    def table(self, population: list[Individual]) -> str:
        return "\n".join(f"#{i} fitness {p.fitness:.3f}: {pct(p.rates)}" for i, p in enumerate(population[: self.show]))

    def changes(self) -> str:
        """Lines on the last ``history`` generations ("" before the first generation is complete)."""
        lines = []
        for g in range(max(1, len(self.records) - self.history), len(self.records)):
            rec, prev = self.records[g], self.records[g - 1]
            before, kids = prev["best_fitness"], rec["proposals"]
            better = sum(p["fitness"] < before for p in kids)
            line = (f"generation {g}: best fitness {rec['best_fitness']:.3f} (before {before:.3f}); {better} of "
                    f"{len(kids)} children beat the previous best")
            if kids:
                best = min(kids, key=lambda p: p["fitness"])
                parent = prev["population"][best["parents"][0]] if best["parents"] else None
                if parent is not None:
                    diff = [f"{k} {100 * a:.0f}->{100 * b:.0f}" for k, (a, b) in enumerate(zip(parent["rates"], best["rates"]))
                            if round(100 * a) != round(100 * b)]
                    line += (f"; its best child ({best['op']} of #{best['parents'][0]}, fitness {parent['fitness']:.3f}"
                             f" -> {best['fitness']:.3f}) changed layers " + (", ".join(diff[:10]) or "none")
                             + (f" and {len(diff) - 10} more" if len(diff) > 10 else ""))
            lines.append(line)
        if self.records and not lines:
            first = self.records[0]
            lines.append(f"first population: {len(first['proposals'])} plans, best fitness {first['best_fitness']:.3f}")
        return "\n".join(lines)

    def response_lines(self) -> str:
        if not self.responses:
            return ""
        layers = sorted({layer for layer, _ in self.responses})
        out = []
        for layer in layers:
            parts = []
            for kind, name in (("attn", "attention"), ("mlp", "MLP")):
                opts = {}
                for level, compensate, dloss in self.responses.get((layer, kind), []):
                    if level not in opts or compensate:  # with bias compensation where both were measured
                        opts[level] = dloss
                if opts:
                    parts.append(f"{name} " + ", ".join(f"{_level(lv, kind)} {d:+.4f}" for lv, d in sorted(opts.items())))
            out.append(f"layer {layer}: " + "; ".join(parts))
        return ("Measured on this model (calibration loss increase per token, in nats, when one block alone is "
                "narrowed or removed, the rest dense; small = that layer can lose more):\n" + "\n".join(out))

    def population(self, space: SearchSpace, population: list[Individual]) -> str:
        parts = [self.task(space), f"Evaluated plans, best first ({min(len(population), self.show)} of "
                 f"{len(population)}; rates of layers 0 to {space.n - 1}):\n{self.table(population)}"]
        changes = self.changes()
        if changes:
            parts.append(f"What the last generations changed:\n{changes}")
        resp = self.response_lines()
        if resp:
            parts.append(resp)
        return "\n".join(parts) + "\n"
