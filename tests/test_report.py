"""`secateurs report`: result folders (result.json, plan.json, optional eval.json / bench.json) become a
markdown page with PNG figures; missing measurements are said, not drawn; bad input is a UserError."""
import json
import re

import pytest

from conftest import tiny_model
from secateurs.cli import main
from secateurs.errors import UserError
from secateurs.models import get_adapter
from secateurs.plan import PruningPlan
from secateurs.report import build_report
from secateurs.report.runs import find_runs, task_accuracy

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def spec():
    return get_adapter(tiny_model("llama")).spec()


def write_run(folder, spec, method, ratio, drop=(), heads=None, ppl=None, tasks=None, speedup=None, dense_ppl=20.0):
    plan = PruningPlan.dense(spec, method)
    for i in drop:
        plan.layers[i].attn = plan.layers[i].mlp = False
    if heads:
        plan.layers[0].heads = heads
        plan.layers[0].channels = list(range(spec.intermediate // 2))
    folder.mkdir(parents=True)
    plan.save(folder / "plan.json")
    result = {"method": method, "model": "tiny", "ratio_target": ratio, "ratio_achieved": plan.ratio(spec),
              "params_before": spec.total_params, "params_after": plan.params(spec), "eval_set": "wiki:test",
              "ppl_test_before": dense_ppl, "ppl_test_after": ppl, "removed_blocks": [f"{k}{i}" for i, k in plan.removed_blocks()],
              "settings": {"model": "tiny", "method": method, "ratio": ratio, "seed": 0, "options": {}},
              "versions": {"secateurs": "test"}}
    (folder / "result.json").write_text(json.dumps(result))
    if tasks is not None:
        (folder / "eval.json").write_text(json.dumps({"ppl": {"lambada": {"ppl": ppl * 2}}, "tasks": tasks}))
    if speedup is not None:
        (folder / "bench.json").write_text(json.dumps({"speedup": speedup}))
    return plan


@pytest.fixture
def results(tmp_path, spec):
    root = tmp_path / "results"
    write_run(root / "drop-1", spec, "uniform-drop", 0.2, drop=[2], ppl=30.0,
              tasks={"arc_easy": {"acc": 0.5, "acc_norm": 0.55}, "piqa": 0.6}, speedup={"prefill": 1.2, "decode": 1.1})
    write_run(root / "drop-2", spec, "uniform-drop", 0.4, drop=[1, 2], ppl=60.0,
              tasks={"arc_easy": {"acc": 0.4}, "piqa": 0.55}, speedup={"prefill": 1.5, "decode": 1.3})
    write_run(root / "width-1", spec, "hand-made", 0.1, heads=[0, 2], ppl=25.0,
              tasks={"arc_easy": {"acc_norm": 0.52}, "piqa": 0.58}, speedup={"prefill": 1.05})
    return root


def test_report_page_and_figures(results, tmp_path):
    out = tmp_path / "rep"
    page = build_report([str(results / "drop-1"), str(results / "drop-2"), str(results / "width-1")], out)
    md = page.read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(figures) == sorted(["pruning_map.png", "ppl_vs_ratio.png", "accuracy_vs_ratio.png",
                                      "vs_speedup_decode.png", "vs_speedup_prefill.png"])
    for f in figures:
        data = (out / f).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    assert "Not drawn" not in md
    table = [l for l in md.splitlines() if l.startswith("| `")]
    assert len(table) == 3 and "20.000 → 30.000" in table[0] and "1.20×" in table[0]
    assert md.count("```json") == 3 and '"method": "hand-made"' in md


def test_runs_read_every_measurement(results, spec):
    runs = {r.name: r for r in find_runs([str(results)])}  # a parent folder stands for the runs below it
    assert sorted(runs) == ["drop-1", "drop-2", "width-1"]
    r = runs["drop-2"]
    assert r.ppl == {"wiki:test": 60.0, "lambada": 120.0} and r.ppl_dense == {"wiki:test": 20.0}
    assert r.tasks == {"arc_easy": 0.4, "piqa": 0.55} and r.mean_accuracy == pytest.approx(0.475)
    assert r.speedup == {"prefill": 1.5, "decode": 1.3}
    assert [k["attn"] for k in r.kept] == [1.0, 0.0, 0.0, 1.0] and [k["mlp"] for k in r.kept] == [1.0, 0.0, 0.0, 1.0]
    w = runs["width-1"].kept[0]
    assert w == {"attn": 0.5, "mlp": 0.5} and runs["width-1"].tasks["arc_easy"] == 0.52


def test_task_accuracy_forms():
    assert task_accuracy(0.7) == 0.7
    assert task_accuracy({"acc_norm": 0.6, "acc": 0.5}) == 0.5
    assert task_accuracy({"acc_stderr": 0.01}) is None and task_accuracy("x") is None and task_accuracy(True) is None


def test_missing_measurements_are_said(tmp_path, spec):
    write_run(tmp_path / "only" / "a", spec, "uniform-drop", 0.2, drop=[2], ppl=30.0)
    out = tmp_path / "rep"
    md = build_report([str(tmp_path / "only")], out).read_text()
    assert "![Pruning map](pruning_map.png)" in md and "![Perplexity against ratio](ppl_vs_ratio.png)" in md
    assert "Not drawn: no task accuracy" in md and "Not drawn: no speedup measured" in md
    assert not (out / "accuracy_vs_ratio.png").exists()


def test_same_names_in_different_places(tmp_path, spec):
    write_run(tmp_path / "x" / "run", spec, "m", 0.2, drop=[2], ppl=30.0)
    write_run(tmp_path / "y" / "run", spec, "m", 0.2, drop=[1], ppl=31.0)
    assert [r.name for r in find_runs([str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")])] == ["x/run", "y/run"]


def test_bad_input(tmp_path, spec, capsys):
    with pytest.raises(UserError, match="not a folder"):
        find_runs([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no result.json"):
        find_runs([str(tmp_path / "empty")])
    write_run(tmp_path / "bad", spec, "m", 0.2, ppl=30.0)
    (tmp_path / "bad" / "eval.json").write_text("{not json")
    assert main(["report", str(tmp_path / "bad"), "--out", str(tmp_path / "rep")]) == 2
    assert "eval.json is not valid JSON" in capsys.readouterr().err
    (tmp_path / "bad" / "eval.json").unlink()
    assert main(["report", str(tmp_path / "bad"), "--out", str(tmp_path / "rep")]) == 0


def test_result_format_and_rows(tmp_path, spec, capsys):
    """result.json carries "format": "secateurs-result/1"; a file without one (written before the format was
    versioned) is read as version 1, another version is refused. Perplexity columns and axes name their rows."""
    from secateurs.result import FORMAT

    write_run(tmp_path / "old", spec, "m", 0.2, drop=[2], ppl=30.0)  # no "format": written before versioning
    new = tmp_path / "new"
    write_run(new, spec, "m", 0.4, drop=[1, 2], ppl=60.0)
    result = json.loads((new / "result.json").read_text())
    (new / "result.json").write_text(json.dumps({**result, "format": FORMAT, "eval_rows": 16, "eval_seqlen": 512}))
    runs = find_runs([str(tmp_path / "old"), str(new)])
    assert runs[1].ppl_rows == {"wiki:test": (16, 512)} and runs[0].ppl_rows == {}
    md = build_report([str(new)], tmp_path / "rep").read_text()
    assert "ppl wiki:test, 16 rows of 512 (dense → pruned)" in md
    # an eval.json on other rows replaces the pruned figure; the dense one (other rows) is not shown beside it
    (new / "eval.json").write_text(json.dumps({"ppl": {"wiki:test": {"ppl": 50.0, "rows": 8, "seqlen": 256}}}))
    (run,) = find_runs([str(new)])
    assert run.ppl == {"wiki:test": 50.0} and run.ppl_dense == {} and run.ppl_rows == {"wiki:test": (8, 256)}

    (new / "result.json").write_text(json.dumps({**result, "format": "secateurs-result/9"}))
    assert main(["report", str(new), "--out", str(tmp_path / "rep2")]) == 2
    assert "has format 'secateurs-result/9'; this secateurs reads 'secateurs-result/1'" in capsys.readouterr().err
    assert main(["explain", str(new)]) == 2  # explain reads result.json too
    assert "has format 'secateurs-result/9'" in capsys.readouterr().err
