"""Self-Pruner: the search space's validation and repair, the LLM answer cycle (parse strictly, validate,
repair, retry, fall back) with malformed, out-of-bounds and wrong-length answers, the OpenAI client path
against a local stub server, a full tiny search with the classical operators, resuming from search.jsonl,
and a short real search with the embedded SmolLM2 as the local proposer."""
import json
import math
import random
import subprocess
import sys

import pytest
import torch

from conftest import needs_llama_cpp, prune, tiny_model
from llm_stubs import Scripted, StubHandler, stub  # noqa: F401  (stub is a fixture)
from secateurs.errors import UserError
from secateurs.methods import PruneContext, get_method, make_config
from secateurs.models import get_adapter
from secateurs.search.evolution import EvolutionConfig, Individual, InvalidAnswer, SearchSpace, evolve, restore
from secateurs.search.proposers import (ClassicProposer, EndpointDown, OpenAIProposer, first_json,
                                       rates_schema, selection_schema)

SPACE = SearchSpace(6, 0.35, 0.0, 0.9, 0.01)


def assert_valid(space, rates):
    assert len(rates) == space.n
    assert all(space.low - 1e-9 <= r <= space.high + 1e-9 for r in rates)
    assert all(abs(r / space.step - round(r / space.step)) < 1e-6 for r in rates)
    assert abs(sum(rates) / space.n - space.mean) <= space.step / (2 * space.n) + 1e-9


@pytest.mark.parametrize("raw", [[0.35] * 6, [1.5, -0.2, 0.3, 0.3, 0.3, 0.3], [0.9] * 6, [0.0] * 6,
                                 [0.123456, 0.5, 0.2, 0.61, 0.1, 0.3]])
def test_repair_gives_valid_vectors(raw):
    rates, notes = SPACE.repair(raw)
    assert_valid(SPACE, rates)
    if any(r < 0 or r > 0.9 for r in raw):
        assert any("clipped" in n for n in notes)
    if abs(sum(min(max(r, 0.0), 0.9) for r in raw) / 6 - 0.35) > 0.005:
        assert any("projected" in n for n in notes)


def test_repair_random_vectors_and_tight_bounds():
    rng = random.Random(0)
    for space in (SPACE, SearchSpace(30, 0.507, 0.3, 0.6, 0.01), SearchSpace(7, 0.1, 0.0, 0.2, 0.05)):
        for _ in range(200):
            assert_valid(space, space.repair([rng.uniform(-1, 2) for _ in range(space.n)])[0])
    with pytest.raises(UserError):
        SearchSpace(6, 0.95, 0.0, 0.9)


@pytest.mark.parametrize("raw,msg", [([0.1] * 5, "expected 6 rates"), ([0.1] * 7, "expected 6 rates"),
                                     ("0.1,0.2", "list"), ([0.1, "a", 0.1, 0.1, 0.1, 0.1], "finite"),
                                     ([0.1, True, 0.1, 0.1, 0.1, 0.1], "finite"), ([math.nan] * 6, "finite"),
                                     ([[0.1]] * 6, "finite")])
def test_check_rejects(raw, msg):
    with pytest.raises(InvalidAnswer, match=msg):
        SPACE.check(raw)


def test_first_json_is_strict():
    assert first_json('Sure! ```json\n{"rates": [1, 2]}\n```') == {"rates": [1, 2]}
    assert first_json("[1, 2] and {\"a\": 1}") == [1, 2]
    assert first_json('{bad json} then {"rates": [3]}') == {"rates": [3]}
    assert first_json("{'rates': [1, 2]}") == [1, 2]  # Python syntax is not evaluated; the inner JSON array is used
    for bad in ["no json here", "__import__('os').system('true')", '{"rates": [1, 2,', "{'a': (1, 2)}"]:
        with pytest.raises(InvalidAnswer):
            first_json(bad)


POP = [Individual([0.3, 0.3, 0.4, 0.4, 0.35, 0.35], 10.0), Individual([0.35] * 6, 11.0), Individual([0.5, 0.2] * 3, 12.0)]


def test_answer_cycle_ok_repaired_retried_fallback():
    rng = random.Random(0)
    ok = Scripted(['{"rates": [30, 30, 40, 40, 35, 35]}'], retries=2).mutate(SPACE, POP, 0, rng)
    assert ok.source == "llm" and ok.rates == [0.3, 0.3, 0.4, 0.4, 0.35, 0.35] and ok.attempts == 1
    rep = Scripted(['{"rates": [95, 0, 40, 40, 35, 35]}']).crossover(SPACE, POP, 0, 1, rng)
    assert rep.source == "llm-repaired" and rep.repairs and rep.errors == []
    assert_valid(SPACE, rep.rates)
    retried = Scripted(["I think the rates should be lower.", '{"rates": [1, 2, 3]}', "[35, 35, 35, 35, 35, 35]"],
                       retries=2).mutate(SPACE, POP, 0, rng)
    assert retried.source == "llm" and retried.attempts == 3 and len(retried.errors) == 2
    assert "no JSON" in retried.errors[0] and "expected 6 rates" in retried.errors[1]
    fb = Scripted(['{"rates": "many"}', InvalidAnswer("the endpoint answered without a choice")], retries=1).mutate(SPACE, POP, 0, rng)
    assert fb.source == "fallback" and fb.attempts == 2 and "without a choice" in fb.errors[1]
    assert_valid(SPACE, fb.rates)
    assert fb.tokens == {"prompt": 10, "completion": 5}
    with pytest.raises(RuntimeError):  # a failure that is not an answer's (a bug, llama.cpp) is not hidden by a fallback
        Scripted([RuntimeError("boom")]).mutate(SPACE, POP, 0, rng)


def test_prompts_show_task_constraint_population():
    p = Scripted(['{"crossover": [[0, 1]], "mutation": [2]}'])
    sel = p.select(SPACE, POP, 1, 1, random.Random(0))
    assert sel.source == "llm" and sel.pairs == [(0, 1)] and sel.singles == [2]
    prompt = p.prompts[0]
    assert "exactly 6 rates" in prompt and "mean must be 35.0" in prompt and "between 0 and 90" in prompt
    assert "#0 fitness 10.000: [30, 30, 40, 40, 35, 35]" in prompt and "JSON" in prompt
    p = Scripted(['{"rates": [35, 35, 35, 35, 35, 35]}'] * 2)
    p.crossover(SPACE, POP, 0, 2, random.Random(0))
    p.mutate(SPACE, POP, 1, random.Random(0))
    for prompt in p.prompts:  # the operators see the whole population too
        assert "#2 fitness 12.000: [50, 20, 50, 20, 50, 20]" in prompt and "mean must be 35.0" in prompt
    assert "parent A (#0) and parent B (#2)" in p.prompts[0] and "plan #1" in p.prompts[1]


def test_selection_validation():
    rng = random.Random(0)
    bad = Scripted(['{"crossover": [[0, 7]], "mutation": [1]}', '{"crossover": [[0]], "mutation": []}'], retries=1)
    sel = bad.select(SPACE, POP, 2, 2, rng)
    assert sel.source == "fallback" and len(sel.pairs) == 2 and len(sel.singles) == 2 and len(sel.errors) == 2
    short = Scripted(['{"crossover": [[0, 1]], "mutation": [2, 2, 1]}']).select(SPACE, POP, 3, 2, rng)
    assert short.source == "llm-repaired" and len(short.pairs) == 3 and short.pairs[0] == (0, 1)
    assert short.singles == [2, 2]


def quadratic(target):
    return lambda rates: sum((r - t) ** 2 for r, t in zip(rates, target))


def test_classic_evolution_improves_and_resumes(tmp_path):
    space = SearchSpace(8, 0.4, 0.0, 0.9, 0.01)
    target = space.repair([0.1, 0.7, 0.2, 0.6, 0.3, 0.5, 0.4, 0.4])[0]
    cfg = EvolutionConfig(population=8, generations=6, crossover=4, mutation=4, seed=3)
    full = evolve(space, quadratic(target), ClassicProposer(), cfg, tmp_path / "full.jsonl")
    assert full.best.fitness < full.uniform.fitness
    assert full.stats["best_by_generation"] == sorted(full.stats["best_by_generation"], reverse=True)
    assert full.evaluations == full.new_evaluations <= 8 + 6 * 8

    calls = {"n": 0}

    def flaky(rates):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt
        return quadratic(target)(rates)

    log = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evolve(space, flaky, ClassicProposer(), cfg, log)
    done = len(log.read_text().splitlines())
    assert 1 <= done < 7
    with log.open("a") as f:
        f.write('{"gen": 99, "torn')  # a write cut short
    resumed = evolve(space, quadratic(target), ClassicProposer(), cfg, log)
    assert resumed.new_evaluations < full.evaluations
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["gen"] for r in lines] == list(range(7))
    assert lines == [json.loads(x) | {"wall_s": lines[i]["wall_s"]} for i, x in enumerate((tmp_path / "full.jsonl").read_text().splitlines())]
    assert resumed.best == full.best


def test_restore_reads_a_log_without_writing_it(tmp_path):
    space = SearchSpace(8, 0.4, 0.0, 0.9, 0.01)
    target = space.repair([0.1, 0.7, 0.2, 0.6, 0.3, 0.5, 0.4, 0.4])[0]
    cfg = EvolutionConfig(population=8, generations=3, crossover=4, mutation=4, seed=1)
    full = evolve(space, quadratic(target), ClassicProposer(), cfg, tmp_path / "full.jsonl")
    assert restore(space, tmp_path / "none.jsonl") is None
    lines = (tmp_path / "full.jsonl").read_text().splitlines()
    part = tmp_path / "part.jsonl"
    part.write_text("\n".join(lines[:2]) + '\n{"gen": 2, "torn')  # a search still writing its third generation
    before = part.read_text()
    res, logged = restore(space, part)
    assert len(logged) == 2 and part.read_text() == before
    assert res.stats["best_by_generation"] == full.stats["best_by_generation"][:2]
    assert res.new_evaluations == 0 and res.evaluations == len({space.key(q["rates"]) for x in lines[:2]
                                                              for q in json.loads(x)["proposals"]})
    done, n = restore(space, tmp_path / "full.jsonl")
    assert len(n) == 4 and done.best == full.best and done.evaluations == full.evaluations


def test_full_tiny_self_pruner_classic(tmp_path):
    model = tiny_model("llama")
    ad = get_adapter(model)
    spec = ad.spec()
    calib = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = prune(model, "self-pruner", 0.3, calib, tmp_path, proposer="classic", population=5, generations=2, crossover=3,
                 mutation=3, fitness_rows=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # masking restored everything
    assert abs(plan.ratio(spec) - 0.3) <= 0.005
    d = plan.record["method_details"]
    assert d["best_fitness"] <= d["uniform_fitness"] and plan.record["ppl_evaluations"] == d["fitness_evaluations"] <= 5 + 2 * 6
    assert len((tmp_path / "search.jsonl").read_text().splitlines()) == 3
    assert_valid(SearchSpace(spec.n_layers, d["mean_rate"]), d["rates"])


def test_fitness_rows_default_follows_a_small_calibration(tmp_path, capsys):
    """`--nsamples 2` without --fitness-rows is accepted: the fitness runs on the 2 rows, said in one line; a
    --fitness-rows the user gave beyond the calibration is still refused."""
    from secateurs.methods.self_pruner import fitness_rows

    model = tiny_model("llama")
    ad = get_adapter(model)
    calib = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    ctx = PruneContext(model, None, ad, ad.spec(), calib, 0.3, 0, tmp_path, True)
    m = get_method("self-pruner")
    cfg = make_config(m, dict(proposer="classic"))
    cfg.check(ctx.ratio)
    assert fitness_rows(cfg, ctx, print) == 2
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "fitness on all 2 calibration row(s)" in out[0] and "--fitness-rows" in out[0]
    assert fitness_rows(make_config(m, dict(fitness_rows=1)), ctx, print) == 1
    with pytest.raises(UserError, match="--fitness-rows 3 exceeds the 2 calibration rows"):
        prune(model, "self-pruner", 0.3, calib, tmp_path, proposer="classic", fitness_rows=3)


def test_auto_proposer_follows_the_evidence(tmp_path):
    """--proposer auto (the default): a chat model of 1B parameters or more proposes for itself, asked for edits
    from the uniform start (where that won, docs/width.md); a smaller model or one without a chat template gets the
    classic operators; --endpoint / --proposer-model pick openai / local; an explicit --llm-task is kept."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from secateurs.methods.self_pruner import SELF_PROPOSER_MIN_PARAMS, SelfPrunerConfig, choose_proposer

    small = tiny_model("llama")
    with torch.device("meta"):  # about 1.1B parameters, no weights
        big = LlamaForCausalLM(LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                           num_attention_heads=16, num_key_value_heads=4, vocab_size=32000))
    assert sum(p.numel() for p in big.parameters()) >= SELF_PROPOSER_MIN_PARAMS
    chat, plain = SimpleNamespace(chat_template="{{ messages }}"), SimpleNamespace(chat_template=None)
    auto = SelfPrunerConfig(proposer="auto")

    def chosen(model, cfg=auto, tok=chat):
        c, why = choose_proposer(cfg, model, "my-model", tok, known=True)
        return c.proposer, c.llm_task, c.llm_start, why

    assert chosen(small)[:3] == ("classic", None, None) and "under 1B" in chosen(small)[3]
    assert chosen(big)[:3] == ("local", "edits", "uniform") and "proposing for itself" in chosen(big)[3]
    assert chosen(big, tok=plain)[0] == chosen(big, tok=None)[0] == "classic"
    assert "not a chat model" in chosen(big, tok=plain)[3]
    assert chosen(big, SelfPrunerConfig(llm_task="vectors", proposer="auto"))[1:3] == ("vectors", "uniform")
    assert chosen(small, SelfPrunerConfig(endpoint="http://x/v1", proposer="auto"))[:3] == ("openai", "vectors", "llm")
    assert chosen(small, SelfPrunerConfig(proposer_model="m.gguf", proposer="auto"))[:3] == ("local", "vectors", "llm")
    assert chosen(big, SelfPrunerConfig(proposer="classic"))[:3] == ("classic", None, None)
    assert chosen(small, SelfPrunerConfig(proposer="local"))[:3] == ("local", "vectors", "llm")
    with pytest.raises(UserError, match="--llm-task and --llm-start apply"):
        SelfPrunerConfig(proposer="classic", llm_start="uniform").check(0.2)
    with pytest.raises(UserError, match="auto chose classic .*under 1B.*--proposer local"):
        chosen(small, SelfPrunerConfig(proposer="auto", llm_task="edits"))
    calib = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    plan = prune(small, "self-pruner", 0.3, calib, tmp_path, population=3, generations=1, crossover=1, mutation=1,
                 fitness_rows=2)  # the default proposer on a small model: classic, and why is recorded
    d = plan.record["method_details"]
    assert d["proposer"] == "classic" and d["proposer_chosen"].startswith("auto: ") and d["llm_task"] is None


@pytest.mark.parametrize("opts,msg", [(dict(proposer="classic", endpoint="http://x/v1"), "--endpoint applies to --proposer openai"),
                                      (dict(proposer="classic", proposer_model="m.gguf"), "--proposer-model applies"),
                                      (dict(proposer="local", proposer_model="m.bin"), "GGUF chat model file"),
                                      (dict(proposer="openai", endpoint_timeout=0), "--endpoint-timeout must be at least 1")])
def test_option_misuse_is_a_user_error(tmp_path, opts, msg):
    with pytest.raises(UserError, match=msg):
        prune(tiny_model("llama"), "self-pruner", 0.3, torch.zeros(4, 8, dtype=torch.long), tmp_path, **opts)


def test_openai_proposer_against_stub(stub, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-123")
    space = SearchSpace(4, 0.3, 0.0, 0.9, 0.01)
    StubHandler.script = (
        ['{"rates": [10, 20, 40, 50]}', "Here: [[oops", '{"rates": [20, 30, 40, 30]}',  # init (3)
         '```json\n{"rates": [0, 0, 95, 95]}\n```']
        + ['{"crossover": [[0, 1]], "mutation": [3]}']  # selection of generation 1
        + ['{"rates": [30, 30, 30]}', "{}", "not json"]  # crossover: wrong length, no rates, junk: fallback
        + ['{"rates": [25, 35, 30, 30]}']  # mutation
    )
    p = OpenAIProposer(stub, "stub-model", retries=2)
    cfg = EvolutionConfig(population=4, generations=1, crossover=1, mutation=1, seed=0)
    res = evolve(space, quadratic([0.1, 0.2, 0.4, 0.5]), p, cfg, tmp_path / "search.jsonl")
    recs = [json.loads(x) for x in (tmp_path / "search.jsonl").read_text().splitlines()]
    init = recs[0]["proposals"]
    assert [x["source"] for x in init] == ["uniform", "llm", "llm", "llm-repaired"]
    assert init[1]["rates"] == [0.1, 0.2, 0.4, 0.5] and init[2]["attempts"] == 2
    assert [x["projected"] for x in init] == [False, False, False, True] and init[3]["answer"] == [0, 0, 95, 95]
    assert recs[0]["projected"] == 1 and recs[0]["repaired"] == 1
    gen1 = recs[1]
    assert gen1["selection"]["source"] == "llm" and gen1["selection"]["pairs"] == [[0, 1]]
    cross, mut = gen1["proposals"]
    assert cross["source"] == "fallback" and cross["attempts"] == 3 and len(cross["errors"]) == 3
    assert "expected 4 rates" in cross["errors"][0] and "expected a list" in cross["errors"][1]
    assert mut["source"] == "llm" and mut["rates"] == [0.25, 0.35, 0.3, 0.3] and gen1["fallbacks"] == 1
    assert recs[0]["tokens"] == {"prompt": 400, "completion": 80}
    assert res.best.fitness == 0.0 and res.best.rates == [0.1, 0.2, 0.4, 0.5]
    assert all(s["auth"] == "Bearer sk-test-secret-123" and s["path"] == "/v1/chat/completions" for s in StubHandler.seen)
    assert all(s["body"]["model"] == "stub-model" and s["body"]["max_tokens"] <= 400 for s in StubHandler.seen)
    fmt = StubHandler.seen[0]["body"]["response_format"]  # structured output asked for, with the exact schema
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == rates_schema(space)
    assert StubHandler.seen[4]["body"]["response_format"]["json_schema"]["schema"] == selection_schema(4, 1, 1)
    assert recs[1]["proposer_model"] == {"kind": "openai", "endpoint": stub, "model": "stub-model",
                                         "structured_output": "json_schema", "task": "vectors", "start": "llm",
                                         "responses_shown": False}
    a = res.stats["llm_answers"]
    assert a == {"answers": 6, "usable": 5, "repaired": 1, "projected": 1, "fallback": 1,
                 "seconds_per_answer": pytest.approx(a["seconds_per_answer"]),
                 "retried": 2, "repeats": 0, "seconds_per_answer_median": pytest.approx(a["seconds_per_answer_median"])}
    assert "sk-test" not in (tmp_path / "search.jsonl").read_text()


def test_openai_response_format_negotiated_and_model_discovered(stub, tmp_path):
    """An endpoint that refuses both structured-output forms (llama-cpp-python's server answers 500 to the OpenAI
    form) gets plain requests; the answers are still parsed strictly. Without --proposer-model the endpoint's
    first model is used."""
    said = []
    p = OpenAIProposer(stub, None, retries=0, say=said.append)
    StubHandler.script = [("refuse", "json_schema", 500), ("refuse", "json_object", 422), 'Sure: {"rates": [20, 40, 30]}']
    got = p.mutate(SearchSpace(3, 0.3), POP[:1] + [Individual([0.3] * 3, 1.0)], 1, random.Random(0))
    assert got.source == "llm" and got.rates == [0.2, 0.4, 0.3]
    forms = [s["body"].get("response_format", {}).get("type") for s in StubHandler.seen]
    assert forms == ["json_schema", "json_object", None] and StubHandler.seen[1]["body"]["response_format"]["schema"]
    assert p.describe()["structured_output"] == "none" and p.describe()["model"] == "served-model"
    assert len(said) == 2 and "refused a request with response_format json_schema" in said[0]
    StubHandler.script = [("status", 401)]
    with pytest.raises(UserError, match="refused the request: answered HTTP 401"):
        p.mutate(SearchSpace(3, 0.3), [Individual([0.3] * 3, 1.0)], 0, random.Random(0))


def test_openai_proposer_needs_endpoint(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("SECATEURS_LLM_MODEL", raising=False)
    with pytest.raises(UserError, match="llm-base-url"):
        OpenAIProposer(None, None)


def test_endpoint_failures_are_waited_out(stub, tmp_path, monkeypatch):
    """A slow endpoint (past the timeout), a 500 and a dropped connection: each is reported and retried, and the
    search goes on with the LLM's answers once the endpoint answers again (no fallback)."""
    monkeypatch.setattr(OpenAIProposer, "first_delay", 0.1)
    said = []
    p = OpenAIProposer(stub, "m", timeout=1, wait=20, retries=0, say=said.append)
    ok = '{"rates": [20, 30, 40]}'
    StubHandler.script = [("slow", 3, ok), ("status", 500), "drop", ok, ("status", 503), ok]
    res = evolve(SearchSpace(3, 0.3), quadratic([0.2, 0.3, 0.4]), p, EvolutionConfig(3, 0, 0, 0, 0), tmp_path / "s.jsonl")
    rec = json.loads((tmp_path / "s.jsonl").read_text())
    first, second = rec["proposals"][1:]
    assert first["source"] == second["source"] == "llm" and res.stats["endpoint_errors"] == 4
    assert "did not answer within 1 s" in first["endpoint_errors"][0]
    assert "answered HTTP 500" in first["endpoint_errors"][1]
    assert "dropped or refused the connection" in first["endpoint_errors"][2]
    assert "HTTP 503" in second["endpoint_errors"][0]
    assert len(said) == 4 and all(f"the endpoint {stub}" in m and "trying again" in m for m in said)


def test_endpoint_down_stops_and_search_resumes(stub, tmp_path, monkeypatch):
    """An endpoint down for longer than --endpoint-wait stops the search with a user error; the same search
    started again once the endpoint is back continues from its log."""
    monkeypatch.setattr(OpenAIProposer, "first_delay", 0.1)
    space, cfg, log = SearchSpace(3, 0.3), EvolutionConfig(3, 1, 1, 1, 0), tmp_path / "s.jsonl"
    p = OpenAIProposer(stub, "m", wait=1, retries=0, say=lambda m: None)
    StubHandler.script = ['{"rates": [20, 30, 40]}', '{"rates": [40, 30, 20]}'] + [("status", 502)] * 30
    with pytest.raises(EndpointDown, match=f"the endpoint {stub} answered HTTP 502.*has not answered for"):
        evolve(space, quadratic([0.2, 0.3, 0.4]), p, cfg, log)
    assert len(log.read_text().splitlines()) == 1  # the initial population is kept
    StubHandler.script = ['{"crossover": [[0, 1]], "mutation": [2]}', '{"rates": [20, 35, 35]}', '{"rates": [25, 30, 35]}']
    res = evolve(space, quadratic([0.2, 0.3, 0.4]), p, cfg, log)
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["gen"] for r in recs] == [0, 1] and res.new_evaluations == 2
    assert recs[1]["selection"]["source"] == "llm" and [x["source"] for x in recs[1]["proposals"]] == ["llm", "llm"]


def test_projection_is_euclidean_and_recorded():
    """For rates within the bounds the repair is the Euclidean projection onto {bounds, mean} (KKT: the free
    rates all move by one constant c, a rate held at a bound would pass it when moved by c), then rounding to the grid; an
    answer the projection changed is marked, one already on the mean is not."""
    rng = random.Random(1)
    fine = SearchSpace(12, 0.4, 0.1, 0.7, 1e-6)
    for _ in range(50):
        y = [rng.uniform(0.1, 0.7) for _ in range(12)]
        x, _ = fine.repair(y)
        free = [xi - yi for xi, yi in zip(x, y) if 0.1 + 1e-5 < xi < 0.7 - 1e-5]
        c = sum(free) / len(free)
        assert all(abs(d - c) < 1e-5 for d in free)
        assert all(xi - yi >= c - 1e-5 for xi, yi in zip(x, y) if xi <= 0.1 + 1e-5)  # y + c is below the bound
        assert all(xi - yi <= c + 1e-5 for xi, yi in zip(x, y) if xi >= 0.7 - 1e-5)  # y + c is above it
        assert abs(sum(x) / 12 - 0.4) < 1e-5
    same = Scripted(['{"rates": [30, 40, 40, 30, 35, 35]}']).mutate(SPACE, POP, 0, rng)  # mean 35 already
    assert same.source == "llm" and not same.projected and same.rates == [0.3, 0.4, 0.4, 0.3, 0.35, 0.35]
    moved = Scripted(['{"rates": [10, 20, 30, 40, 50, 60]}']).mutate(SPACE, POP, 0, rng)  # mean 35: +0
    assert not moved.projected
    moved = Scripted(['{"rates": [0, 10, 20, 30, 40, 50]}']).mutate(SPACE, POP, 0, rng)  # mean 25: all +10
    assert moved.projected and moved.answer == [0, 10, 20, 30, 40, 50] and moved.rates == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]


def test_prompts_have_no_example_answer_and_schemas_are_exact():
    p = Scripted(['{"crossover": [[0, 1]], "mutation": [2]}', '{"rates": [35, 35, 35, 35, 35, 35]}'])
    p.select(SPACE, POP, 1, 1, random.Random(0))
    p.initial(SPACE, 1, random.Random(0))
    for prompt in p.prompts:  # no numbers to copy beyond the task's own (the old prompt had an example answer)
        assert "[[0, 1]" not in prompt and "[...]" not in prompt and "for example {" not in prompt
    assert "210" in p.prompts[1] and "(none yet)" in p.prompts[1]  # the sum the rates must keep
    sel, rates = p.schemas
    assert sel == selection_schema(3, 1, 1) and rates == rates_schema(SPACE)
    items = rates["properties"]["rates"]
    assert items["minItems"] == items["maxItems"] == 6 and items["items"]["enum"] == list(range(0, 91))
    pair = sel["properties"]["crossover"]
    assert pair["minItems"] == pair["maxItems"] == 1 and pair["items"]["items"]["enum"] == [0, 1, 2]
    assert rates_schema(SearchSpace(4, 0.3, 0.105, 0.5))["properties"]["rates"]["items"]["enum"] == list(range(11, 51))


def test_search_log_records_the_llm(tmp_path):
    """search.jsonl and the stats carry the proposer, its tokens and time, and the counts of repaired,
    projected and fallback answers."""
    answers = ['{"rates": [10, 20, 40, 50]}', '{"rates": [0, 0, 95, 95]}', "no", "no", "no",
               '{"crossover": [[0, 1]], "mutation": [2]}', '{"rates": [10, 20, 40, 50]}', '{"rates": [35, 25, 30, 30]}']
    p = Scripted(answers, retries=2)
    res = evolve(SearchSpace(4, 0.3), quadratic([0.1, 0.2, 0.4, 0.5]), p, EvolutionConfig(4, 1, 1, 1, 0), tmp_path / "s.jsonl")
    recs = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert recs[0]["proposer_model"] == {"kind": "scripted"} and recs[0]["fallbacks"] == 1
    assert recs[0]["repaired"] == 1 and recs[0]["projected"] == 1 and recs[0]["tokens"] == {"prompt": 50, "completion": 25}
    assert recs[1]["proposals"][0]["cached"] and recs[0]["llm_seconds"] >= 0
    st = res.stats
    assert st["llm_answers"]["answers"] == 6 and st["llm_answers"]["usable"] == 5 and st["llm_answers"]["fallback"] == 1
    assert st["llm_answers"]["repeats"] == 1 and st["llm_answers"]["retried"] == 1  # the crossover child was evaluated
    assert st["by_source"] == {"fallback": 1, "llm": 3, "llm-repaired": 1} and st["failed_attempts"] == 3
    assert st["tokens"] == {"prompt": 80, "completion": 40}  # 8 answers of 10 + 5 tokens
    assert "llm_answers" not in evolve(SearchSpace(4, 0.3), quadratic([0.1] * 4), ClassicProposer(),
                                       EvolutionConfig(4, 1, 1, 1, 0), tmp_path / "c.jsonl").stats


def check_answer(text, schema):
    """The whole text is one JSON value of the schema's exact shape."""
    obj = json.loads(text)
    assert set(obj) == set(schema["properties"])
    for key, sub in schema["properties"].items():
        assert len(obj[key]) == sub["minItems"]
        for v in obj[key]:
            if sub["items"]["type"] == "array":
                assert len(v) == 2 and all(x in sub["items"]["items"]["enum"] for x in v)
            else:
                assert v in sub["items"]["enum"]


@pytest.mark.slow
def test_grammar_constrained_answers_parse():
    """Every answer SmolLM2 decodes under a schema's grammar is that schema's JSON, at high temperature too; a
    prompt evaluated after another (KV prefix reuse) gives the same greedy answer as from scratch."""
    from secateurs.llamacpp.chat import ChatModel
    from secateurs.sources import embedded_gguf

    m = ChatModel(embedded_gguf("smollm2-135m"), threads=1)
    ask = lambda text: [{"role": "system", "content": "Answer with JSON."}, {"role": "user", "content": text}]
    cases = [(rates_schema(SearchSpace(30, 0.253)), "30 pruning rates in percent, mean 25", [0.7, 1.5]),
             (rates_schema(SearchSpace(7, 0.3, 0.1, 0.6)), "7 numbers", [1.0, 2.0, 3.0]),
             (selection_schema(8, 3, 2), "Choose parents", [0.7, 2.0]), (selection_schema(5, 0, 2), "Pick two", [1.0])]
    for schema, text, temps in cases:
        for seed, t in enumerate(temps):
            check_answer(m.complete(ask(text), schema, t, seed, 400).text, schema)
    first = m.complete(ask("7 numbers"), cases[1][0], 0, 0, 100).text
    m.complete(ask("Choose parents"), cases[2][0], 0.7, 1, 100)
    assert m.complete(ask("7 numbers"), cases[1][0], 0, 5, 100).text == first
    m.close()


@pytest.mark.slow
def test_model_without_offline_gguf_is_converted_once(tmp_path, monkeypatch):
    """A model with no offline GGUF proposes for itself through its q8_0 export, cached by a fingerprint; a
    random model's answers still have the schema's shape (the grammar holds whatever the logits)."""
    from transformers import AutoTokenizer

    from secateurs.methods.self_pruner import SelfPrunerConfig, proposer_gguf
    from secateurs.sources import resolve
    from secateurs.search.proposers import LlamaCppProposer

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m", progress=False))
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=4096)
    ad = get_adapter(model)
    ctx = PruneContext.build(model, None, tokenizer=tok, ratio=0.3, workdir=tmp_path, progress=False,
                             model_ref=str(tmp_path / "my-model"))
    path, source = proposer_gguf(SelfPrunerConfig(proposer="local"), ctx, None)
    assert path.parent == tmp_path / "cache" / "proposers" and path.name.endswith(".q8_0.gguf") and "converted" in source
    stamp = path.stat().st_mtime_ns
    assert proposer_gguf(SelfPrunerConfig(proposer="local"), ctx, None)[0] == path and path.stat().st_mtime_ns == stamp
    p = LlamaCppProposer(path, threads=1, retries=0)
    space = SearchSpace(ad.spec().n_layers, 0.3)
    got = p.mutate(space, [Individual(space.uniform(), 1.0)], 0, random.Random(0))
    assert got.source == "llm" and len(got.answer) == space.n and p.describe()["chat_template"]
    p.close()
    with pytest.raises(UserError, match="GGUF chat model file"):
        proposer_gguf(SelfPrunerConfig(proposer="local", proposer_model=str(tmp_path / "nope.bin")), ctx, None)


@pytest.mark.slow
@needs_llama_cpp
def test_real_search_with_local_proposer(tmp_path):
    """The embedded SmolLM2 proposes rates for pruning SmolLM2 itself (its offline GGUF in llama.cpp, answers
    under the schemas' grammars): a short real search from the CLI, every answer usable."""
    out = tmp_path / "sp"
    r = subprocess.run([sys.executable, "-m", "secateurs", "prune", "smollm2-135m", "--method", "self-pruner",
                        "--proposer", "local", "--ratio", "0.2", "--population", "3", "--generations", "1",
                        "--crossover", "1", "--mutation", "1", "--nsamples", "2", "--seqlen", "64",
                        "--fitness-rows", "1", "--llm-retries", "1", "--eval", "", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    assert abs(res["ratio_achieved"] - 0.2) <= 0.005
    d = res["method_details"]
    assert d["search"]["proposals"] == 4 and d["search"]["tokens"]["completion"] > 0
    assert set(d["search"]["by_source"]) <= {"llm", "llm-repaired", "fallback"}
    assert d["search"]["llm_answers"]["usable"] == d["search"]["llm_answers"]["answers"] == 5
    pm = d["search"]["proposer_model"]
    assert pm["kind"] == "local" and pm["file"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and "being pruned" in pm["source"]
    recs = [json.loads(x) for x in (out / "search.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(p["attempts"] >= 1 for r in recs for p in r["proposals"] if p["source"] != "uniform")
    assert all(len(p["answer"]) == 30 and all(0 <= v <= 90 for v in p["answer"])
               for r in recs for p in r["proposals"] if p["source"] == "llm")
