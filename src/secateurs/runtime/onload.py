"""Layer-by-layer (onloaded) models: the weights stay in their safetensors file; a decoder layer is read onto the
compute device when it runs and dropped after; the embedding and the output head are read a few rows or one
block of the vocabulary at a time.

- ``build_skeleton``: the model a configuration describes with every parameter on the meta device (no memory)
  and real buffers (rotary frequencies, embedding scales), initialised as ``from_pretrained`` initialises them.
- ``materialize`` / ``release``: a module's parameters read from the file into the working dtype on the device,
  and put back on the meta device. The module objects stay, so hooks on them (input statistics, masks) keep
  working. ``resolve_keys`` finds every parameter's tensor in the file (a tied head reads the embedding).
- ``Onloader`` (attached to the model as ``model.secateurs_onloader``): the layer-by-layer runtime of one
  model: ``layer(i)`` (one streamed slot, plus layers pinned while the budget allows), ``embed(ids)``,
  ``layer_kwargs`` (what the model passes to its layers, recorded without running them), ``head_block`` /
  ``head_rows`` and ``layer_major`` (every batch through layer 0, then layer 1, ...: each layer is read once
  per pass). Every operation is the one the resident model runs, on the same inputs: results are bitwise
  those of the resident model (tests/test_runtime.py).
- ``SpillStore``: tensors kept on the device while the budget allows, then in CPU memory (below a GPU), then in
  files under the run's spill folder; ``KeptStore``: such tensors by key, each given back to the budget when it is
  replaced or dropped (the hidden states of passes: ``HiddenStore``; the greedy search's pinned states and head
  chunks).
"""
from __future__ import annotations

import contextlib
import itertools
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..progress import progress_bar
from .placement import Budget, format_size
from .st_io import SafetensorsSource
from ..models import get_adapter
from .head import block_bounds


# --- skeletons and materialization ----------------------------------------------------------------------------
def build_skeleton(config, dtype: torch.dtype, device) -> nn.Module:
    """The model of ``config`` with its parameters on the meta device and its buffers real on ``device``."""
    from transformers import AutoModelForCausalLM

    config.dtype = dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad(), torch.device(device):  # buffers computed on ``device``, whatever the caller's default
        for mod in model.modules():
            if any(b is not None for b in mod._buffers.values()):
                for name, b in mod._buffers.items():
                    if b is not None:
                        mod._buffers[name] = torch.empty_like(b, device=device)
                model._init_weights(mod)  # rotary frequencies, embedding scale: as from_pretrained computes them
    model.config.dtype = dtype
    return model.eval()


def resolve_keys(model: nn.Module, source: SafetensorsSource) -> dict:
    """``{(id(module), param name): tensor name in the file}`` for every parameter of the model."""
    names = defaultdict(list)
    for n, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(n)
    keys = {}
    for mn, mod in model.named_modules(remove_duplicate=False):
        for pn, p in mod._parameters.items():
            if p is None:
                continue
            full = f"{mn}.{pn}" if mn else pn
            key = full if full in source else next((n for n in names[id(p)] if n in source), None)
            if key is None:
                raise UserError(f"{source.folder}: the checkpoint has no tensor for {full}")
            if tuple(source.shape(key)) != tuple(p.shape):
                raise UserError(f"{source.folder}: {key} has shape {source.shape(key)}, the model expects {tuple(p.shape)}")
            keys[id(mod), pn] = key
    return keys


def materialize(module: nn.Module, source: SafetensorsSource, keys: dict, dtype, device, cache: dict | None = None) -> None:
    """Reads the module's meta parameters from ``source`` into ``dtype`` on ``device`` (``cache``: tensors
    already read, by name, reused instead of reading the file again). Tied parameters stay one tensor."""
    done: dict = {}
    for mod in module.modules():
        for pn, p in list(mod._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) not in done:
                key = keys[id(mod), pn]
                t = cache.get(key) if cache is not None else None
                if t is None:
                    t = source.read(key).to(dtype)
                done[id(p)] = nn.Parameter(t.to(device), requires_grad=False)
            mod._parameters[pn] = done[id(p)]


def release(module: nn.Module) -> None:
    """Puts the module's parameters back on the meta device (their memory is freed)."""
    done: dict = {}
    for mod in module.modules():
        for pn, p in list(mod._parameters.items()):
            if p is not None and p.device.type != "meta":
                if id(p) not in done:
                    done[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
                mod._parameters[pn] = done[id(p)]


def _param_bytes(module: nn.Module, dtype) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in module.parameters()) * item


# --- kept tensors: device, CPU, disk -------------------------------------------------------------------------
class Kept:
    """A tensor kept by a ``SpillStore``: on the device (``t``), in CPU memory (``t`` on the CPU) or in a file."""

    __slots__ = ("store", "t", "path", "shape", "dtype", "device", "nbytes", "tier")

    def __init__(self, store, tier, t=None, path=None, shape=None, dtype=None, device=None, nbytes=0):
        self.store, self.tier, self.t, self.path = store, tier, t, path
        self.shape, self.dtype, self.device, self.nbytes = shape, dtype, device, nbytes

    def get(self) -> torch.Tensor:
        if self.t is not None:
            return self.t if self.t.device == self.device else self.t.to(self.device)
        buf = bytearray(self.nbytes)
        with open(self.path, "rb") as f:
            f.readinto(buf)
        t = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        return t.view(self.dtype).reshape(self.shape).to(self.device)

    def release(self) -> None:
        if self.tier is None:
            return
        self.store.budget.give(self.nbytes, self.tier)
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self.t = self.path = self.tier = None


class SpillStore:
    """Keeps tensors within a ``Budget``: on the device, then in CPU memory (a GPU run), then in files."""

    _ids = itertools.count()

    def __init__(self, budget: Budget):
        self.budget = budget

    def keep(self, t: torch.Tensor, tiers=("device", "cpu", "disk")) -> Kept | None:
        """A handle to ``t`` in the first tier with room, or None when none has any."""
        n = t.numel() * t.element_size()
        for tier in tiers:
            if tier == "cpu" and self.budget.device.type == "cpu":
                continue
            if tier == "disk" and self.budget.spill_dir is None:
                continue
            if not self.budget.take(n, tier):
                continue
            if tier == "device":
                return Kept(self, tier, t=t, shape=t.shape, dtype=t.dtype, device=t.device, nbytes=n)
            if tier == "cpu":
                return Kept(self, tier, t=t.to("cpu"), shape=t.shape, dtype=t.dtype, device=t.device, nbytes=n)
            folder = Path(self.budget.spill_dir)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"t{os.getpid()}-{next(self._ids)}.bin"
            with open(path, "wb") as f:
                f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            return Kept(self, tier, path=path, shape=t.shape, dtype=t.dtype, device=t.device, nbytes=n)
        return None


class KeptStore:
    """Tensors by key. With a ``SpillStore`` each is kept within its budget (``put``'s tiers, in order) and given
    back when replaced, dropped or closed; without one (a resident model) they stay as they are."""

    def __init__(self, spill: SpillStore | None = None):
        self.spill = spill
        self.items: dict = {}

    def put(self, key, t: torch.Tensor, tiers=("device", "cpu", "disk")):
        """Keeps ``t`` under ``key`` (replacing what it held); returns its handle (``Kept``, or ``t`` itself
        without a spill store), or None when no tier has room (then nothing is kept)."""
        self.drop(key)
        k = t if self.spill is None else self.spill.keep(t, tiers)
        if k is not None:
            self.items[key] = k
        return k

    def get(self, key) -> torch.Tensor:
        v = self.items[key]
        return v.get() if isinstance(v, Kept) else v

    def drop(self, key) -> None:
        v = self.items.pop(key, None)
        if isinstance(v, Kept):
            v.release()

    def keys(self) -> list:
        return list(self.items)

    def __contains__(self, key) -> bool:
        return key in self.items

    def __len__(self) -> int:
        return len(self.items)

    def close(self) -> None:
        for key in self.keys():
            self.drop(key)


class HiddenStore(KeptStore):
    """Hidden states of every calibration batch between two layers, by batch index; a state that finds no room
    is a UserError that says what was free."""

    def put(self, b: int, t: torch.Tensor, tiers=("device", "cpu", "disk")):
        k = super().put(b, t, tiers)
        if k is None:
            b_ = self.spill.budget
            disk = (f"{format_size(b_.free('disk'))} for spilled files" if b_.spill_dir is not None
                    else "no folder for spilled files")
            raise UserError(f"the calibration states do not fit: {format_size(b_.free('device'))} free on the device "
                            f"and {disk}; raise --max-memory (disk=SIZE for spilled files) or use fewer calibration rows")
        return k


# --- the layer-by-layer runtime of one model -----------------------------------------------------------------
class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer while the model's own forward computes what it passes to its layers."""

    def __init__(self, layer: nn.Module, box: list, i: int):
        super().__init__()
        self.box, self.i = box, i
        for attr in ("attention_type", "layer_idx"):
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        self.box[self.i] = kwargs
        return h


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and not hasattr(a, "__dict__") and a == b)


class Onloader:
    """The layer-by-layer runtime of one model (module docstring). ``budget`` holds what the run may keep;
    ``reserve`` bytes of it (the resident parts, one streamed unit and one batch's working set) are set aside."""

    def __init__(self, model: nn.Module, source: SafetensorsSource, device, dtype: torch.dtype, budget: Budget,
                 reserve: int = 0):
        self.model, self.source = model, source
        self.device, self.dtype, self.budget = torch.device(device), dtype, budget
        self.adapter = get_adapter(model)
        self.keys = resolve_keys(model, source)
        self.spill = SpillStore(budget)
        if not budget.take(reserve):
            raise UserError(f"--max-memory {format_size(budget.device_bytes)} is below the {format_size(reserve)} "
                            "that layer-by-layer work needs")
        self.reserve = reserve
        self.layers = self.adapter.layers()
        emb, head = model.get_input_embeddings(), self.adapter.lm_head()
        self.embed_key = self.keys[id(emb), "weight"]
        self.head_key = self.keys[id(head), "weight"]
        self.head_bias_key = self.keys.get((id(head), "bias")) if head.bias is not None else None
        self.vocab = source.shape(self.head_key)[0]
        streamed = {id(p) for p in self.layers.parameters()} | {id(emb.weight), id(head.weight)}
        if head.bias is not None:
            streamed.add(id(head.bias))
        for mod in model.modules():  # the rest (norms, ...) is resident
            for pn, p in list(mod._parameters.items()):
                if p is not None and p.device.type == "meta" and id(p) not in streamed:
                    t = source.read(self.keys[id(mod), pn]).to(dtype).to(self.device)
                    mod._parameters[pn] = nn.Parameter(t, requires_grad=False)
        self.pinned: dict[int, int] = {}  # layer -> bytes taken from the budget
        self.slot: int | None = None
        self.cpu_cache: dict = {}  # a GPU run: tensors kept in CPU memory while its budget allows
        self.loads = 0  # layers read (for tests and progress)
        model.secateurs_onloader = self

    def key_of(self, name: str) -> str:
        """The file's tensor for the model's parameter ``name``."""
        path, _, pn = name.rpartition(".")
        return self.keys[id(self.model.get_submodule(path)), pn]

    # --- layers ------------------------------------------------------------------------------------------
    def layer_bytes(self, i: int) -> int:
        return _param_bytes(self.layers[i], self.dtype)

    def _materialize(self, module: nn.Module) -> None:
        tensors = None
        if self.device.type == "cuda":  # read layers stay in CPU memory while its budget allows
            tensors = {}
            for mod in module.modules():
                for pn, p in mod._parameters.items():
                    if p is None or p.device.type != "meta":
                        continue
                    key = self.keys[id(mod), pn]
                    t = self.cpu_cache.get(key)
                    if t is None:
                        t = self.source.read(key).to(self.dtype)
                        if self.budget.take(t.numel() * t.element_size(), "cpu"):
                            self.cpu_cache[key] = t
                    tensors[key] = t
        materialize(module, self.source, self.keys, self.dtype, self.device, tensors)

    def layer(self, i: int) -> nn.Module:
        """Decoder layer ``i`` with its weights on the device (pinned, or in the one streamed slot)."""
        if i in self.pinned or self.slot == i:
            return self.layers[i]
        self.release_slot()
        self._materialize(self.layers[i])
        self.loads += 1
        self.slot = i
        return self.layers[i]

    def release_slot(self) -> None:
        if self.slot is not None:
            release(self.layers[self.slot])
            self.slot = None

    def pin_layers(self, order, max_bytes: int) -> list[int]:
        """Keeps layers (in ``order``) on the device while they fit in ``max_bytes`` of the budget."""
        spent = 0
        for i in order:
            if i in self.pinned:
                continue
            n = self.layer_bytes(i)
            if spent + n > max_bytes or not self.budget.take(n):
                break
            if self.slot == i:
                self.slot = None
            else:
                self._materialize(self.layers[i])
                self.loads += 1
            self.pinned[i] = n
            spent += n
        return sorted(self.pinned)

    def unpin_all(self) -> None:
        for i, n in self.pinned.items():
            release(self.layers[i])
            self.budget.give(n)
        self.pinned.clear()
        self.release_slot()

    @contextlib.contextmanager
    def using(self, i: int):
        """Layer ``i`` on the device for the duration of the block."""
        layer = self.layer(i)
        try:
            yield layer
        finally:
            if self.slot == i:
                self.release_slot()

    # --- embedding, layer arguments, head ---------------------------------------------------------------------
    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings of ``ids``, computed by the model's own embedding module on the rows it needs."""
        uniq, inverse = torch.unique(ids.cpu(), return_inverse=True)
        rows = self.source.read_rows(self.embed_key, uniq).to(self.dtype).to(self.device)
        emb = self.model.get_input_embeddings()
        saved, pad = emb._parameters["weight"], emb.padding_idx
        emb._parameters["weight"] = nn.Parameter(rows, requires_grad=False)
        emb.padding_idx = None
        try:
            return emb(inverse.to(self.device))
        finally:
            emb._parameters["weight"], emb.padding_idx = saved, pad

    @torch.inference_mode()
    def layer_kwargs(self, emb: torch.Tensor) -> list[dict]:
        """What the model's forward passes to each layer for a batch whose embeddings are ``emb`` (masks, rotary
        embeddings...), recorded by running the forward with stand-ins for the layers."""
        decoder = self.adapter.decoder()
        box: list = [None] * len(self.layers)
        real = decoder.layers
        decoder.layers = nn.ModuleList([_Recorder(l, box, i) for i, l in enumerate(real)])

        def stop(mod, args):
            raise _Stop

        handle = self.adapter.final_norm().register_forward_pre_hook(stop, prepend=True)  # before any other hook
        try:
            decoder(inputs_embeds=emb, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
            decoder.layers = real
        return box

    def head_block(self, a: int, e: int):
        w = self.source.read(self.head_key, a, e).to(self.dtype).to(self.device)
        b = None if self.head_bias_key is None else self.source.read(self.head_bias_key, a, e).to(self.dtype).to(self.device)
        return w, b

    def head_rows(self, idx: torch.Tensor):
        w = self.source.read_rows(self.head_key, idx).to(self.dtype).to(self.device)
        b = None if self.head_bias_key is None else self.source.read_rows(self.head_bias_key, idx).to(self.dtype).to(self.device)
        return w, b

    def head_blocks(self):
        for a, e in block_bounds(self.vocab):
            w, b = self.head_block(a, e)
            yield a, w, b

    # --- passes ---------------------------------------------------------------------------------------------
    def inputs(self, batches) -> tuple[list, list]:
        """(embeddings, per-layer keyword arguments) of every batch; arguments equal to the previous batch's are
        shared with it (rows of one length get the same masks and rotary embeddings)."""
        embs, kws = [], []
        for ids in batches:
            e = self.embed(ids)
            kw = self.layer_kwargs(e)
            if kws and _same(kw, kws[-1]):
                kw = kws[-1]
            embs.append(e)
            kws.append(kw)
        return embs, kws

    @torch.inference_mode()
    def layer_major(self, batches, on_layer=None, progress: bool = False, desc: str = "layers",
                    inputs: tuple | None = None) -> HiddenStore:
        """Every batch through layer 0, then layer 1, ... (each layer read once); ``on_layer(i, b, h_in, h_out)``
        sees each step. Returns the hidden states after the last layer (before the final norm), by batch."""
        embs, kws = inputs if inputs is not None else self.inputs(batches)
        store = HiddenStore(self.spill)
        for b, e in enumerate(embs):
            store.put(b, e)
        del embs
        for i in progress_bar(range(len(self.layers)), desc=desc, enabled=progress):
            with self.using(i) as layer:
                for b in range(len(store)):
                    h = store.get(b)
                    out = layer(h, **kws[b][i])
                    if on_layer is not None:
                        on_layer(i, b, h, out)
                    store.put(b, out)
        return store
