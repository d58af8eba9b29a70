"""The in-process API (``secateurs.api``, docs/api.md): ``import secateurs`` stays light and exports every
method's config; ``prune`` gives the plan ``secateurs prune`` gives for the same settings (flap and shortgpt on
SmolLM2); the README's Python snippet runs; a method defined in this file is a method like the others."""
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import secateurs
from conftest import tiny_model
from secateurs.cli import main
from secateurs.errors import UserError
from secateurs.models import get_adapter

ROOT = Path(__file__).resolve().parents[1]
ROWS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))


def test_export_and_heal_stay_functions_after_their_subpackages_import():
    code = ("import secateurs, secateurs.export.gguf, secateurs.heal.job; from secateurs import api; "
            "from secateurs.export import vllm; "
            "assert secateurs.export is api.export, secateurs.export; assert secateurs.heal is api.heal, secateurs.heal; "
            "assert vllm.__name__ == 'secateurs.export.vllm'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_import_is_light_and_exports_every_config():
    code = ("import sys, secateurs; assert 'torch' not in sys.modules, 'torch imported by import secateurs'; "
            "print(sorted(n for n in secateurs.__all__))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(name in r.stdout for name in ("prune", "apply_plan", "evaluate", "save", "heal", "export", "bench"))
    from secateurs.methods import all_methods

    for m in all_methods().values():
        assert getattr(secateurs, m.config_cls.__name__) is m.config_cls
    with pytest.raises(AttributeError):
        secateurs.NoSuchConfig


def test_prune_dispatches_on_the_config_and_checks_first():
    model = tiny_model("llama")
    with pytest.raises(UserError, match="is not a method config; give one of .*FlapConfig"):
        secateurs.prune(model, None, object(), ratio=0.2, calib=ROWS)
    with pytest.raises(UserError, match="strictly between 0 and 1"):
        secateurs.prune(model, None, secateurs.FlapConfig(), ratio=1.5, calib=ROWS)
    with pytest.raises(UserError, match="speedup applies to .*not flap"):
        secateurs.prune(model, None, secateurs.FlapConfig(), speedup=1.3, calib=ROWS)
    with pytest.raises(UserError, match="exactly one budget"):
        secateurs.prune(model, None, secateurs.TellConfig(), ratio=0.2, speedup=1.3, calib=ROWS)
    with pytest.raises(UserError, match="--workers applies to the methods that search"):
        secateurs.prune(model, None, secateurs.FlapConfig(), ratio=0.2, calib=ROWS, workers=2)
    plan = secateurs.prune(model, None, secateurs.FlapConfig(), ratio=0.2, calib=ROWS, progress=False)
    assert plan.method == "flap" and plan.record["method_details"]["kept"] and "ppl_evaluations" in plan.record
    assert plan.meta["settings"]["calib"] == "rows given" and plan.meta["settings"]["nsamples"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["flap", "shortgpt"])
def test_cli_and_api_give_the_same_plan(method, smollm, tmp_path):
    out = tmp_path / "cli"
    assert main(["prune", "smollm2-135m", "--method", method, "--ratio", "0.2", "--nsamples", "4", "--seqlen", "64",
                 "--seed", "1", "--eval", "", "--out", str(out), "--quiet"]) == 0
    cli = json.loads((out / "plan.json").read_text())
    model, tok = smollm
    cfg = secateurs.FlapConfig() if method == "flap" else secateurs.ShortGPTConfig()
    plan = secateurs.prune(model, tok, cfg, ratio=0.2, calib="wiki", nsamples=4, seqlen=64, seed=1, progress=False)
    api = plan.to_dict()
    assert {k: v for k, v in api.items() if k != "meta"} == {k: v for k, v in cli.items() if k != "meta"}
    for key, value in api["meta"]["settings"].items():
        if key != "model":  # the CLI names the model as it was given, the API by its folder
            assert cli["meta"]["settings"][key] == value, key
    result = json.loads((out / "result.json").read_text())
    assert result["ppl_evaluations"] == plan.record["ppl_evaluations"]
    assert result.get("method_details") == plan.record.get("method_details")


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return next(b for b in blocks if "secateurs.prune(" in b)


@pytest.mark.slow
def test_readme_snippet_runs_and_saves_a_folder_that_loads(tmp_path, monkeypatch, capsys):
    code = readme_snippet().replace("ratio=0.2", "ratio=0.05")
    assert "ratio=0.05" in code
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    printed = capsys.readouterr().out
    assert "'wiki:test'" in printed and "'ppl'" in printed
    folder = tmp_path / "runs" / "flap-20"
    result = json.loads((folder / "result.json").read_text())
    assert result["method"] == "flap" and abs(result["ratio_achieved"] - 0.05) <= 0.005
    assert result["method_details"] == scope["plan"].record["method_details"]
    again, _ = secateurs.load(str(folder), progress=False)
    ids = scope["tok"]("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, scope["model"](ids).logits, atol=1e-5)
    with pytest.raises(UserError, match="exists and is not empty"):
        secateurs.save(scope["model"], scope["tok"], scope["plan"], str(folder))


def test_save_needs_the_applied_plan(tmp_path):
    model = tiny_model("llama")
    plan = secateurs.prune(model, None, secateurs.FlapConfig(), ratio=0.2, calib=ROWS, progress=False)
    with pytest.raises(UserError, match="apply_plan"):
        secateurs.save(model, None, plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- a method defined here: one file is all a method needs ---------------------------------------------------
@pytest.fixture
def drop_last(monkeypatch):
    """Registers the method below for one test (the registry is restored after it)."""
    from secateurs import methods
    from secateurs.methods import MethodConfig, register_method
    from secateurs.plan import PruningPlan, RatioRule
    from secateurs.search.greedy import layer_candidates, reach

    methods.all_methods()
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))

    @dataclass
    class DropLastConfig(MethodConfig):
        rule = RatioRule("layers")
        keep: int = field(default=1, metadata={"help": "layers always kept at the end"})

        def check(self, ratio):
            super().check(ratio)
            if self.keep < 0:
                raise UserError(f"--keep must be 0 or more (got {self.keep})")

        def reach(self, spec):
            return reach(spec, layer_candidates(spec.n_layers - self.keep, keep_ends=False))

    @register_method("drop-last", "drop whole layers from the end", DropLastConfig)
    def drop(ctx, cfg):
        plan = PruningPlan.dense(ctx.spec)
        for layer in range(ctx.spec.n_layers - 1 - cfg.keep, -1, -1):
            if plan.ratio(ctx.spec) >= ctx.ratio:
                break
            plan.layers[layer].attn = plan.layers[layer].mlp = False
        ctx.record(dropped=[i for i, lp in enumerate(plan.layers) if not lp.attn])
        return plan

    return DropLastConfig


def test_a_method_defined_in_a_test_file(drop_last, tmp_path, capsys):
    model = tiny_model("llama", num_hidden_layers=6)
    spec = get_adapter(model).spec()
    plan = secateurs.prune(model, None, drop_last(keep=1), ratio=0.3, calib=ROWS, progress=False)
    assert plan.method == "drop-last" and plan.ratio(spec) >= 0.3
    assert plan.record["method_details"]["dropped"] == sorted(plan.record["method_details"]["dropped"])
    assert plan.layers[-1].attn and not plan.layers[-2].attn  # the last layer kept, dropped from before it
    with pytest.raises(UserError, match="--keep must be 0 or more"):
        secateurs.prune(model, None, drop_last(keep=-1), ratio=0.3, calib=ROWS)
    with pytest.raises(UserError, match="out of reach for drop-last on this model"):
        secateurs.prune(model, None, drop_last(keep=5), ratio=0.3, calib=ROWS)
    secateurs.apply_plan(model, plan)
    secateurs.save(model, None, plan, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "result.json").read_text())["method"] == "drop-last"
    assert main(["methods"]) == 0
    assert "drop-last" in capsys.readouterr().out
