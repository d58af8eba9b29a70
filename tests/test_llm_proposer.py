"""What the Self-Pruner's LLM is asked and shown (``--llm-task``, ``--llm-start``, ``search.screen``), and which
proposers are accepted: by embedded name, a chat model's GGUF only, one that fits the memory left. The prompts are
tested for their content (the numbers they must show), not their wording."""
import json
import random
import re

import pytest
import torch

from conftest import prune, tiny_model
from llm_stubs import Scripted, StubHandler, stub  # noqa: F401  (stub is a fixture)
from secateurs.cli import main
from secateurs.errors import UserError
from secateurs.methods import PruneContext
from secateurs.search.evolution import EvolutionConfig, Individual, SearchSpace, evolve
from secateurs.search.proposers import ClassicProposer, edits_schema
from secateurs.search.screen import Screen, pct

SPACE = SearchSpace(6, 0.35, 0.0, 0.9, 0.01)  # the rates add up to 210 percent
POP = [Individual([0.3, 0.3, 0.4, 0.4, 0.35, 0.35], 10.0), Individual([0.35] * 6, 11.0), Individual([0.5, 0.2] * 3, 12.0)]


def numbers(text: str) -> set[str]:
    return set(re.findall(r"-?\d+(?:\.\d+)?", text))


def edits(*pairs) -> str:
    return json.dumps({"edits": [{"layer": a, "rate": b} for a, b in pairs]})


def test_edits_change_the_parent_and_projections_are_counted():
    rng = random.Random(0)
    p = Scripted([edits((0, 40), (1, 20)), edits((0, 50), (5, 45)), edits((9, 10), (0, 20)), edits((2, 40), (3, 30))],
                 task="edits")
    kept = p.mutate(SPACE, POP, 0, rng)  # +10 on layer 0, -10 on layer 1: the sum kept, no projection
    assert kept.source == "llm" and not kept.projected and kept.answer == [[0, 40], [1, 20]]
    assert kept.rates == [0.4, 0.2, 0.4, 0.4, 0.35, 0.35]
    raised = p.mutate(SPACE, POP, 1, rng)  # +15 and +10 on a plan already at the sum: projected back onto it
    assert raised.projected and abs(sum(raised.rates) - 2.1) < 1e-9 and raised.answer == [[0, 50], [5, 45]]
    retried = p.crossover(SPACE, POP, 2, 0, rng)  # layer 9 of 6: retried; then edits of parent A (#2)
    assert retried.attempts == 2 and "layer number from 0 to 5" in retried.errors[0]
    assert retried.rates == [0.5, 0.2, 0.4, 0.3, 0.5, 0.2] and not retried.projected
    mutation, _, crossover = p.prompts[0], p.prompts[1], p.prompts[2]
    assert {"30", "40", "35", "210"} <= numbers(mutation) and pct(POP[0].rates) in mutation  # parent and sum
    assert pct(POP[2].rates) in crossover and pct(POP[0].rates) in crossover
    schema = edits_schema(SPACE)["properties"]["edits"]
    assert schema["minItems"] == 2 and schema["maxItems"] == 6  # at most every layer once
    assert schema["items"]["properties"]["layer"]["enum"] == list(range(6))
    assert schema["items"]["properties"]["rate"]["enum"] == list(range(91))
    assert p.schemas[0] == edits_schema(SPACE)


def test_first_population_uniform_start_and_llm_edits_of_the_uniform():
    quiet = Scripted([], start="uniform")
    got = quiet.initial(SPACE, 4, random.Random(3))
    assert quiet.prompts == [] and [g.source for g in got] == ["classic"] * 4
    assert [g.rates for g in got] == [g.rates for g in ClassicProposer().initial(SPACE, 4, random.Random(3))]
    p = Scripted([edits((0, 45), (1, 25))], task="edits")
    first = p.initial(SPACE, 1, random.Random(0))[0]
    assert first.rates == [0.45, 0.25, 0.35, 0.35, 0.35, 0.35] and not first.projected
    assert pct(SPACE.uniform()) in p.prompts[0] and "210" in numbers(p.prompts[0])


def quadratic(target):
    return lambda rates: 1.0 + sum((a - b) ** 2 for a, b in zip(rates, target))


def test_screen_shows_best_plans_and_what_the_generations_changed(tmp_path):
    """By generation 2 the prompt holds, from the log, generation 1's best fitness before and after, how many
    children beat it, and the layers where its best child differs from its parent (old and new rates)."""
    space = SearchSpace(4, 0.3)
    answers = [json.dumps({"rates": r}) for r in ([20, 30, 40, 30], [40, 30, 20, 30])]
    answers += ['{"crossover": [[0, 1]], "mutation": [0]}', json.dumps({"rates": [10, 30, 40, 40]}),
                json.dumps({"rates": [20, 20, 40, 40]})]
    answers += ['{"crossover": [[0, 1]], "mutation": [1]}'] + [json.dumps({"rates": [30, 30, 30, 30]})] * 2
    p = Scripted(answers)
    res = evolve(space, quadratic([0.1, 0.2, 0.4, 0.5]), p, EvolutionConfig(3, 2, 1, 1, 0), tmp_path / "s.jsonl")
    recs = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    gen2 = p.prompts[-1]  # the last mutation of generation 2
    before, after = recs[0]["best_fitness"], recs[1]["best_fitness"]
    kids = recs[1]["proposals"]
    best = min(kids, key=lambda k: k["fitness"])
    parent = recs[0]["population"][best["parents"][0]]
    changed = [f"{i} {100 * a:.0f}->{100 * b:.0f}" for i, (a, b) in enumerate(zip(parent["rates"], best["rates"]))
               if round(100 * a) != round(100 * b)]
    assert changed and all(c in gen2 for c in changed)
    assert {f"{before:.3f}", f"{after:.3f}", f"{best['fitness']:.3f}"} <= numbers(gen2)
    line = next(x for x in gen2.splitlines() if x.startswith("generation 1"))
    assert str(sum(k["fitness"] < before for k in kids)) in numbers(line)
    for i, ind in enumerate(recs[1]["population"]):  # the population the operators chose from: rates and fitness
        assert f"#{i} fitness {ind['fitness']:.3f}: {pct(ind['rates'])}" in gen2
    assert res.stats["llm_answers"]["repeats"] == recs[2]["repeated"] + recs[1]["repeated"] >= 1


def test_screen_shows_measured_responses():
    s = Screen(responses={(0, "attn"): [(0.25, True, 0.0012), (1.0, True, 0.05)],
                          (0, "mlp"): [(0.5, False, 0.3), (0.5, True, 0.2)], (1, "mlp"): [(1.0, True, 1.5)]})
    text = s.population(SPACE, POP)
    line0 = next(x for x in text.splitlines() if x.startswith("layer 0"))
    assert {"+0.0012", "+0.0500", "+0.2000"} <= set(re.findall(r"[+-]\d+\.\d+", line0))
    assert "+0.3000" not in line0  # the compensated option where both were measured
    assert "+1.5000" in next(x for x in text.splitlines() if x.startswith("layer 1"))
    assert not any(re.match(r"layer \d+:", x) for x in Screen().population(SPACE, POP).splitlines())


def test_cached_responses_reach_the_prompt(tmp_path, monkeypatch, stub):
    """tell's response cache for this model and calibration (planted here) is read by ``dense_responses`` and
    shown, one line per layer, in what an endpoint proposer is asked."""
    from secateurs.methods.tell import dense_response_state, dense_responses

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    calib = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    ctx = PruneContext.build(model, calib, workdir=tmp_path, progress=False)
    assert dense_responses(ctx) is None
    path, _ = dense_response_state(ctx)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"base_loss": 100.0, "losses": {"a": 100.5, "b": 192.0, "c": 400.0},
                                "labels": {"a": [0, 0.25, True], "b": [7, 1.0, True], "c": [2, 0.5, False]}}))
    # per predicted position (4 rows x 23), as tell's knapsack and result.json count them
    assert dense_responses(ctx) == {(0, "attn"): [(0.25, True, 0.5 / 92)], (1, "attn"): [(0.5, False, 300 / 92)],
                                    (3, "mlp"): [(1.0, True, 1.0)]}
    StubHandler.script = ['{"rates": [30, 30, 30, 30]}']
    prune(model, "self-pruner", 0.3, calib, tmp_path / "run", proposer="openai", endpoint=stub, proposer_model="m",
          population=2, generations=0, fitness_rows=1)
    prompt = StubHandler.seen[0]["body"]["messages"][-1]["content"]
    lines = {x.split(":")[0]: x for x in prompt.splitlines() if re.match(r"layer \d+:", x)}
    assert set(lines) == {"layer 0", "layer 1", "layer 3"}
    assert f"{0.5 / 92:+.4f}" in lines["layer 0"] and f"{300 / 92:+.4f}" in lines["layer 1"]
    assert "+1.0000" in lines["layer 3"]


def test_proposer_by_embedded_name_and_chat_models_only(tmp_path):
    from transformers import AutoTokenizer

    from secateurs.export.gguf import export_gguf
    from secateurs.methods.self_pruner import SelfPrunerConfig, proposer_gguf
    from secateurs.sources import embedded_gguf, resolve

    ctx = PruneContext.build(tiny_model("llama"), None, workdir=tmp_path, progress=False, model_ref="x")
    path, source = proposer_gguf(SelfPrunerConfig(proposer="local", proposer_model="smollm2-135m"), ctx, None)
    assert path == embedded_gguf("smollm2-135m") and "smollm2-135m" in source
    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m", progress=False))
    tok.chat_template = None
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=4096)
    base = tmp_path / "base.gguf"
    export_gguf(model, tok, base, "q8_0")
    with pytest.raises(UserError, match="is not a chat model"):
        SelfPrunerConfig(proposer="local", proposer_model=str(base)).check(0.2)
    ctx = PruneContext.build(model, None, tokenizer=tok, workdir=tmp_path, progress=False, model_ref=str(tmp_path / "m"))
    with pytest.raises(UserError, match="not a chat model.*cannot propose for itself"):
        proposer_gguf(SelfPrunerConfig(proposer="local"), ctx, None)


CLI = ["prune", "smollm2-135m", "--method", "self-pruner", "--proposer", "local", "--ratio", "0.2", "--population", "2",
       "--generations", "0", "--nsamples", "2", "--seqlen", "32", "--fitness-rows", "1", "--eval", "", "--quiet"]


def test_bad_proposer_files_are_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """Not a GGUF, not a chat model, too large for the memory left: exit 2, one line, no run folder."""
    import secateurs.runtime.placement as placement

    (tmp_path / "notes.gguf").write_text("not a model")
    for extra, msg in [(["--proposer-model", str(tmp_path / "notes.gguf")], "is not a GGUF file"),
                       (["--proposer-model", str(tmp_path / "m.safetensors")], "GGUF chat model file or one of")]:
        assert main(CLI + extra + ["--out", str(tmp_path / "a")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err and "Traceback" not in err
    monkeypatch.setattr(placement, "available_memory", lambda: 50 << 20)  # 50 MiB left
    assert main(CLI + ["--out", str(tmp_path / "b")]) == 2  # SmolLM2 proposing for itself
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs about" in err and "50.00 MiB" in err and "--proposer classic" in err
    assert not any(tmp_path.glob("a*")) and not any(tmp_path.glob("b*"))


def test_endpoint_that_hangs_is_one_line_and_resumable(tmp_path, capsys, stub):
    """An endpoint that hangs past --endpoint-timeout for longer than --endpoint-wait: exit 2, one line, the run
    kept for the same command to resume. (Prose answers fall back: test_openai_proposer_against_stub.)"""
    cmd = [a if a != "local" else "openai" for a in CLI] + ["--endpoint", stub, "--proposer-model", "m",
                                                          "--endpoint-timeout", "1", "--endpoint-wait", "2"]
    StubHandler.script = [("slow", 3, "{}")] * 4
    assert main(cmd + ["--out", str(tmp_path / "hang")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if "trying again" not in x]
    assert len(err) == 1 and "did not answer within 1 s" in err[0] and "run the same command again" in err[0]
    assert (tmp_path / "hang.partial" / "settings.json").exists() and not (tmp_path / "hang").exists()
