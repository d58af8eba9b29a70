"""The CLI end to end on the real embedded model (small settings), and its answers to bad input: one line,
exit code 2, nothing written."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

SMALL = ["--nsamples", "2", "--seqlen", "64", "--eval-rows", "2", "--quiet"]
BAR = re.compile(r"\r|it/s|s/it|%\||\u2588")  # what a tqdm bar leaves on stderr


def cli(*args, check=True):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-m", "secateurs", *args], capture_output=True, text=True, env=env)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_methods_lists_registry():
    out = cli("methods").stdout
    assert "uniform-drop" in out


def test_building_the_parser_imports_no_torch():
    """`secateurs --help` stays light: a command's options, and the modules they come from, are added only when
    that command is used; the help of the commands whose options need no model code is light too (prune's
    comes from the method configs, export's from the GGUF writer)."""
    light = ["apply", "bench", "eval", "explain", "heal", "methods", "report"]
    code = ("import sys, secateurs.cli as c; p = c.build_parser(); p.format_help(); "
            "cmds = next(a for a in p._actions if a.dest == 'command').choices; "
            f"[cmds[n].format_help() for n in {light!r}]; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy')); "
            "assert not heavy, heavy[:5]; "
            "print(' '.join(sorted(next(a for a in p._actions if a.dest == 'command').choices)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["apply", "bench", "eval", "explain", "export", "heal", "methods", "prune", "report"]
    assert cli("--help").stdout.startswith("usage: secateurs")


def test_every_command_takes_quiet():
    from secateurs.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name, p in commands.items():
        assert "--quiet" in p.filled()._option_string_actions, name


def test_prune_eval_load_round_trip(tmp_path):
    out = tmp_path / "run"
    r = cli("prune", "smollm2-135m", "--method", "uniform-drop", "--ratio", "0.1", *SMALL, "--out", str(out))
    assert not BAR.search(r.stderr), r.stderr  # --quiet: no bars, neither ours nor transformers' load/save bars
    # every perplexity printed says its rows; the held-out rows have eval's default length, not --seqlen
    assert "calib ppl (2 rows of 64)" in r.stdout and "wiki:test ppl (2 rows of 512)" in r.stdout, r.stdout
    res = json.loads((out / "result.json").read_text())
    assert res["format"] == "secateurs-result/1"
    assert (res["eval_set"], res["eval_rows"], res["eval_seqlen"]) == ("wiki:test", 2, 512)
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
    # eval with its default row length agrees with the held-out figure prune printed for the same folder
    r = cli("eval", str(out), "--rows", "2", "--quiet", "--json", str(tmp_path / "e2.json"))
    assert "ppl" in r.stdout and "(2 rows of 512, 1022 tokens)" in r.stdout and not BAR.search(r.stderr)
    e2 = json.loads((tmp_path / "e2.json").read_text())["ppl"]["wiki:test"]
    assert e2["ppl"] == pytest.approx(res["ppl_test_after"], rel=1e-5)
    # apply: the same held-out rows by default, named where it prints them; a versioned result.json
    r = cli("apply", str(out / "plan.json"), "smollm2-135m", "--out", str(tmp_path / "again"), "--eval-rows", "2", "--quiet")
    assert "wiki:test ppl (2 rows of 512)" in r.stdout and not BAR.search(r.stderr)
    again = json.loads((tmp_path / "again" / "result.json").read_text())
    assert again["format"] == "secateurs-result/1" and (again["eval_rows"], again["eval_seqlen"]) == (2, 512)
    assert again["ppl_test_after"] == pytest.approx(res["ppl_test_after"], rel=1e-5)


@pytest.mark.parametrize("args, message", [
    (["prune", "smollm2-135m", "--method", "uniform-drop", "--ratio", "1.2"], "strictly between 0 and 1"),
    (["prune", "smollm2-135m", "--method", "uniform-drop", "--ratio", "abc"], "between 0 and 1"),
    (["prune", "smollm2-135m", "--method", "no-such", "--ratio", "0.2"], "unknown method 'no-such'; available"),
    (["prune", "./no/such/model", "--method", "uniform-drop", "--ratio", "0.2"], "unknown model"),
    (["prune", "smollm2-135m", "--method", "uniform-drop", "--ratio", "0.2", "--calib", "missing.txt"], "does not exist"),
    (["prune", "smollm2-135m", "--method", "uniform-drop", "--ratio", "0.2", "--nsamples", "100000"], "rows of 64 tokens"),
    (["eval", "smollm2-135m", "--ppl", "nowhere"], "unknown text set"),
    # a target a method cannot reach is refused before any work, with what it can reach
    (["prune", "smollm2-135m", "--method", "uniform-drop", "--ratio", "0.9"], "out of reach for uniform-drop on this model: the most it can remove is 0.7"),
    (["prune", "smollm2-135m", "--method", "flap", "--ratio", "0.9"], "out of reach for flap"),
    (["prune", "smollm2-135m", "--method", "sleb", "--ratio", "0.8"], "out of reach for sleb"),
    (["prune", "smollm2-135m", "--method", "flap", "--ratio", "0.2", "--population", "4"], "--method flap --help"),
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


def test_quiet_silences_the_harness(tmp_path):
    """lm-evaluation-harness's own bars (requests, contexts) are silenced too."""
    r = cli("eval", "smollm2-135m", "--ppl", "", "--tasks", "piqa", "--limit", "2", "--quiet")
    assert "piqa: acc" in r.stdout
    assert not BAR.search(r.stderr), r.stderr


# --- prune --help ---------------------------------------------------------------------------------------------
def prune_help(capsys, monkeypatch, *args) -> str:
    from secateurs.cli import main

    monkeypatch.setenv("COLUMNS", "500")  # one line per option: no wrapping inside the texts checked
    with pytest.raises(SystemExit) as e:
        main(["prune", *args, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def option_entries(help_text: str) -> dict:
    """``--flag`` -> the whole help entry of that option (its line and the continuation lines argparse adds)."""
    entries, current = {}, None
    for line in help_text.splitlines():
        text = line.strip()
        if text.startswith("-"):
            current = text.split()[0].rstrip(",")
            if current == "-h":
                current = "--help"
            entries[current] = text
        elif current and line.startswith("      ") and text:
            entries[current] += " " + text
        else:
            current = None
    return entries


def test_prune_help_groups_and_every_methods_defaults(capsys, monkeypatch):
    from secateurs.methods import all_methods

    out = prune_help(capsys, monkeypatch)
    for group in ("general:", "calibration:", "evaluation:", "output:", "options shared by several methods:"):
        assert f"\n{group}\n" in out
    for name in all_methods():
        assert f"\noptions of {name}:\n" in out
    entries = option_entries(out)
    assert "seed of every random choice" in entries["--seed"] and "(default 0)" in entries["--seed"]
    # an option several methods take is listed once, with every method's own default
    assert sum(x.strip().startswith("--batch-size") for x in out.splitlines()) == 1
    assert "(default: blockpruner 1, flap 4, self-pruner 4, shortgpt 1, sleb 1, wanda-sp 4)" in entries["--batch-size"]
    assert "--eval-seqlen EVAL_SEQLEN" in out and "--method NAME --help" in out


def test_prune_method_help_shows_only_its_options_with_its_defaults(capsys, monkeypatch):
    from secateurs.methods import all_methods

    methods = all_methods()
    for name, m in methods.items():
        out = prune_help(capsys, monkeypatch, "--method", name)
        assert f"options of {name}:" in out and "--ratio R: " + m.ratio_rule.describe() in out
        assert "--seed SEED" in out and "--eval-rows" in out  # the general groups are there too
        entries = option_entries(out)
        own = {f.name for f in dataclasses.fields(m.config_cls)}
        for f in dataclasses.fields(m.config_cls):
            entry = entries["--" + f.name.replace("_", "-")]
            if f.default is not None:
                assert f"(default {f.default})" in entry, (name, entry)
        others = {g.name for o in methods.values() for g in dataclasses.fields(o.config_cls)} - own
        for other in others:
            assert "--" + other.replace("_", "-") not in entries, (name, other)
    assert "no options of its own" in prune_help(capsys, monkeypatch, "--method", "uniform-drop")
    sp = option_entries(prune_help(capsys, monkeypatch, "--method", "self-pruner"))  # older spellings kept as aliases
    assert "--llm-model" in sp["--proposer-model"] and "--llm-base-url" in sp["--endpoint"]
    from secateurs.cli import build_parser
    from secateurs.cli._options import selected

    args = build_parser().parse_args(["prune", "m", "--method", "self-pruner", "--out", "o", "--llm-model", "x.gguf"])
    assert selected(args, "self-pruner") == {"proposer_model": "x.gguf"}


# --- resume after an interruption ---------------------------------------------------------------------------
RESUME = ["prune", "smollm2-135m", "--method", "sleb", "--ratio", "0.2", "--nsamples", "1", "--seqlen", "32",
          "--eval", "", "--quiet"]


def interrupt(out, sig) -> subprocess.CompletedProcess:
    """Starts the prune, waits until its search has saved a step, then sends ``sig``."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    # SIGINT at its default: a suite started in the background (`make test &`) inherits it ignored, and Python
    # then installs no KeyboardInterrupt handler
    p = subprocess.Popen([sys.executable, "-m", "secateurs", *RESUME, "--out", str(out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    order = out.with_name(out.name + ".partial") / "order.json"
    deadline = time.time() + 600
    while time.time() < deadline:
        assert p.poll() is None, "the prune finished before it could be interrupted"
        if order.exists() and json.loads(order.read_text())["steps"]:
            break
        time.sleep(0.02)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=300)
    assert not out.exists(), "the run finished before the signal arrived"
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


def test_prune_resumes_after_sigint_and_sigkill(tmp_path):
    """A real prune interrupted mid-search (Ctrl-C, then separately a kill) and run again ends with the plan of an
    uninterrupted run; the dense measurement is reused, the search time accumulates, and the work folder
    becomes the output folder only at the end."""
    ref = tmp_path / "ref"
    cli(*RESUME, "--out", str(ref))
    want = json.loads((ref / "result.json").read_text())
    want_plan = json.loads((ref / "plan.json").read_text())

    for sig in (signal.SIGINT, signal.SIGKILL):
        out = tmp_path / f"run-{sig.name}"
        work = out.with_name(out.name + ".partial")
        r = interrupt(out, sig)
        if sig == signal.SIGINT:
            assert r.returncode == 130 and "run the same command again to resume" in r.stderr
        else:
            assert r.returncode == -signal.SIGKILL
        assert {"settings.json", "dense.json", "order.json", "search_seconds.json"} <= {f.name for f in work.iterdir()}
        done = len(json.loads((work / "order.json").read_text())["steps"])
        spent = json.loads((work / "search_seconds.json").read_text())
        if sig == signal.SIGINT:  # Ctrl-C records the time spent
            assert "running_since" not in spent and spent["seconds"] > 0
            floor = spent["seconds"]
        else:  # a kill records nothing: the time up to the last saved step counts
            floor = (work / "order.json").stat().st_mtime - spent["running_since"]
            assert floor > 0
        dense = json.loads((work / "dense.json").read_text())
        (work / "dense.json").write_text(json.dumps({**dense, "ppl_calib": 12345.0}))  # marks a reused measurement

        r = cli(*RESUME, "--out", str(out))
        assert "resuming the unfinished run" in r.stdout
        got = json.loads((out / "result.json").read_text())
        assert got["ppl_calib_before"] == 12345.0  # dense.json reused, not measured again
        assert json.loads((out / "plan.json").read_text())["layers"] == want_plan["layers"]
        assert got["method_details"]["order"] == want["method_details"]["order"]
        assert len(got["method_details"]["order"]) > done  # it stopped mid-search
        assert got["search_seconds"] > floor  # the interrupted run's time is counted too
        assert not work.exists()
        assert not {"settings.json", "dense.json", "search_seconds.json"} & {f.name for f in out.iterdir()}
