"""Greedy block removal by calibration loss: the search engine of BlockPruner and SLEB.

A *block* (``models.base.Block``) is one residual branch of a layer, the attention block ``A_l`` or the MLP
block ``M_l``; its *position* in the forward order is ``2l`` (attention) or ``2l + 1`` (MLP). A *candidate* is
a group of blocks removed together: one block for BlockPruner, both blocks of a layer for SLEB. Each step
removes, among the remaining candidates, the one whose removal (on top of everything removed so far) gives the
lowest summed calibration NLL; ties go to the lowest candidate index. The loss of a removal set is computed by
replaying the model block by block from the captured embeddings (``importance.activations``), one batch of
rows at a time; a batch's loss is the float64 sum of its rows' NLL and a candidate's loss is ``math.fsum`` of
its batch losses. Replaying equals running the physically pruned model (tested in ``test_activations``).

Two implementations give the same removal order bit for bit:

- ``exact``: the straightforward search. Every candidate of every step runs the whole model from the
  embeddings on every batch (about ``K * 2L`` full forward passes).
- ``fast``: the same block operations on the same tensors, with work skipped that cannot change a result:
  1. *prefix reuse*: the hidden states of a removal set are cached at block positions, keyed by the position
     and the removed positions before it. Nothing before a candidate's first block changes, so a candidate
     starts from the current model's state there (computed once per step), or later when a cached state of
     the same candidate from an earlier step still applies (each candidate saves its states at the positions
     of the candidates predicted to win the step, which are the likely next removals);
  2. *early abandonment*: a batch's loss is computed over the vocabulary in chunks (``VocabHead``), and after
     each chunk its partial value is a lower bound of the final one; bounds are non-negative and summed with
     ``fsum``, so a candidate is dropped as soon as the sum of its batches' bounds is above the best complete
     loss of the step (by a margin of 1e-5 nats per calibration token against float rounding; ties are still
     decided by index). Every batch first gets the chunk of the tokens the dense model finds likely (a
     fraction of a full head), then all batches get the next chunk, and so on: a clearly worse candidate costs
     its blocks and a sliver of its heads. Candidates are tried best-first by their loss at the previous step,
     so a good bound comes early.
  Since every replayed block sees bitwise the same input as in ``exact``, and the loss head runs the same
  chunks in the same order, every complete loss is bitwise the same, and so is every decision.

The search state (the removal order so far, with loss, perplexity and parameter ratio after each step) is
written to a JSON file after every step; calling the search again with the same file resumes after the last
finished step.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..importance.activations import run_branch
from ..models.base import BLOCK_KINDS, Adapter, Block, ModelSpec, all_blocks, layer_positions
from ..plan import PruningPlan
from ..files import atomic_write_text
from ..progress import progress_bar
from ..runtime.head import HEAD_BLOCK
from ..runtime.onload import Kept, KeptStore
from ..runtime.passes import batches_of, capture_batches, vocab_mass
from ..runtime.placement import module_device, onloader_of, to_module_device

ORDER_FORMAT = "secateurs-order/1"


def block_candidates(n_layers: int, blocks: str) -> list[tuple[int, ...]]:
    """BlockPruner candidates: every attention and/or MLP block (``blocks`` = mix, attn or mlp)."""
    kinds = BLOCK_KINDS if blocks == "mix" else (blocks,)
    return [(b.pos,) for b in all_blocks(n_layers) if b.kind in kinds]


def layer_candidates(n_layers: int, keep_ends: bool) -> list[tuple[int, ...]]:
    """SLEB candidates: whole layers (both blocks), the first and last kept when ``keep_ends``."""
    layers = range(1, n_layers - 1) if keep_ends else range(n_layers)
    return [layer_positions(l) for l in layers]


def removal_ratio(spec: ModelSpec, removed: list[int]) -> float:
    return PruningPlan.from_removed_blocks(spec, [Block.at(p) for p in removed]).ratio(spec)


def reach(spec: ModelSpec, candidates: list[tuple[int, ...]]) -> float:
    """The largest ratio removing ``candidates`` can give: all of them removed."""
    return removal_ratio(spec, sorted({p for c in candidates for p in c}))


class VocabHead:
    """The summed next-token NLL of one batch, computed over the vocabulary chunk by chunk.

    The chunks follow the dense model's probability mass on the calibration rows (the likeliest tokens first)
    and double in size from ``first`` tokens up to ``HEAD_BLOCK`` (``Replayer._chunk_vocab``; the mass comes
    from ``runtime.passes.vocab_mass``, the head in blocks). ``lse`` is the running log-sum-exp of the
    non-target logits seen so far and ``z_t`` the target logits; ``value`` = sum of ``logaddexp(lse, z_t) -
    z_t`` can only grow from chunk to chunk (log-sum-exp over more terms) and equals the loss after the last
    chunk. The computation is one fixed sequence of operations, the same in the exact and the fast search."""

    def __init__(self, r: "Replayer", b: int, h: torch.Tensor):
        self.r = r
        norm = r.adapter.final_norm()
        x = norm(h.to(module_device(norm, h.device)))[:, :-1]
        self.x = x.reshape(-1, x.shape[-1])
        tgt = r.batches[b][:, 1:].reshape(-1).to(x.device)
        w_t, b_t = r.target_rows(tgt)
        z_t = (self.x.float() * w_t.float()).sum(-1)
        if b_t is not None:
            z_t = z_t + b_t.float()
        self.z_t = r.adapter.softcap(z_t)
        rank = r.rank[tgt]  # where each target sits in the chunk order
        self.t_chunk = torch.bucketize(rank, r.chunk_ends, right=True)
        self.t_local = rank - r.chunk_starts[self.t_chunk]
        self.lse = torch.full_like(self.z_t, -math.inf)
        self.done = 0
        self.value = 0.0

    @property
    def complete(self) -> bool:
        return self.done == len(self.r.chunk_weights)

    def advance(self) -> float:
        """Adds the next chunk of the vocabulary; returns the new value (a lower bound, or the loss when complete)."""
        r, c = self.r, self.done
        w, bias = r.chunk_weights[c]
        z = self.x @ w.to(self.x.device).T
        if bias is not None:
            z = z + bias
        z = r.adapter.softcap(z.float())
        mine = (self.t_chunk == c).nonzero().squeeze(-1)
        z[mine, self.t_local[mine]] = -math.inf  # the target's own logit is z_t
        self.lse = torch.logaddexp(self.lse, torch.logsumexp(z, -1))
        self.done += 1
        r.head_work += w.shape[0] / r.vocab
        self.value = float((torch.logaddexp(self.lse, self.z_t) - self.z_t).double().sum())
        if self.complete:
            r.heads_run += 1
        return self.value


class Replayer:
    """The calibration rows in batches, with what the model passes to its layers, ready to be replayed with
    any set of blocks removed, and the loss head (``VocabHead``) split into chunks of the vocabulary that
    double in size from ``head_chunk`` tokens up to ``HEAD_BLOCK`` (0: blocks of ``HEAD_BLOCK`` in vocabulary
    order). Counts the work done: blocks run, complete loss heads, and head work in full-vocabulary
    equivalents.

    Where the blocks run is the runtime's business (``secateurs.runtime``): a resident model's layers are used
    as they are (moved between GPUs when split by a device map); an onloaded model (``--max-memory``) reads a
    layer when a block of it runs, keeps the last layers (every replay ends with them) on the device while the
    budget allows, keeps the head chunks within a share of the budget (the rest in files), and lets the state
    cache spill pinned states (``StateCache.spill``). The operations and their inputs are the same on every
    path, so losses are bitwise the same with and without a budget."""

    def __init__(self, model, adapter: Adapter, rows: torch.Tensor, batch_size: int = 1, head_chunk: int = 4096):
        self.model, self.adapter = model, adapter
        self.layers = adapter.layers()
        self.ol = onloader_of(model)
        self.spill = self.ol.spill if self.ol is not None else None
        self.n_pos = len(BLOCK_KINDS) * len(self.layers)
        self.batches = batches_of(rows, batch_size)
        self.emb, self.kwargs, finals = capture_batches(model, self.batches, finals=bool(head_chunk))
        mass = vocab_mass(model, finals, len(self.batches)) if head_chunk else None
        if finals is not None:
            finals.close()
        self.tokens = self.count_tokens(rows)
        self._state_share = None
        if self.ol is not None:  # the budget left: a quarter for head chunks, a quarter for layers, half for states
            for e in self.emb:
                self.ol.budget.take(e.numel() * e.element_size())
            room = self.ol.budget.free()
            self._chunk_vocab(mass, head_chunk, room // 4)
            self.ol.pin_layers(range(len(self.layers) - 1, -1, -1), room // 4)
            self._state_share = self.ol.budget.free()
        else:
            self._chunk_vocab(mass, head_chunk)
        self.blocks_run = 0
        self.heads_run = 0
        self.head_work = 0.0

    def close(self) -> None:
        """Gives back what an onloaded model's replay holds in its budget (head chunks, pinned layers)."""
        if self.ol is not None:
            if isinstance(self.chunk_weights, _FileChunks):
                self.chunk_weights.close()
            self.ol.unpin_all()
            for e in self.emb:
                self.ol.budget.give(e.numel() * e.element_size())

    def state_budget(self, requested: int) -> int:
        """Bytes the state cache may hold in memory: as requested, within the budget of an onloaded model."""
        return requested if self._state_share is None else min(requested, self._state_share)

    @staticmethod
    def count_tokens(rows: torch.Tensor) -> int:
        """Predicted tokens of the rows: all but the first of each row."""
        return rows.shape[0] * (rows.shape[1] - 1)

    def _chunk_vocab(self, mass, first: int, resident_bytes: int = 0) -> None:
        head = self.adapter.lm_head()
        self.vocab = v = self.ol.vocab if self.ol is not None else head.weight.shape[0]
        dev = self.ol.device if self.ol is not None else head.weight.device
        ordered = mass is not None and 0 < first < v
        order = torch.argsort(mass.to(dev), descending=True, stable=True) if ordered else torch.arange(v, device=dev)
        self.rank = torch.empty_like(order)
        self.rank[order] = torch.arange(v, device=dev)
        ends, size = [], min(first, HEAD_BLOCK) if ordered else HEAD_BLOCK
        while not ends or ends[-1] < v:
            ends.append(min(v, (ends[-1] if ends else 0) + size))
            size = min(2 * size, HEAD_BLOCK)
        starts = [0] + ends[:-1]
        self.chunk_ends, self.chunk_starts = torch.tensor(ends, device=dev), torch.tensor(starts, device=dev)
        if self.ol is not None:
            self.chunk_weights = _FileChunks(self.ol, [order[a:e] for a, e in zip(starts, ends)], resident_bytes)
        elif len(ends) == 1:
            self.chunk_weights = [(head.weight, head.bias)]
        elif not ordered:
            self.chunk_weights = [(head.weight[a:e], None if head.bias is None else head.bias[a:e]) for a, e in zip(starts, ends)]
        else:
            self.chunk_weights = [(head.weight[order[a:e]], None if head.bias is None else head.bias[order[a:e]])
                                  for a, e in zip(starts, ends)]

    def target_rows(self, tgt: torch.Tensor):
        """(weight rows, bias rows or None) of the output head for the token ids ``tgt``."""
        if self.ol is not None:
            return self.ol.head_rows(tgt)
        head = self.adapter.lm_head()
        tgt = tgt.to(head.weight.device)
        return head.weight[tgt], None if head.bias is None else head.bias[tgt]

    def run(self, b: int, h, start: int, removed: frozenset, save: Callable | None = None) -> torch.Tensor:
        """Runs batch ``b`` from the state ``h`` entering position ``start`` to the end, skipping ``removed``;
        ``save(pos, h)`` (if given) sees the state entering every later position. ``h`` may be a state the
        cache spilled (``runtime.onload.Kept``)."""
        if isinstance(h, Kept):
            h = h.get()
        for pos in range(start, self.n_pos):
            if save is not None and pos > start:
                save(pos, h)
            if pos not in removed:
                layer, kind = Block.at(pos)
                module = self.ol.layer(layer) if self.ol is not None else self.layers[layer]
                h, kw = to_module_device(module, h, self.kwargs[b][layer])
                h = run_branch(self.adapter, module, kind, h, kw)
                self.blocks_run += 1
        return h

    def head(self, b: int, h: torch.Tensor) -> VocabHead:
        return VocabHead(self, b, h)

    def loss(self, b: int, h: torch.Tensor) -> float:
        """Summed NLL of batch ``b`` from its final hidden states (all chunks of the head)."""
        head = self.head(b, h)
        while not head.complete:
            head.advance()
        return head.value


class _FileChunks:
    """The head chunks of an onloaded model: gathered once from the checkpoint in chunk order, the first ones
    kept on the device within ``resident_bytes``, the rest in files of their own (``runtime.onload.KeptStore``
    on the model's spill store: one contiguous read per chunk) or, without room for those, gathered from the
    checkpoint again when used."""

    def __init__(self, ol, rows: list, resident_bytes: int):
        self.ol, self.kept, used = ol, KeptStore(ol.spill), 0
        self.gather: list = []  # per chunk: its vocabulary rows when its tensors found no room, else None
        for c, idx in enumerate(rows):
            w, bias = ol.head_rows(idx)
            n = w.numel() * w.element_size() + (0 if bias is None else bias.numel() * bias.element_size())
            tiers = ("device", "cpu", "disk") if used + n <= resident_bytes else ("cpu", "disk")
            kw = self.kept.put((c, "weight"), w, tiers)
            if kw is None or (bias is not None and self.kept.put((c, "bias"), bias, tiers) is None):
                self.kept.drop((c, "weight"))
                self.gather.append(idx.cpu())
                continue
            used += n if kw.tier == "device" else 0
            self.gather.append(None)

    def __len__(self) -> int:
        return len(self.gather)

    def __getitem__(self, c: int):
        if self.gather[c] is not None:
            return self.ol.head_rows(self.gather[c])
        return self.kept.get((c, "weight")), self.kept.get((c, "bias")) if (c, "bias") in self.kept else None

    def close(self) -> None:
        self.kept.close()
        self.gather.clear()


def _nbytes(h) -> int:
    return h.numel() * h.element_size() if isinstance(h, torch.Tensor) else 0


@dataclass
class StateCache:
    """Hidden states entering block positions, keyed by (batch, position, removed positions before it).
    Pinned entries (the current model's states) are never evicted; others go oldest first over budget.
    With ``spill`` (an onloaded model's ``SpillStore``), pinned states beyond the budget go to the next tier
    (CPU memory below a GPU, then files); when even that is full they are not kept, and a candidate starts
    from an earlier kept state (``latest``) and recomputes the same states, bitwise."""

    budget_bytes: int
    entries: dict = field(default_factory=dict)  # key -> tensor or spilled state (insertion order = age)
    pinned: set = field(default_factory=set)
    used: int = 0
    spill: object | None = None
    spilled: KeptStore = field(init=False)  # the spilled states' handles, given back to the budget when dropped

    def __post_init__(self):
        self.spilled = KeptStore(self.spill)

    @staticmethod
    def key(b: int, pos: int, removed) -> tuple:
        return b, pos, frozenset(p for p in removed if p < pos)

    def put(self, key, h: torch.Tensor, pin: bool = False) -> None:
        if key in self.entries:
            if pin:
                self.pinned.add(key)
            return
        size = _nbytes(h)
        if self.used + size > self.budget_bytes and (not pin or self.spill is not None):
            self._evict(size)
            if self.used + size > self.budget_bytes:
                if not pin:
                    return
                h = self.spilled.put(key, h, ("cpu", "disk"))
                if h is None:
                    return
                size = 0
        self.entries[key] = h
        self.used += size
        if pin:
            self.pinned.add(key)

    def _evict(self, need: int) -> None:
        for k in list(self.entries):
            if self.used + need <= self.budget_bytes:
                break
            if k not in self.pinned:
                self._drop(k)

    def _drop(self, k) -> None:
        h = self.entries.pop(k)
        self.used -= _nbytes(h)
        self.pinned.discard(k)
        self.spilled.drop(k)

    def latest(self, b: int, removed: frozenset, upto: int):
        """The cached state of batch ``b`` under ``removed`` at the latest position <= ``upto``."""
        for pos in range(upto, -1, -1):
            h = self.entries.get(self.key(b, pos, removed))
            if h is not None:
                return pos, h
        return None

    def clear(self) -> None:
        """Drops every state (spilled ones too)."""
        for k in list(self.entries):
            self._drop(k)

    def keep_useful(self, removed: frozenset) -> None:
        """Drops states that no later removal set can use (they miss a block removed since), unpins all."""
        self.pinned.clear()
        for k in list(self.entries):
            _, pos, before = k
            if not all(p in before for p in removed if p < pos):
                self._drop(k)


@dataclass
class SearchSettings:
    candidates: list[tuple[int, ...]]
    target_ratio: float | None = None  # stop when the removed blocks reach this parameter ratio
    max_steps: int | None = None  # stop after this many removals
    exact: bool = False  # the straightforward search (reference)
    cache_mb: int = 1024  # memory for cached hidden states (fast search)
    watch: int = 4  # states saved per candidate at the positions of the likely winners: this many predicted
    # by the last step's losses, and this many leading the current step

    def fingerprint(self) -> dict:
        return {"candidates": [[Block.at(p).name for p in c] for c in self.candidates]}


def _candidate_label(c: tuple[int, ...]) -> str:
    layer = Block.at(c[0]).layer
    if c == layer_positions(layer):
        return f"layer{layer}"
    return "+".join(Block.at(p).name for p in c)


def _load_state(path: Path | None, spec: ModelSpec, fingerprint: dict) -> dict | None:
    if path is None or not path.exists():
        return None
    state = json.loads(path.read_text())
    if state.get("dims") != spec.as_dict() or state.get("search") != fingerprint:
        raise UserError(f"{path} holds the search state of another model or candidate set; delete it to start again")
    return state


class CandidateScorer:
    """One replica's part of a greedy step: evaluates removal candidates on top of the current removal set, in
    the order given, and returns the complete losses; candidates provably worse than a known complete loss
    are abandoned (fast search). Keeps the fast search's state cache across steps. One process runs every
    candidate of a step through one scorer (``LocalSteps``); a worker pool runs one scorer per worker
    (``PooledSteps``)."""

    def __init__(self, replayer: Replayer, s: SearchSettings):
        self.r, self.s = replayer, s
        self.cache = StateCache(replayer.state_budget(s.cache_mb << 20), spill=replayer.spill)
        self.current: frozenset | None = None  # the removal set whose states are pinned in the cache

    def close(self) -> None:
        """Gives back the spilled states and what the replayer holds in an onloaded model's budget."""
        self.cache.clear()
        self.r.close()

    def work(self) -> tuple:
        return self.r.blocks_run, self.r.heads_run, self.r.head_work

    @torch.inference_mode()
    def dense_loss(self) -> float:
        r = self.r
        return math.fsum(r.loss(b, r.run(b, r.emb[b], 0, frozenset())) for b in range(len(r.batches)))

    @torch.inference_mode()
    def score(self, removed: frozenset, order: list[int], predicted: set[int], known: dict, bar=iter) -> dict:
        """Evaluates candidates ``order`` (indices into ``s.candidates``) removed on top of ``removed``.
        ``predicted``: block positions of the step's likely winners (states are saved there); ``known``: complete
        losses of this step computed elsewhere (a bound, and leaders). Returns ``losses`` (the complete ones,
        by index), ``abandoned`` (indices) and ``work`` (blocks run, complete heads, head work)."""
        w0 = self.work()
        if self.s.exact:
            r = self.r
            losses = {i: math.fsum(r.loss(b, r.run(b, r.emb[b], 0, removed | frozenset(self.s.candidates[i])))
                                   for b in range(len(r.batches))) for i in bar(order)}
            abandoned = []
        else:
            if removed != self.current:
                self._pin(removed)
            losses, abandoned = self._fast(removed, order, predicted, known, bar)
        return {"losses": losses, "abandoned": abandoned, "work": tuple(b - a for a, b in zip(w0, self.work()))}

    def _pin(self, removed: frozenset) -> None:
        """The current model's states at every position: pinned, shared by all candidates of the step."""
        r, cache = self.r, self.cache
        cache.keep_useful(removed)  # drops states no later removal set can use (a block removed since), unpins
        for b in range(len(r.batches)):
            start, h = 0, r.emb[b]
            while start + 1 < r.n_pos and cache.key(b, start + 1, removed) in cache.entries:
                start += 1
                h = cache.entries[cache.key(b, start, removed)]
            for pos in range(start + 1):
                if cache.key(b, pos, removed) in cache.entries:
                    cache.pinned.add(cache.key(b, pos, removed))
            cache.put(cache.key(b, start, removed), h, pin=True)
            r.run(b, h, start, removed, save=lambda pos, x, b=b: cache.put(cache.key(b, pos, removed), x, pin=True))
        self.current = removed

    def _fast(self, removed, order, predicted, known, bar) -> tuple[dict, list]:
        r, s, cache = self.r, self.s, self.cache
        nb = len(r.batches)
        inf = float("inf")
        margin = 1e-5 * r.tokens  # nats: far above float rounding of the bounds, far below candidates' gaps
        best = min(known, key=lambda j: (known[j], j)) if known else None
        best_loss = known[best] if known else inf
        losses, abandoned = {}, []
        for i in bar(order):
            cand = s.candidates[i]
            rem = removed | frozenset(cand)
            # save states where the likely winners sit: predicted by the last step, and the best of this one so far
            seen = known | losses
            leaders = sorted(seen, key=lambda j: (seen[j], j))[: s.watch]
            watch = sorted(predicted | {min(s.candidates[j]) for j in leaders})
            heads = []

            def over() -> bool:
                return math.fsum(hd.value for hd in heads) > best_loss + margin

            for b in range(nb):  # the blocks of every batch, each followed by the first chunk of its head
                pos, h = cache.latest(b, rem, r.n_pos - 1) or (0, r.emb[b])
                save = _saver(cache, b, rem, [w for w in watch if w > pos and w not in rem])
                heads.append(r.head(b, r.run(b, h, pos, rem, save)))
                heads[-1].advance()
                if over():
                    break
            else:  # then the next chunk of every batch, and so on, until the candidate is dropped or complete
                while not over() and not all(hd.complete for hd in heads):
                    for hd in heads:
                        if not hd.complete:
                            hd.advance()
                            if over():
                                break
            if len(heads) < nb or not all(hd.complete for hd in heads):
                abandoned.append(i)
                continue
            losses[i] = math.fsum(hd.value for hd in heads)
            if (losses[i], i) < (best_loss, best if best is not None else inf):
                best, best_loss = i, losses[i]
        return losses, abandoned


def step_order(s: SearchSettings, remaining: list[int], last: dict) -> tuple[list[int], set[int]]:
    """The order candidates are tried in (fast search: best-first by their loss at the previous step, abandoned
    ones last, later blocks first) and the positions of the predicted winners."""
    if s.exact:
        return remaining, set()
    inf = float("inf")
    order = sorted(remaining, key=lambda i: (last.get(str(i), inf), -min(s.candidates[i]), i))
    return order, {min(s.candidates[i]) for i in order[: s.watch] if str(i) in last}


def merge_step(s: SearchSettings, remaining: list[int], losses: dict, work) -> dict:
    """The step's decision from all complete losses: the lowest (loss, index); its loss is bitwise the same
    wherever and in whatever order the candidates were evaluated."""
    best = min(losses, key=lambda i: (losses[i], i))
    return {"best": best, "loss": losses[best], "losses": dict(sorted(losses.items())), "full": len(losses),
            "abandoned": len(remaining) - len(losses), "work": work}


class LocalSteps:
    """The greedy steps in this process: every candidate through one ``CandidateScorer``."""

    def __init__(self, replayer: Replayer, s: SearchSettings):
        self.s, self.tokens = s, replayer.tokens
        self.scorer = CandidateScorer(replayer, s)

    def dense_loss(self) -> float:
        return self.scorer.dense_loss()

    def step(self, removed, remaining, last, progress, n) -> dict:
        order, predicted = step_order(self.s, remaining, last)
        desc = f"step {n}" + (" (exact)" if self.s.exact else "")
        res = self.scorer.score(removed, order, predicted, {},
                                bar=lambda it: progress_bar(it, desc=desc, enabled=progress))
        return merge_step(self.s, remaining, res["losses"], res["work"])


class PooledSteps:
    """The greedy steps on a worker pool (``runtime.pool.Workers`` whose workers hold ``CandidateScorer``s).

    The candidates of a step are sent one at a time, best-first, each with the complete losses known so far
    (their minimum is the abandonment bound, the best few the leaders whose positions get saved states), to
    the worker that evaluated that candidate at the previous step (its cache holds the candidate's states)
    when it is alive. Whichever worker evaluates a candidate, a complete loss is bitwise the one this process
    would compute, an abandoned candidate is worse than a complete one, and ``merge_step`` picks the same
    winner: the order and the losses are those of ``LocalSteps``. The counts of abandoned candidates and of
    work done depend on timing."""

    def __init__(self, workers, tokens: int, s: SearchSettings):
        self.workers, self.tokens, self.s = workers, tokens, s
        self.owner: dict[int, int] = {}  # candidate -> the worker that evaluated it last

    def dense_loss(self) -> float:
        return self.workers.call("dense_loss")

    def step(self, removed, remaining, last, progress, n) -> dict:
        order, predicted = step_order(self.s, remaining, last)
        losses, work = {}, [0, 0, 0.0]

        def args(i):
            leaders = sorted(losses, key=lambda j: (losses[j], j))[: max(1, self.s.watch)]
            return removed, [i], predicted, {j: losses[j] for j in leaders}

        def done(i, w, res):
            losses.update(res["losses"])
            self.owner[i] = w
            for k, x in enumerate(res["work"]):
                work[k] += x

        self.workers.map(order, "score", args, on_result=done, prefer=self.owner.get, progress=progress,
                         desc=f"step {n} ({len(self.workers.alive)} workers)" + (" (exact)" if self.s.exact else ""))
        return merge_step(self.s, remaining, losses, tuple(work))


def greedy_search(replayer, spec: ModelSpec, s: SearchSettings, state_path: Path | None = None,
                  method: str = "", progress: bool = False, on_step: Callable | None = None) -> dict:
    """Runs (or resumes) the greedy removal; returns the state: ``steps`` (one dict per removal) and counts.
    ``replayer``: a ``Replayer`` (the search in this process) or the steps' runner (``PooledSteps``)."""
    if s.target_ratio is None and s.max_steps is None:
        raise ValueError("greedy_search needs a target ratio or a number of steps")
    runner = LocalSteps(replayer, s) if isinstance(replayer, Replayer) else replayer
    all_pos = sorted(p for c in s.candidates for p in c)
    reach = removal_ratio(spec, all_pos)
    if s.target_ratio is not None and reach < s.target_ratio:
        raise UserError(f"target ratio {s.target_ratio} is out of reach: removing every candidate gives {reach:.4f}")
    state = _load_state(state_path, spec, s.fingerprint()) or {
        "format": ORDER_FORMAT, "method": method, "dims": spec.as_dict(), "search": s.fingerprint(),
        "tokens": runner.tokens, "dense": None, "steps": [], "last_losses": {}}

    removed = frozenset(p for st in state["steps"] for p in parse_units(st["removed"]))
    if state["dense"] is None:
        loss = runner.dense_loss()
        state["dense"] = {"loss": loss, "ppl": math.exp(loss / runner.tokens)}

    def done() -> bool:
        n = len(state["steps"])
        if s.max_steps is not None and n >= s.max_steps:
            return True
        if s.target_ratio is not None and removal_ratio(spec, sorted(removed)) >= s.target_ratio - 1e-12:
            return True
        return not [c for c in s.candidates if not set(c) & removed]

    while not done():
        t0 = time.time()
        remaining = [i for i, c in enumerate(s.candidates) if not set(c) & removed]
        step = runner.step(removed, remaining, state["last_losses"], progress, len(state["steps"]) + 1)
        best = s.candidates[step["best"]]
        removed = removed | frozenset(best)
        state["steps"].append({
            "removed": _candidate_label(best),
            "blocks": [Block.at(p).name for p in best],
            "loss": step["loss"],
            "ppl": math.exp(step["loss"] / runner.tokens),
            "ratio": removal_ratio(spec, sorted(removed)),
            "candidates": len(remaining),
            "evaluations_full": step["full"],
            "evaluations_abandoned": step["abandoned"],
            "blocks_run": step["work"][0],
            "heads_run": step["work"][1],
            "head_work": step["work"][2],
            "seconds": time.time() - t0,
        })
        state["last_losses"] = {str(i): v for i, v in step["losses"].items()}
        if state_path is not None:
            atomic_write_text(state_path, json.dumps(state, indent=1))
        if on_step is not None:
            on_step(state)
    return state


def parse_units(label: str) -> list[int]:
    if label.startswith("layer") and label[5:].isdigit():
        return list(layer_positions(int(label[5:])))
    return [Block.parse(x).pos for x in label.split("+")]


def _saver(cache: StateCache, b: int, rem: frozenset, positions: list[int]):
    if not positions:
        return None
    wanted = set(positions)

    def save(pos, h):
        if pos in wanted:
            cache.put(cache.key(b, pos, rem), h)
    return save


def plan_from_order(spec: ModelSpec, steps: list[dict], target_ratio: float | None, n_steps: int | None, method: str) -> tuple[PruningPlan, int]:
    """The plan of the shortest prefix of ``steps`` reaching ``target_ratio`` (or the first ``n_steps``)."""
    if target_ratio is not None:
        for k, st in enumerate(steps, 1):
            if st["ratio"] >= target_ratio - 1e-12:
                break
        else:
            have = steps[-1]["ratio"] if steps else 0.0
            raise UserError(f"the removal order reaches ratio {have:.4f} in {len(steps)} steps, short of the target {target_ratio}")
    else:
        k = min(n_steps, len(steps))
    blocks = [Block.at(p) for st in steps[:k] for p in parse_units(st["removed"])]
    return PruningPlan.from_removed_blocks(spec, blocks, method), k
