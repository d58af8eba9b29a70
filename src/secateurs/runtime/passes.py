"""Calibration passes: what methods and searches ask the runtime to run on rows of tokens. Each pass has two
paths with bitwise the same results (same operations, same batches, same order of accumulation per batch):

- a resident model (on one device, or split across GPUs by ``device_map``): batch after batch through the
  model's own forward, as before;
- an onloaded model (``runtime.onload``): every batch through layer 0, then layer 1, ... (``layer_major``),
  each layer read once per pass, hidden states kept within the budget.

``forward_rows`` runs the rows through the decoder and its final norm (hooks on the model's modules see
everything: input statistics, residual streams); ``row_nll`` is the per-row summed NLL (perplexity, fitness);
``capture_batches`` gives what a replay needs (embeddings, per-layer arguments, final hidden states);
``vocab_mass`` the dense model's probability mass over the vocabulary; ``layer_pass`` shows every layer's input
and output (Block Influence); ``layer_weights`` a layer with its weights present, for scores that read them.
"""
from __future__ import annotations

import contextlib

import torch

from ..progress import progress_bar
from .head import HeadMass, HeadNLL, block_bounds, resident_blocks
from .onload import HiddenStore
from .placement import input_device, onloader_of
from ..models import get_adapter
from ..importance.activations import capture


def batches_of(rows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [rows[i : i + batch_size] for i in range(0, rows.shape[0], batch_size)]


def _adapter(model):
    return get_adapter(model)


@torch.inference_mode()
def forward_rows(model, rows: torch.Tensor, batch_size: int, progress: bool = False, desc: str = "calibration") -> None:
    """Runs every batch of ``rows`` through the decoder, final norm included (no output head)."""
    ad, ol = _adapter(model), onloader_of(model)
    batches = batches_of(rows, batch_size)
    if ol is None:
        dev = input_device(model)
        for ids in progress_bar(batches, desc=desc, enabled=progress):
            ad.decoder()(input_ids=ids.to(dev), use_cache=False)
        return
    store = ol.layer_major(batches, progress=progress, desc=desc)
    try:
        for b in range(len(batches)):
            ad.final_norm()(store.get(b))
    finally:
        store.close()


@torch.inference_mode()
def row_nll(model, rows: torch.Tensor, batch_size: int = 4, progress: bool = False, desc: str = "perplexity") -> torch.Tensor:
    """Summed next-token NLL of every row (float64 [rows], on the CPU), the head in vocabulary blocks."""
    ad, ol = _adapter(model), onloader_of(model)
    batches = batches_of(rows, batch_size)
    if ol is None:
        dev, out = input_device(model), []
        for ids in progress_bar(batches, desc=desc, enabled=progress):
            x = ad.decoder()(input_ids=ids.to(dev), use_cache=False).last_hidden_state
            nll = HeadNLL(ad, x, ids)
            for a, w, bias in resident_blocks(ad):
                nll.add(x, a, w, bias)
            out.append(nll.result())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
    store = ol.layer_major(batches, progress=progress, desc=desc)
    try:
        for b in range(len(batches)):  # the final norm, once per batch
            store.put(b, ad.final_norm()(store.get(b)))
        heads = [HeadNLL(ad, store.get(b), ids) for b, ids in enumerate(batches)]
        for a, w, bias in ol.head_blocks():  # each block of the head read once, every batch through it
            for b, nll in enumerate(heads):
                nll.add(store.get(b), a, w, bias)
        return torch.cat([nll.result() for nll in heads])
    finally:
        store.close()


@torch.inference_mode()
def capture_batches(model, batches, finals: bool = True, progress: bool = False):
    """(embeddings, per-layer keyword arguments, final hidden states before the norm or None) of every batch:
    what replaying the model needs. Resident: one captured forward pass per batch; onloaded: embeddings and
    arguments without running a layer, the final states from one layer-major pass."""
    ad, ol = _adapter(model), onloader_of(model)
    if ol is None:
        embs, kws, outs = [], [], []
        for ids in batches:
            cap = capture(model, ad, ids)
            embs.append(cap.hidden[0])
            kws.append(cap.kwargs)
            outs.append(cap.hidden[-1] if finals else None)
        store = HiddenStore()
        for b, h in enumerate(outs):
            if h is not None:
                store.put(b, h)
        return embs, kws, store if finals else None
    embs, kws = ol.inputs(batches)
    store = ol.layer_major(batches, progress=progress, desc="calibration", inputs=(list(embs), kws)) if finals else None
    return embs, kws, store


@torch.inference_mode()
def vocab_mass(model, finals: HiddenStore, n: int) -> torch.Tensor:
    """Softmax probability of every vocabulary token summed over all positions of the ``n`` batches whose final
    hidden states (before the norm) are in ``finals`` (which this replaces by the normed states): float64
    [vocab]."""
    ad, ol = _adapter(model), onloader_of(model)
    for b in range(n):
        finals.put(b, ad.final_norm()(finals.get(b)))
    masses = [HeadMass(ad, finals.get(b)) for b in range(n)]
    if ol is None:
        total = torch.zeros(ad.lm_head().weight.shape[0], dtype=torch.float64)
        for b, m in enumerate(masses):  # batch after batch: two passes over the (resident) blocks
            x = finals.get(b)
            for a, w, bias in resident_blocks(ad):
                m.add_lse(x, w, bias)
            for a, w, bias in resident_blocks(ad):
                m.add_mass(x, total, a, w, bias)
        return total
    total = torch.zeros(ol.vocab, dtype=torch.float64)
    for second in (False, True):  # block after block (each read twice in all), every batch through it
        for a, e in block_bounds(ol.vocab):
            w, bias = ol.head_block(a, e)
            for b, m in enumerate(masses):
                if second:
                    m.add_mass(finals.get(b), total, a, w, bias)
                else:
                    m.add_lse(finals.get(b), w, bias)
    return total


@torch.inference_mode()
def layer_pass(model, rows: torch.Tensor, batch_size: int, on_layer, progress: bool = False, desc: str = "layers") -> None:
    """Calls ``on_layer(i, b, h_in, h_out)`` for every layer ``i`` and batch ``b`` (``h_out`` of the last layer is
    the state before the final norm). The order differs between the paths (batch-major when resident,
    layer-major when onloaded): accumulate per layer in batch order to get the same sums."""
    ad, ol = _adapter(model), onloader_of(model)
    batches = batches_of(rows, batch_size)
    if ol is None:
        for b, ids in enumerate(progress_bar(batches, desc=desc, enabled=progress)):
            hidden = capture(model, ad, ids).hidden
            for i in range(len(hidden) - 1):
                on_layer(i, b, hidden[i], hidden[i + 1])
        return
    ol.layer_major(batches, on_layer=on_layer, progress=progress, desc=desc).close()


@contextlib.contextmanager
def layer_weights(model, i: int):
    """Decoder layer ``i`` with its weights present for the duration of the block (read from the file and
    dropped after, for an onloaded model)."""
    ol = onloader_of(model)
    if ol is None:
        yield _adapter(model).layers()[i]
        return
    with ol.using(i) as layer:
        yield layer


def parameter_tensors(model, every: int = 1):
    """Every ``every``-th of the model's (unique) parameters in order, as tensors in the working dtype; those of
    an onloaded model are read from its file (the same values the resident model holds)."""
    ol = onloader_of(model)
    params = list(model.parameters())
    step = max(1, len(params) // every) if every > 1 else 1
    names = {id(p): n for n, p in model.named_parameters()}
    for p in params[::step]:
        if p.device.type != "meta":
            yield p
        else:
            yield ol.source.read(ol.key_of(names[id(p)])).to(ol.dtype)
