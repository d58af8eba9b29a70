"""The model card (``README.md``) of a pruned or healed folder, in the Hugging Face convention.

- YAML front matter: ``base_model`` (the source model as ``result.json`` records it), ``library_name``
  (transformers), ``license`` where the source states it (its folder's or cached hub card's front matter,
  or an embedded model's GGUF ``general.license``; else none), ``tags`` (pruned, secateurs, the method).
- What was removed, per layer, in a compact form (from ``plan.json``).
- The settings and the figures of the folder's own ``result.json``, with their rows: a figure the file does
  not record is not written, so the card claims nothing that was not measured for that folder.
- How to load it: transformers (``trust_remote_code`` only when the folder carries its modeling file),
  ``secateurs.load``, llama.cpp through ``secateurs export`` (or the folder's ``model.gguf``), and vLLM through
  ``secateurs export --format vllm`` (or the folder's ``vllm/``), each where the plan allows.

``write_card(folder)`` is called once ``result.json`` is final (prune, apply, heal).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from ..files import atomic_write_text
from ..models.base import adapter_class, supported_model_types
from ..plan import PruningPlan
from ..result import held_out_label

CARD = "README.md"
MODELING_FILE = "modeling_secateurs.py"


def write_card(folder: str | Path) -> None:
    folder = Path(folder)
    atomic_write_text(folder / CARD, card_text(folder))


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


# --- the source's license --------------------------------------------------------------------------------
def front_matter(text: str) -> dict[str, str]:
    """The top-level ``key: value`` lines of a model card's YAML front matter (values unquoted)."""
    if not text.startswith("---"):
        return {}
    out = {}
    for line in text.split("\n")[1:]:
        if line.strip() == "---":
            break
        key, sep, value = line.partition(":")
        if sep and key and not key[0].isspace() and value.strip():
            v = value.strip()
            out[key.strip()] = json.loads(v) if v.startswith('"') else v.strip("'")
    return out


def source_license(model: str | None) -> str | None:
    """The license the source model states, or None."""
    if not model:
        return None
    from ..sources.embedded import EMBEDDED, embedded_gguf

    card = None
    if Path(model).is_dir():
        card = Path(model) / CARD
    elif model in EMBEDDED:
        import gguf

        try:
            field = gguf.GGUFReader(str(embedded_gguf(model))).fields.get("general.license")
        except Exception:  # noqa: BLE001 - the embedded file unreadable here: no license claimed
            return None
        return str(field.contents()) if field is not None else None
    elif model.count("/") == 1:  # a hub id: its card if the hub cache holds it (never fetched for this)
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(model, CARD)
            card = Path(hit) if isinstance(hit, str) else None
        except Exception:  # noqa: BLE001 - no hub client or cache: no license claimed
            card = None
    if card is None or not card.exists():
        return None
    return front_matter(card.read_text(errors="replace")).get("license")


# --- what was removed --------------------------------------------------------------------------------------
def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts, i = [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        parts.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ", ".join(parts)


def _layer_word(layers: list[int]) -> str:
    return ("layer " if len(layers) == 1 else "layers ") + _ranges(layers)


def removed_lines(plan: PruningPlan) -> list[str]:
    """Per branch, the layers that share one outcome: 'layers 5, 8: attention removed'; widths that differ in
    almost every layer are listed per layer instead."""
    d = plan.dims
    n_heads, n_kv, inter = d["n_heads"], d["n_kv"], d["intermediate"]
    group = n_heads // n_kv
    attn, mlp, whole = {}, {}, []
    for i, lp in enumerate(plan.layers):
        if not (lp.attn or lp.mlp):
            whole.append(i)
            continue
        if not lp.attn:
            a = "attention removed"
        elif lp.heads is None or len(lp.heads) == n_heads:
            a = None
        else:
            kv = len({h // group for h in lp.heads})
            a = f"attention {n_heads} -> {len(lp.heads)} query heads" + (f" ({n_kv} -> {kv} KV heads)" if kv != n_kv else "")
        if not lp.mlp:
            m = "MLP removed"
        elif lp.channels is None or len(lp.channels) == inter:
            m = None
        else:
            m = f"MLP {inter} -> {len(lp.channels)} channels"
        for table, what in ((attn, a), (mlp, m)):
            if what is not None:
                table.setdefault(what, []).append(i)
    lines = [f"{_layer_word(whole)}: removed whole (attention and MLP)"] if whole else []
    for table, unit, full in ((attn, "query heads", n_heads), (mlp, "channels", inter)):
        narrowed = {k: v for k, v in table.items() if "removed" not in k}
        if len(narrowed) > 6:  # a width of its own in most layers: one line, layer by layer
            kept = [(i, len(lp.heads if unit == "query heads" else lp.channels)) for i, lp in enumerate(plan.layers)
                    if any(i in v for v in narrowed.values())]
            branch = "attention" if unit == "query heads" else "MLP"
            lines.append(f"{branch} {unit} kept (of {full}), per layer: " + ", ".join(f"{i}: {n}" for i, n in kept))
            table = {k: v for k, v in table.items() if k not in narrowed}
        lines += [f"{_layer_word(v)}: {k}" for k, v in table.items()]
    for name, what in (("attn_bias", "attention"), ("mlp_bias", "MLP")):
        comp = [i for i, lp in enumerate(plan.layers) if getattr(lp, name)]
        if comp:
            lines.append(f"{_layer_word(comp)}: bias added to the {what} output (compensation for what was removed)")
    untouched = [i for i, lp in enumerate(plan.layers) if lp.is_dense]
    if untouched:
        lines.append(f"{_layer_word(untouched)}: unchanged")
    return lines


# --- the figures ------------------------------------------------------------------------------------------
def _f(x: float) -> str:
    return f"{x:.3f}"


def _pair(label: str, before, after, names=("dense", "pruned")) -> str | None:
    got = [(n, v) for n, v in zip(names, (before, after)) if v is not None]
    if not got:
        return None
    return f"{label}: " + " -> ".join(f"{_f(v)} ({n})" for n, v in got)


def figure_lines(r: dict) -> list[str]:
    """The measured figures of ``result.json``, each with its rows; nothing the file does not record."""
    lines = []
    if r.get("params_before") and r.get("params_after"):
        ratio = r.get("ratio_achieved")
        lines.append(f"parameters: {r['params_before']:,} -> {r['params_after']:,}"
                     + (f" ({ratio:.2%} removed" + (f"; target {r['ratio_target']:.2%})" if r.get("ratio_target") else ")")
                        if ratio is not None else ""))
    if r.get("eval_set"):
        label = held_out_label(r).replace(" ppl", " perplexity", 1)
        if r.get("healed"):
            line = " -> ".join(f"{_f(v)} ({n})" for n, v in (("dense", r.get("ppl_test_before")),
                               ("pruned", r.get("ppl_test_pruned")), ("healed", r.get("ppl_test_after"))) if v is not None)
            if line:
                lines.append(f"{label}: {line}")
        elif (line := _pair(label, r.get("ppl_test_before"), r.get("ppl_test_after"))) is not None:
            lines.append(line)
    cal = r.get("calibration") or {}
    if cal.get("nsamples") and cal.get("seqlen"):
        calib = (r.get("settings") or {}).get("calib", "calibration")
        rows = f"{cal['nsamples']} row{'s' if cal['nsamples'] != 1 else ''} of {cal['seqlen']}"
        line = _pair(f"{calib} (calibration) perplexity ({rows})", r.get("ppl_calib_before"), r.get("ppl_calib_after"))
        if line:
            lines.append(line)
    if r.get("search_seconds") is not None:
        lines.append(f"search time: {r['search_seconds']:.1f} s")
    heal = r.get("heal") or {}
    if heal.get("tokens_seen"):
        secs = (heal.get("seconds") or {}).get("train")
        lines.append(f"healing: {heal['tokens_seen']:,} tokens in {heal.get('steps')} steps"
                     + (f", {secs:.0f} s of training" if secs else ""))
    g = r.get("gguf") or {}
    if g.get("file") and g.get("bytes"):
        lines.append(f"{g['file']}: GGUF {g.get('type')}, llama.cpp architecture {g.get('arch')}, "
                     f"{g['bytes'] / 2**20:.1f} MiB")
    return lines


SETTINGS_LEFT_OUT = ("placement", "plan_settings")  # long records kept in result.json itself


def _settings(r: dict) -> str:
    s = {k: v for k, v in (r.get("settings") or {}).items() if k not in SETTINGS_LEFT_OUT and v not in (None, "", {})}
    for switch, keys in (("export", ("export_type",)), ("eval", ("eval_rows", "eval_seqlen"))):
        if switch not in s:  # off: its details say nothing
            for k in keys:
                s.pop(k, None)
    return json.dumps(s, indent=1, sort_keys=True)


# --- the card ---------------------------------------------------------------------------------------------
def _yaml_scalar(v: str) -> str:
    return json.dumps(v)  # a JSON string is a YAML double-quoted scalar


def card_text(folder: Path) -> str:
    r = _json(folder / "result.json")
    meta = _json(folder / "secateurs.json")
    plan = PruningPlan.load(folder / "plan.json")
    source = r.get("model")
    method = r.get("method") or plan.method or "pruned"
    tags = ["pruned", "secateurs"] + [t if t != "heal" else "healed" for t in method.split("+")]
    license_ = source_license(source)
    fm = ["---"]
    if source:
        fm.append(f"base_model: {_yaml_scalar(source)}")
    fm.append("library_name: transformers")
    if license_:
        fm.append(f"license: {_yaml_scalar(license_)}")
    fm.append("tags:")
    fm += [f"- {_yaml_scalar(t)}" for t in dict.fromkeys(tags)]
    fm.append("---")

    model_type = plan_model_type(meta) or plan.dims.get("model_type")
    title = f"{source or 'A model'}, pruned with secateurs ({method})"
    out = fm + ["", f"# {title}", "",
                f"A structured pruning of `{source}` ({model_type}, {plan.dims.get('n_layers')} layers): the removed "
                "heads, channels and blocks are gone from the tensors, so the model is smaller and faster as it is, "
                "with no sparse kernels.", "", "## What was removed", ""]
    out += [f"- {line}" for line in removed_lines(plan)]
    figures = figure_lines(r)
    if figures:
        where = r.get("placement") or (r.get("settings") or {}).get("placement") or {}
        on = f" (measured on {where['device']} in {where['dtype']})" if where.get("device") and where.get("dtype") else ""
        out += ["", "## Measured", "", f"Figures from this folder's `result.json`{on}:", ""] + [f"- {x}" for x in figures]
    if r.get("settings"):
        out += ["", "## Settings", "", "```json", _settings(r), "```"]
    out += ["", "## How to load it", ""] + _load_lines(folder, meta, r)
    return "\n".join(out) + "\n"


def _weights(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors"))
    dtype = _json(folder / "config.json").get("dtype") or _json(folder / "config.json").get("torch_dtype")
    size = sum(f.stat().st_size for f in files) / 2**20
    return f"The weights: {size:,.0f} MiB of safetensors" + (f" in {dtype}" if dtype else "") + "."


def _load_lines(folder: Path, meta: dict, r: dict) -> list[str]:
    custom = (folder / MODELING_FILE).exists()
    v = (r.get("versions") or {})
    tf = f" (written with transformers {v['transformers']}, torch {v.get('torch')})" if v.get("transformers") else ""
    lines = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             'folder = "path/to/this/folder"  # or its Hugging Face id once uploaded',
             "model = AutoModelForCausalLM.from_pretrained(folder" + (", trust_remote_code=True)" if custom else ")"),
             "tok = AutoTokenizer.from_pretrained(folder)", "```", ""]
    if custom:
        lines.append(f"Needs torch and transformers{tf}. The layers differ in size, so the folder carries its own "
                     f"modeling file (`{MODELING_FILE}`, torch and transformers only): hence `trust_remote_code=True`.")
    else:
        lines.append(f"Needs torch and transformers{tf}: the stock architecture with changed sizes, no custom code.")
    lines += ["", _weights(folder), "",
              "With secateurs: `secateurs.load(folder)` (never runs the folder's code); `secateurs eval FOLDER`."]
    plan = functools.cache(lambda: PruningPlan.load(folder / "plan.json"))  # read once, only if a line needs it
    g = r.get("gguf") or {}
    if g.get("file"):
        lines += ["", f"llama.cpp, ollama, LM Studio: `{g['file']}` in this folder (GGUF {g.get('type')})."]
    elif g.get("refused"):
        lines += ["", f"llama.cpp: no GGUF for this plan ({g['refused'].split('; exportable')[0]})."]
    else:
        lines += ["", _gguf_line(plan_model_type(meta), plan())]
    v = r.get("vllm") or {}
    if v.get("folder"):
        flag = " --trust-remote-code" if v.get("architecture") == "DeciLMForCausalLM" else ""
        lines += ["", f"vLLM: `vllm serve {v['folder']}{flag}` (the folder `{v['folder']}` beside this card, "
                      f"architecture {v.get('architecture')})."]
    elif v.get("refused"):
        lines += ["", f"vLLM: no folder for this plan ({v['refused'].split('; ')[0]})."]
    else:
        lines += ["", _vllm_line(plan_model_type(meta), plan())]
    return lines


def plan_model_type(meta: dict) -> str | None:
    return (meta.get("dense_config") or {}).get("model_type")


def _even(plan: PruningPlan) -> bool:
    """Whether the plan leaves the stock architecture: every remaining layer whole, at one size, no added bias
    (whole layers removed leave a stock model)."""
    kept = [lp for lp in plan.layers if lp.attn or lp.mlp]
    return (all(lp.attn and lp.mlp and not lp.attn_bias and not lp.mlp_bias for lp in kept)
            and len({(len(lp.heads or ()), len(lp.channels or ())) for lp in kept}) == 1)


def _vllm_line(model_type: str | None, plan: PruningPlan) -> str:
    """How to serve it in vLLM, from the adapter's vLLM facts (``export.vllm``): whether vLLM can hold it."""
    facts = adapter_class(model_type).vllm.get(model_type) if model_type in supported_model_types() else None
    if facts is None:
        return f"vLLM: no vLLM export for model_type {model_type!r}."
    even = _even(plan)
    if not even and not facts.deci:
        return f"vLLM: no folder for this plan: its layers differ in size and {facts.why_not}."
    if not even and len({len(lp.heads) if lp.heads is not None else None for lp in plan.layers if lp.attn}) > 1:
        return ("vLLM: no folder for this plan: its layers keep different numbers of query heads, and vLLM's "
                "DeciLM model gives every layer the same (`secateurs prune --engine vllm` makes plans it holds).")
    return ("vLLM: `secateurs export FOLDER --format vllm --out DIR`, then `vllm serve DIR"
            + ("`" if even else " --trust-remote-code` (vLLM's DeciLMForCausalLM: per-layer blocks)") + ".")


def _gguf_line(model_type: str | None, plan: PruningPlan) -> str:
    """How to get a GGUF, from the adapter's llama.cpp facts: whether llama.cpp can hold this plan at all."""
    facts = adapter_class(model_type).llamacpp.get(model_type) if model_type in supported_model_types() else None
    if facts is None:
        return f"llama.cpp: no GGUF export for model_type {model_type!r}."
    even = _even(plan)
    if not even and facts.uneven is None:
        return f"llama.cpp: no GGUF for this plan: its layers differ in size and {facts.why_not}."
    return ("llama.cpp, ollama, LM Studio: `secateurs export FOLDER --type q4_k_m --out model.gguf` writes a GGUF "
            "(f16 without --type)" + (f"; this plan's uneven layers run as llama.cpp's `{facts.uneven}` architecture"
                                      if not even else "") + ".")
