"""Pruned folders load anywhere: in a fresh process where secateurs cannot be imported (plain transformers,
remote code only where the structure needs it) and with ``secateurs.load``; same logits, same greedy
generation. Interrupted saves never leave a folder that passes for a good one; `secateurs apply` re-applies."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ARCHS, tiny_model
from secateurs.cli import main
from secateurs.errors import UserError
from secateurs.export.checkpoint import MODELING_FILE, _plain_config, load_pruned, save_pruned
from secateurs.models import get_adapter
from secateurs.plan import PruningPlan
from secateurs.surgery import apply_plan

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
NEW_TOKENS = 6

# Runs first in the child: secateurs becomes unimportable (a meta-path finder refuses it, and path entries
# holding a secateurs package, e.g. from the editable install's .pth, are dropped) and this is checked.
BLOCK_SECATEURS = """
import importlib.abc, os, sys
class _NoSecateurs(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "secateurs" or name.startswith("secateurs."):
            raise ModuleNotFoundError("secateurs is blocked in this process")
sys.meta_path.insert(0, _NoSecateurs())
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "secateurs"))]
try:
    import secateurs
    raise SystemExit("secateurs is importable in the child")
except ModuleNotFoundError:
    pass
"""

CHILD = BLOCK_SECATEURS + """
import json, torch
from transformers import AutoModelForCausalLM
jobs = json.loads(sys.argv[1])
for job in jobs:
    model = AutoModelForCausalLM.from_pretrained(job["dir"], trust_remote_code=job["remote"], dtype=torch.float32).eval()
    ids = torch.tensor(job["ids"])
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids, max_new_tokens=job["new"], do_sample=False, min_new_tokens=job["new"],
                             pad_token_id=0)
    res = {"logits": logits, "gen": gen, "class": type(model).__name__}
    if job.get("text"):
        from transformers import AutoTokenizer
        res["text_ids"] = AutoTokenizer.from_pretrained(job["dir"], trust_remote_code=job["remote"])(job["text"]).input_ids
    torch.save(res, job["out"])
assert not any(m == "secateurs" or m.startswith("secateurs.") for m in sys.modules)
print("CHILD-OK")
"""


def child_env(tmp_path) -> dict:
    """The child's environment: secateurs *would* be importable (its source folder is on PYTHONPATH, and the
    venv may have an editable install); only the guard at the top of the child's code removes it."""
    import secateurs

    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    env.update(PYTHONPATH=str(Path(secateurs.__file__).resolve().parents[1]), HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run_child(jobs, tmp_path):
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], cwd=tmp_path, env=child_env(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "CHILD-OK" in r.stdout, r.stderr[-3000:]


def test_child_really_cannot_import_secateurs(tmp_path):
    env = child_env(tmp_path)
    base = subprocess.run([sys.executable, "-c", "import secateurs.plan"], cwd=tmp_path, env=env, capture_output=True)
    assert base.returncode == 0  # without the guard, the child could import secateurs ...
    code = BLOCK_SECATEURS + "import secateurs.plan\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "secateurs is blocked" in r.stderr  # ... and the child's guard removes it


def plans(spec):
    """name -> (plan, expected export kind)."""
    n, hs = spec.n_layers, spec.n_heads
    uneven = PruningPlan.dense(spec)
    uneven.layers[0].attn = False
    uneven.layers[1].heads = [1, 3]
    uneven.layers[1].channels = list(range(0, spec.intermediate, 2))
    uneven.layers[2].mlp = False
    uneven.layers[3].channels = list(range(10, 40))
    uneven.layers[3].attn_bias = [0.01 * i for i in range(spec.hidden)]
    depth = PruningPlan.from_removed_blocks(spec, [(1, "attn"), (1, "mlp"), (2, "attn"), (2, "mlp")])
    width = PruningPlan.dense(spec)
    for lp in width.layers[: n - 1]:
        lp.heads = [0, 2] if hs == 4 else None
        lp.channels = list(range(0, spec.intermediate, 2))
    width.layers[n - 1].attn = width.layers[n - 1].mlp = False
    return {"uneven": (uneven, "custom"), "depth": (depth, "stock-depth"), "width": (width, "stock-width")}


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    """Every architecture x plan kind: saved, then loaded in one fresh process without secateurs."""
    tmp = tmp_path_factory.mktemp("export")
    cases, jobs = {}, []
    for arch in ARCHS:
        model = tiny_model(arch)
        spec = get_adapter(model).spec()
        for name, (plan, want_kind) in plans(spec).items():
            pruned = apply_plan(tiny_model(arch), plan)
            folder = tmp / f"{arch}-{name}"
            kind = save_pruned(pruned, None, plan, _plain_config(model.config), folder)
            with torch.no_grad():
                logits = pruned(IDS).logits
                gen = pruned.generate(IDS, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            cases[arch, name] = dict(folder=folder, kind=kind, want_kind=want_kind, logits=logits, gen=gen, plan=plan)
            jobs.append({"dir": str(folder), "remote": kind == "custom", "ids": IDS.tolist(), "new": NEW_TOKENS,
                         "out": str(tmp / f"{arch}-{name}.pt")})
    run_child(jobs, tmp)
    for (arch, name), c in cases.items():
        c["child"] = torch.load(tmp / f"{arch}-{name}.pt")
    return cases


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["uneven", "depth", "width"])
def test_round_trip_without_secateurs(round_trips, arch, name):
    c = round_trips[arch, name]
    assert c["kind"] == c["want_kind"]
    files = set(os.listdir(c["folder"]))
    cfg = json.loads((c["folder"] / "config.json").read_text())
    if c["kind"] == "custom":
        assert MODELING_FILE in files and cfg["model_type"] == f"secateurs_{arch}" and "auto_map" in cfg
        assert c["child"]["class"] == "SecateursForCausalLM"
    else:  # stock architecture, loaded without remote code
        assert MODELING_FILE not in files and "auto_map" not in cfg and cfg["model_type"] == arch
        assert cfg["num_hidden_layers"] == sum(lp.attn or lp.mlp for lp in c["plan"].layers)
        assert c["child"]["class"] != "SecateursForCausalLM"
    torch.testing.assert_close(c["child"]["logits"], c["logits"], atol=1e-5, rtol=1e-5)
    assert torch.equal(c["child"]["gen"], c["gen"])
    assert c["gen"].shape[1] == IDS.shape[1] + NEW_TOKENS


@pytest.mark.parametrize("arch", ARCHS)
def test_secateurs_load_runs_no_folder_code(round_trips, arch):
    c = round_trips[arch, "uneven"]
    (c["folder"] / MODELING_FILE).write_text("raise RuntimeError('folder code was run')\n")
    try:
        model, tok = load_pruned(c["folder"])
    finally:
        from secateurs.export.checkpoint import modeling_source

        (c["folder"] / MODELING_FILE).write_text(modeling_source(arch))
    assert tok is None
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, c["logits"], atol=1e-5, rtol=1e-5)


def test_stock_width_needs_valid_stock_config(tmp_path):
    """A width plan equal in every layer but with bias compensation is not stock: it goes custom."""
    model = tiny_model("llama")
    spec = get_adapter(model).spec()
    plan = PruningPlan.dense(spec)
    for lp in plan.layers:
        lp.channels = list(range(48))
        lp.mlp_bias = [0.1] * spec.hidden
    kind = save_pruned(apply_plan(tiny_model("llama"), plan), None, plan, _plain_config(model.config), tmp_path / "o")
    assert kind == "custom"


def test_stock_config_refused_by_transformers_goes_custom(tmp_path):
    """Gemma with 3 of 4 heads in every layer: the stock config fails transformers' own validation (hidden size
    not a multiple of the head count, although head_dim is explicit); the export falls back to custom."""
    model = tiny_model("gemma3_text", num_key_value_heads=1)
    spec = get_adapter(model).spec()
    plan = PruningPlan.dense(spec)
    for lp in plan.layers:
        lp.heads = [0, 1, 3]
    kind = save_pruned(apply_plan(model, plan), None, plan, _plain_config(tiny_model("gemma3_text", num_key_value_heads=1).config), tmp_path / "o")
    assert kind == "custom"
    loaded, _ = load_pruned(tmp_path / "o")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, apply_plan(tiny_model("gemma3_text", num_key_value_heads=1), plan)(IDS).logits)


def _save_tiny(arch, plan_fn, out):
    model = tiny_model(arch)
    spec = get_adapter(model).spec()
    plan = plan_fn(spec)
    return save_pruned(apply_plan(model, plan), None, plan, _plain_config(tiny_model(arch).config), out), plan


def test_interrupted_save_leaves_no_good_looking_folder(tmp_path, monkeypatch):
    out = tmp_path / "pruned"
    _save_tiny("qwen2", lambda s: plans(s)["uneven"][0], out)
    good = {p: (out / p).read_bytes() for p in os.listdir(out)}

    def boom(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(PruningPlan, "save", boom)  # the save stops after the weights and config were written
    with pytest.raises(KeyboardInterrupt):
        _save_tiny("qwen2", lambda s: plans(s)["depth"][0], out)
    monkeypatch.undo()
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == good  # the earlier folder is untouched
    partial = tmp_path / "pruned.saving"
    assert (partial / "model.safetensors").exists()
    with pytest.raises(UserError):
        load_pruned(partial)  # secateurs.json comes last: the interrupted folder is not readable
    load_pruned(out)
    _save_tiny("qwen2", lambda s: plans(s)["depth"][0], out)  # a new save replaces the leftover
    assert not partial.exists() and json.loads((out / "secateurs.json").read_text())["export"] == "stock-depth"


def test_reads_format_1_folders(tmp_path):
    """Folders written before the Hugging Face export (model.safetensors + plan + secateurs.json) still load."""
    from safetensors.torch import save_model

    model = tiny_model("gemma3_text")
    dense = _plain_config(model.config)
    plan = plans(get_adapter(model).spec())["uneven"][0]
    apply_plan(model, plan)
    save_model(model, str(tmp_path / "model.safetensors"))
    plan.save(tmp_path / "plan.json")
    (tmp_path / "secateurs.json").write_text(json.dumps({"format": "secateurs-model/1", "dense_config": dense}))
    loaded, _ = load_pruned(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny dense llama saved as a model folder, with a tokenizer (borrowed from the embedded model)."""
    from transformers import AutoTokenizer

    from secateurs.sources import embedded_folder

    folder = tmp_path_factory.mktemp("dense") / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_folder("smollm2-135m", progress=False)).save_pretrained(folder)
    return folder


def test_apply_cli_reapplies_plan(tiny_folder, tmp_path, capsys):
    plan = plans(get_adapter(tiny_model("llama")).spec())["uneven"][0]
    plan.method = "hand"
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "applied"
    assert main(["apply", str(tmp_path / "plan.json"), str(tiny_folder), "--out", str(out), "--eval", "", "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    spec = get_adapter(tiny_model("llama")).spec()
    assert result["method"] == "hand" and result["ratio_achieved"] == pytest.approx(plan.ratio(spec))
    assert result["removed_blocks"] == ["attn0", "mlp2"] and result["ppl_test_after"] is None
    assert PruningPlan.load(out / "plan.json").to_dict()["layers"] == plan.to_dict()["layers"]
    import secateurs

    model, tok = secateurs.load(str(out))
    want = apply_plan(tiny_model("llama"), plan)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, want(IDS).logits)
    assert tok is not None
    # a pruned folder can be given instead of its plan.json
    assert main(["apply", str(out), str(tiny_folder), "--out", str(tmp_path / "again"), "--eval", "", "--quiet"]) == 0


def test_apply_cli_user_errors(tiny_folder, tmp_path, capsys):
    assert main(["apply", str(tmp_path / "nope.json"), str(tiny_folder), "--out", str(tmp_path / "o"), "--eval", ""]) == 2
    assert "cannot read plan file" in capsys.readouterr().err
    other = PruningPlan.dense(get_adapter(tiny_model("llama", num_hidden_layers=3)).spec())
    other.save(tmp_path / "other.json")
    assert main(["apply", str(tmp_path / "other.json"), str(tiny_folder), "--out", str(tmp_path / "o"), "--eval", ""]) == 2
    assert "plan does not fit this model" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["apply", str(tmp_path / "other.json"), str(tiny_folder), "--out", str(tmp_path / "full"), "--eval", ""]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_real_model_round_trip(smollm, tmp_path):
    """SmolLM2 with uneven layers: the saved folder, loaded without secateurs, gives the same logits and text."""
    model, tok = smollm
    import copy

    spec = get_adapter(model).spec()
    plan = PruningPlan.dense(spec)
    for i, lp in enumerate(plan.layers):
        lp.channels = list(range(0, spec.intermediate, 1 + i % 3))
        lp.heads = [0, 1, 3, 4, 6, 7] if i % 2 else None
    plan.layers[20].attn = False
    plan.layers[21].attn = plan.layers[21].mlp = False
    pruned = apply_plan(copy.deepcopy(model), plan)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = pruned(ids).logits
        gen = pruned.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    folder = tmp_path / "smol"
    assert save_pruned(pruned, tok, plan, _plain_config(model.config), folder) == "custom"
    text = "Pruning keeps the model small."
    run_child([{"dir": str(folder), "remote": True, "ids": ids.tolist(), "new": 8, "out": str(tmp_path / "r.pt"),
                "text": text}], tmp_path)
    child = torch.load(tmp_path / "r.pt")
    assert child["text_ids"] == tok(text).input_ids
    torch.testing.assert_close(child["logits"], logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(child["gen"], gen)


def test_shipped_modeling_file_carries_the_one_partial_layer():
    """The modeling file of a custom folder holds secateurs/branches.py's own text (one definition of
    PartialLayer and branch_forward), and no import of secateurs."""
    import secateurs.branches
    from secateurs.export.checkpoint import modeling_source

    text = Path(secateurs.branches.__file__).read_text()
    body = text.split('"""', 2)[2].strip()
    src = modeling_source("gemma3_text")
    assert body in src and 'BASE_MODEL_TYPE = "gemma3_text"' in src
    assert not re.search(r"^\s*(from|import) secateurs", src, re.M)
