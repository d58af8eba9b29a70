"""How much to prune in every block, from measured responses: staged measurement and an exact knapsack.

Every block (``models.base.Block``) has a few *options*: keep it, narrow it (a fraction ``level`` of its
attention heads or MLP channels removed, with or without bias compensation), or remove it whole. An option has
a *saving* (what it buys: prefill milliseconds from the cost model, or parameters) and a *response* (the
calibration-loss increase measured with that block alone changed, ``importance.response``). With ``prune
--engine vllm`` an attention block is kept or removed, never narrowed (``block_options``).

One stage: measure every block's options that go at least as deep as what is committed, on top of the
committed plan; choose one option per block minimizing the summed loss increase with the summed saving at
least the rest of the budget (a multiple-choice knapsack, solved exactly: ``search.knapsack``). With
``stages`` > 1, the first stages commit only part of that choice before measuring again (as BlockPruner
re-scores after every removal, here in a few coarse steps): the chosen changes with the least loss per unit of
saving, until the committed saving reaches ``k / stages`` of the budget; the last stage's choice is the plan.
Blocks interact (two removals together usually hurt more than the sum of each alone), and measuring on top of
what is committed is how the later choices see it.

The price: with the final choice, the *price* ``lambda`` (loss per unit of saving) at which every block's
Lagrangian choice ``argmin(response - lambda * saving)`` meets the budget (the linear relaxation's dual) is
recorded, and each block's neighbouring options' marginal rates, so ``secateurs explain`` can say why an option
was chosen: going one option deeper would have cost more per unit than ``lambda``, one option shallower would
have saved less.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Callable

from ..models.base import Block, ModelSpec, all_blocks
from ..plan import LayerPlan, PruningPlan
from . import knapsack


# The knapsack's objective per option: the measured loss increase floored at 0 (a measured improvement counts as
# none: the additive model would carry it over to a model changed elsewhere, and it would pull the plan past its
# budget), plus TIE nats per unit of saving, so that among equal losses the smaller saving wins (the plan lands
# on its budget instead of taking every free option).
TIE = 1e-9


@dataclass(frozen=True)
class Option:
    level: float  # 0: keep; (0, 1): fraction of the block's heads / channels asked to go; 1: remove whole
    compensate: bool = True  # FLAP bias compensation (width options)

    def label(self, kind: str) -> str:
        if self.level <= 0:
            return "keep"
        if self.level >= 1:
            return "remove"
        unit = "heads" if kind == "attn" else "channels"
        return f"{unit}-{round(self.level * 100):d}%" + ("" if self.compensate else " no-bias")


def block_options(levels: list[float], compensation: str, keep_heads: bool = False) -> dict[str, list[Option]]:
    """Every block kind's options: keep, every width level (compensated, uncompensated, or both: ``compensation``
    on / off / both) and whole removal. ``keep_heads`` (``prune --engine vllm``): the attention blocks' are keep
    and remove only, so no query head is narrowed."""
    comp = {"on": (True,), "off": (False,), "both": (True, False)}[compensation]
    every = [Option(0.0)] + [Option(l, c) for l in sorted(levels) for c in comp] + [Option(1.0)]
    return {"attn": [Option(0.0), Option(1.0)] if keep_heads else every, "mlp": every}


def _lp_key(lp: LayerPlan, kind: str) -> str:
    if not getattr(lp, kind):
        return "removed"
    units, bias = (lp.heads, lp.attn_bias) if kind == "attn" else (lp.channels, lp.mlp_bias)
    return json.dumps([units, None if not bias else hashlib.sha1(json.dumps(bias).encode()).hexdigest()[:12]])


def set_block(lp: LayerPlan, kind: str, part: LayerPlan) -> LayerPlan:
    """A copy of ``lp`` with block ``kind`` taken from ``part``."""
    new = LayerPlan(**vars(lp))
    if kind == "attn":
        new.attn, new.heads, new.attn_bias = part.attn, part.heads, part.attn_bias
    else:
        new.mlp, new.channels, new.mlp_bias = part.mlp, part.channels, part.mlp_bias
    return new


@dataclass
class Problem:
    """What the allocation needs to know about the model: the block plan of an option
    (``make(layer, kind, option) -> LayerPlan`` with that block set, the other block dense), the saving of a
    block plan (``saving(layer, kind, lp)``), the required total saving, every block kind's options (keep first)
    and how to measure."""

    spec: ModelSpec
    make: Callable[[int, str, Option], LayerPlan]
    saving: Callable[[int, str, LayerPlan], float]
    need: float
    options: dict[str, list[Option]]  # block kind -> its options
    measure: Callable  # (base plan, {pos: [LayerPlan]}, stage, {pos: [(level, compensate)]}) -> (base loss, {pos: [loss]})
    tokens: int  # calibration tokens (losses are reported per token)
    joint: Callable | None = None  # plan -> its summed calibration loss (the local search's evaluations)


def allocate(p: Problem, stages: int = 1, log=None, refine: int = 0) -> dict:
    """Runs the stages (module docstring), then ``refine`` evaluations of the local search (``local_search``).
    Returns ``{"plan", "choice" (pos -> Option), "stages": [...], "refine": [...]}``; each stage records per
    block its measured options (label, saving, loss increase per token) and the choice."""
    spec = p.spec
    blocks = all_blocks(spec.n_layers)
    committed = {b.pos: Option(0.0) for b in blocks}
    base = PruningPlan.dense(spec)
    records = []
    for stage in range(stages):
        # each block: its committed option and every deeper one, each as a distinct block plan
        variants, opts, base_saving = {}, {}, {}
        for b in blocks:
            cur = committed[b.pos]
            base_saving[b.pos] = p.saving(b.layer, b.kind, base.layers[b.layer])
            seen = {_lp_key(base.layers[b.layer], b.kind)}
            opts[b.pos], variants[b.pos] = [cur], []
            for o in p.options[b.kind]:
                if o.level <= cur.level:
                    continue
                lp = set_block(base.layers[b.layer], b.kind, p.make(b.layer, b.kind, o))
                key = _lp_key(lp, b.kind)
                if key in seen:
                    continue
                seen.add(key)
                opts[b.pos].append(o)
                variants[b.pos].append(lp)
        labels = {pos: [(o.level, o.compensate) for o in opts[pos][1:]] for pos, v in variants.items() if v}
        base_loss, losses = p.measure(base, {pos: v for pos, v in variants.items() if v}, stage, labels)
        groups, table = [], {}
        for b in blocks:
            rows = [(0.0, 0.0)]
            for lp, loss in zip(variants[b.pos], losses.get(b.pos, [])):
                rows.append((p.saving(b.layer, b.kind, lp) - base_saving[b.pos], loss - base_loss))
            table[b.pos] = rows
            groups.append([(s, max(v, 0.0) + TIE * s) for s, v in rows])
        done_saving = sum(base_saving.values())
        sol = knapsack.solve(groups, max(p.need - done_saving, 0.0))
        record = {"stage": stage, "base_loss": base_loss, "committed_saving": done_saving,
                  "need": p.need, "frontier_max": max(sol.frontier_sizes), "evaluations": sum(len(v) for v in variants.values()),
                  "blocks": {}}
        for b, j in zip(blocks, sol.choice):
            record["blocks"][b.name] = {
                "options": [{"option": o.label(b.kind), "saving": s, "dloss": v / p.tokens}
                            for o, (s, v) in zip(opts[b.pos], table[b.pos])],
                "chosen": opts[b.pos][j].label(b.kind)}
        records.append(record)
        chosen = {b.pos: (opts[b.pos][j], variants[b.pos][j - 1] if j else base.layers[b.layer])
                  for b, j in zip(blocks, sol.choice)}
        record["predicted_dloss"] = sum(table[b.pos][j][1] for b, j in zip(blocks, sol.choice)) / p.tokens
        if log:
            log(f"tell: stage {stage + 1}/{stages}: {record['evaluations']} responses, knapsack choice: loss "
                f"+{record['predicted_dloss']:.4f} nats/token (sum of responses) for saving "
                f"{sol.saving + done_saving:.4g} (need {p.need:.4g})")
        if stage == stages - 1:
            break
        # commit the most efficient chosen changes, up to (stage + 1) / stages of the budget
        changes = sorted((table[b.pos][j][1] / max(table[b.pos][j][0], 1e-12), b.pos)
                         for b, j in zip(blocks, sol.choice) if j)
        goal = p.need * (stage + 1) / stages
        saved = done_saving
        for _, pos in changes:
            if saved >= goal:
                break
            o, lp = chosen[pos]
            layer, kind = Block.at(pos)
            committed[pos] = o
            base.layers[layer] = set_block(base.layers[layer], kind, lp)
            saved += table[pos][sol.choice[pos]][0]
    choice = list(sol.choice)

    def plan_of(ch):
        plan = PruningPlan.dense(spec)
        for b, j in zip(blocks, ch):
            lp = variants[b.pos][j - 1] if j else base.layers[b.layer]
            plan.layers[b.layer] = set_block(plan.layers[b.layer], b.kind, lp)
        return plan

    history = []
    if refine and p.joint is not None:
        rows = [table[b.pos] for b in blocks]
        choice, history = local_search(rows, choice, max(p.need - done_saving, 0.0),
                                       lambda ch: p.joint(plan_of(ch)), refine, log)
        for h in history:
            h["moves"] = [[blocks[g].name, opts[blocks[g].pos][j].label(blocks[g].kind)] for g, j in h["moves"]]
            h["loss"] = h["loss"] / p.tokens
        for b, j in zip(blocks, choice):
            records[-1]["blocks"][b.name]["chosen"] = opts[b.pos][j].label(b.kind)
    price = lagrange_price(groups, max(p.need - done_saving, 0.0))
    for b, j in zip(blocks, choice):
        records[-1]["blocks"][b.name]["why"] = why(table[b.pos], j, price, p.tokens)
    records[-1]["price"] = price / p.tokens if price is not None else None
    return {"plan": plan_of(choice), "choice": {b.pos: opts[b.pos][j] for b, j in zip(blocks, choice)},
            "stages": records, "refine": history}


def local_search(rows, choice: list[int], need: float, joint: Callable, budget: int, log=None) -> tuple[list[int], list]:
    """First-improvement local search on the true (joint) loss, from the knapsack's choice, ``budget`` joint
    evaluations at most. A move changes one or two blocks' options and keeps the summed saving at least ``need``;
    moves are tried in the order of their loss change predicted by the responses (``rows[g][j] = (saving, loss
    increase)``), smallest first: the near-ties of the additive model, where the blocks' interactions decide.
    A plan already scored is never scored again (``scored``: the undoing of an accepted move would otherwise be
    the first candidate after it), so every evaluation is a new plan. Returns the final choice and one record
    per evaluation."""
    best = joint(choice)
    history = [{"moves": [], "loss": best, "accepted": True}]
    scored = {tuple(choice)}

    def after(move) -> tuple:
        trial = list(choice)
        for g, j in move:
            trial[g] = j
        return tuple(trial)

    while len(history) <= budget:
        total = sum(rows[g][j][0] for g, j in enumerate(choice))
        # (saving change, loss change) of every single move
        singles = [(g, j, rows[g][j][0] - rows[g][choice[g]][0], rows[g][j][1] - rows[g][choice[g]][1])
                   for g in range(len(rows)) for j in range(len(rows[g])) if j != choice[g]]
        cands = [(dv, ((g, j),)) for g, j, ds, dv in singles if total + ds >= need]
        for ga, ja, dsa, dva in singles:
            if dsa <= 0:
                continue  # pairs: one block deeper, another shallower
            for gb, jb, dsb, dvb in singles:
                if gb != ga and dsb < 0 and total + dsa + dsb >= need:
                    cands.append((dva + dvb, ((ga, ja), (gb, jb))))
        cands.sort(key=lambda c: c[0])
        move = next((m for _, m in cands if after(m) not in scored), None)
        if move is None:
            break
        trial = list(after(move))
        scored.add(tuple(trial))
        loss = joint(trial)
        accepted = loss < best
        history.append({"moves": list(move), "loss": loss, "accepted": accepted})
        if log:
            log(f"tell: local search {len(history) - 1}/{budget}: loss {loss:.4f} ({'accepted' if accepted else 'rejected'})")
        if accepted:
            choice, best = trial, loss
    return choice, history


def lagrange_price(groups, need: float) -> float | None:
    """The least price ``lam >= 0`` at which every group's choice ``argmin(loss - lam * saving)`` (ties to the
    larger saving) saves at least ``need``; None when even a huge price does not (never for a feasible need)."""
    def saving_at(lam):
        return sum(max(g, key=lambda sv: (lam * sv[0] - sv[1], sv[0]))[0] for g in groups)

    if saving_at(0.0) >= need:
        return 0.0
    hi = 1.0
    while saving_at(hi) < need:
        hi *= 2
        if hi > 1e30:
            return None
    lo = 0.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if saving_at(mid) >= need:
            hi = mid
        else:
            lo = mid
    return hi


def why(rows, j: int, price: float | None, tokens: int) -> str:
    """One line: the chosen option's marginal rates against its neighbours and the price (module docstring)."""
    def rate(a, b):
        ds = rows[b][0] - rows[a][0]
        return (rows[b][1] - rows[a][1]) / tokens / ds if abs(ds) > 0 else math.inf

    deeper = [k for k in range(len(rows)) if rows[k][0] > rows[j][0]]
    shallower = [k for k in range(len(rows)) if rows[k][0] < rows[j][0]]
    parts = []
    if deeper:
        parts.append(f"deeper costs >= {min(rate(j, k) for k in deeper):.3g}")
    if shallower:
        parts.append(f"shallower saves <= {max(rate(k, j) for k in shallower):.3g}")
    if price is not None:
        parts.append(f"price {price / tokens:.3g}")
    return "; ".join(parts) + " (nats/token per unit saved)"
