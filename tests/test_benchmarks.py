"""benchmarks/run_all.py (`make bench`): the registry lists every benchmark with its expected minutes and results
files, adding one is one entry, a run records what ran and whether its results files exist."""
import importlib.util
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_every_registered_command_exists(run_all):
    assert {"reference", "demo", "width-smollm2", "tell-ablation-smollm2"} <= set(run_all.REGISTRY)
    for b in run_all.REGISTRY.values():
        assert b.minutes > 0 and b.results and b.about
        for cmd in b.commands:
            script = next(a for a in cmd if a.startswith("benchmarks/"))
            assert (ROOT / script).is_file(), (b.name, script)


def test_list_and_only(run_all, capsys):
    assert run_all.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name, b in run_all.REGISTRY.items():
        assert name in out
    default = sum(b.minutes for b in run_all.REGISTRY.values() if b.default)
    assert f"about {default:g} minutes" in out
    assert run_all.main(["--list", "--only", "reference,demo"]) == 0
    assert "selected: reference, demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        run_all.main(["--only", "no-such"])
    assert e.value.code == 2


def test_one_entry_registers_and_runs(run_all, tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "REGISTRY", {})
    code = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('x')"
    run_all.register("fake", 0.1, [f"{{py}} -c {shlex.quote(code)} {{results}}/fake.txt"], ["{results}/fake.txt"], "a test")
    b = run_all.REGISTRY["fake"]
    dry = run_all.run_one(b, str(tmp_path), dry=True)
    assert not dry["ok"] and dry["missing"] == [f"{tmp_path}/fake.txt"]  # nothing ran
    rec = run_all.run_one(b, str(tmp_path), dry=False)
    assert rec["ok"] and rec["commands"][0]["argv"][0] == sys.executable and (tmp_path / "fake.txt").read_text() == "x"
    run_all.register("broken", 0.1, ["{py} -c 'raise SystemExit(3)'"], [], "fails")
    assert run_all.run_one(run_all.REGISTRY["broken"], str(tmp_path), dry=False)["commands"][0]["rc"] == 3
    with pytest.raises(ValueError, match="registered twice"):
        run_all.register("fake", 1, [], [], "")
