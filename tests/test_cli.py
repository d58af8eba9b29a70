"""The CLI end to end on the real embedded model (small settings), and its answers to bad input: one line,
exit code 2, nothing written."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

SMALL = ["--nsamples", "2", "--seqlen", "64", "--eval-rows", "2", "--quiet"]


def cli(*args, check=True):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-m", "secateurs", *args], capture_output=True, text=True, env=env)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_methods_lists_registry():
    out = cli("methods").stdout
    assert "uniform-drop" in out


def test_prune_eval_load_round_trip(tmp_path):
    out = tmp_path / "run"
    cli("prune", "smollm2-135m", "--method", "uniform-drop", "--ratio", "0.1", *SMALL, "--out", str(out))
    res = json.loads((out / "result.json").read_text())
    for key in ("method", "settings", "ratio_target", "ratio_achieved", "params_before", "params_after",
                "ppl_calib_before", "ppl_calib_after", "search_seconds", "ppl_evaluations", "versions"):
        assert key in res
    assert res["settings"]["seed"] == 0 and res["settings"]["nsamples"] == 2
    assert res["ratio_achieved"] >= 0.1 and res["params_after"] < res["params_before"]
    assert not (out.parent / "run.partial").exists()
    # the saved model is the pruned one: its size and its calibration perplexity are the ones recorded
    from secateurs import load
    from secateurs.data import calib_rows
    from secateurs.eval.perplexity import perplexity
    from secateurs.models import unique_param_count

    model, tok = load(str(out))
    assert unique_param_count(model) == res["params_after"]
    rows = calib_rows(tok, model, "wiki", 2, 64, 0)
    assert perplexity(model, rows).ppl == pytest.approx(res["ppl_calib_after"], rel=1e-4)
    # eval writes the documented JSON
    cli("eval", str(out), "--ppl", "wiki:test,lambada", "--seqlen", "64", "--rows", "2", "--quiet",
        "--json", str(tmp_path / "e.json"))
    e = json.loads((tmp_path / "e.json").read_text())
    assert set(e["ppl"]) == {"wiki:test", "lambada"}
    assert e["ppl"]["lambada"]["tokens"] == 2 * 63 and e["ppl"]["lambada"]["seqlen"] == 64
    assert "settings" in e and "versions" in e


@pytest.mark.parametrize("args, message", [
    (["prune", "smollm2-135m", "--method", "uniform-drop", "--ratio", "1.2"], "strictly between 0 and 1"),
    (["prune", "smollm2-135m", "--method", "uniform-drop", "--ratio", "abc"], "between 0 and 1"),
    (["prune", "smollm2-135m", "--method", "no-such", "--ratio", "0.2"], "unknown method 'no-such'; available"),
    (["prune", "./no/such/model", "--method", "uniform-drop", "--ratio", "0.2"], "unknown model"),
    (["prune", "smollm2-135m", "--method", "uniform-drop", "--ratio", "0.2", "--calib", "missing.txt"], "does not exist"),
    (["prune", "smollm2-135m", "--method", "uniform-drop", "--ratio", "0.2", "--nsamples", "100000"], "rows of 64 tokens"),
    (["eval", "smollm2-135m", "--ppl", "nowhere"], "unknown text set"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, message):
    out = tmp_path / "out"
    r = cli(*args, "--out", str(out), "--seqlen", "64", "--quiet", check=False) if args[0] == "prune" else cli(*args, check=False)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = cli("prune", "smollm2-135m", "--method", "uniform-drop", "--ratio", "0.2", *SMALL, "--out", str(out), check=False)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
