"""Self-Pruner: the search space's validation and repair, the LLM answer cycle (parse strictly, validate,
repair, retry, fall back) with malformed, out-of-bounds and wrong-length answers, the OpenAI client path
against a local stub server, a full tiny search with the classical operators, resuming from search.jsonl,
and a short real search with the embedded SmolLM2 as the local proposer."""
import json
import math
import random
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from secateurs.errors import UserError
from secateurs.methods import PruneContext, get_method, make_config
from secateurs.models import get_adapter
from secateurs.search.evolution import EvolutionConfig, Individual, InvalidAnswer, SearchSpace, evolve
from secateurs.search.proposers import ClassicProposer, LLMProposer, OpenAIProposer, first_json

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


class Scripted(LLMProposer):
    """An LLM proposer whose 'model' answers from a script (to test the answer cycle without a model)."""

    name = "scripted"

    def __init__(self, answers, **kw):
        super().__init__(**kw)
        self.answers = list(answers)
        self.prompts = []

    def chat(self, messages, seed, max_tokens, prefix=""):
        self.prompts.append(messages[-1]["content"])
        a = self.answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a, {"prompt": 10, "completion": 5}


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
    fb = Scripted(['{"rates": "many"}', RuntimeError("connection refused")], retries=1).mutate(SPACE, POP, 0, rng)
    assert fb.source == "fallback" and fb.attempts == 2 and "request failed" in fb.errors[1]
    assert_valid(SPACE, fb.rates)
    assert fb.tokens == {"prompt": 10, "completion": 5}


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


def test_full_tiny_self_pruner_classic(tmp_path):
    model = tiny_model("llama")
    ad = get_adapter(model)
    spec = ad.spec()
    calib = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    ctx = PruneContext(model, None, ad, spec, calib, 0.3, 0, tmp_path, False)
    m = get_method("self-pruner")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = m.fn(ctx, make_config(m, dict(proposer="classic", population=5, generations=2, crossover=3, mutation=3, fitness_rows=2)))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # masking restored everything
    assert abs(plan.ratio(spec) - 0.3) <= 0.005
    d = ctx.extra
    assert d["best_fitness"] <= d["uniform_fitness"] and ctx.ppl_evaluations == d["fitness_evaluations"] <= 5 + 2 * 6
    assert len((tmp_path / "search.jsonl").read_text().splitlines()) == 3
    assert_valid(SearchSpace(spec.n_layers, d["mean_rate"]), d["rates"])


class StubHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions that replies from a script."""

    script: list = []
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubHandler.seen.append({"auth": self.headers.get("Authorization"), "body": body, "path": self.path})
        content = StubHandler.script.pop(0) if StubHandler.script else "out of script"
        if content is None:
            self.send_response(400)
            payload = {"error": {"message": "bad request", "type": "invalid_request_error"}}
        else:
            self.send_response(200)
            payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                       "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
                       "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}
        data = json.dumps(payload).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def stub():
    server = HTTPServer(("127.0.0.1", 0), StubHandler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    StubHandler.script, StubHandler.seen = [], []
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_openai_proposer_against_stub(stub, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-123")
    space = SearchSpace(4, 0.3, 0.0, 0.9, 0.01)
    StubHandler.script = (
        ['{"rates": [10, 20, 40, 50]}', "Here: [[oops", '{"rates": [20, 30, 40, 30]}',  # init (3)
         '```json\n{"rates": [0, 0, 95, 95]}\n```']
        + ['{"crossover": [[0, 1]], "mutation": [3]}']  # selection of generation 1
        + ['{"rates": [30, 30, 30]}', None, "not json"]  # crossover: wrong length, HTTP 400, junk: fallback
        + ['{"rates": [25, 35, 30, 30]}']  # mutation
    )
    p = OpenAIProposer(stub, "stub-model", retries=2)
    cfg = EvolutionConfig(population=4, generations=1, crossover=1, mutation=1, seed=0)
    res = evolve(space, quadratic([0.1, 0.2, 0.4, 0.5]), p, cfg, tmp_path / "search.jsonl")
    recs = [json.loads(x) for x in (tmp_path / "search.jsonl").read_text().splitlines()]
    init = recs[0]["proposals"]
    assert [x["source"] for x in init] == ["uniform", "llm", "llm", "llm-repaired"]
    assert init[1]["rates"] == [0.1, 0.2, 0.4, 0.5] and init[2]["attempts"] == 2
    gen1 = recs[1]
    assert gen1["selection"]["source"] == "llm" and gen1["selection"]["pairs"] == [[0, 1]]
    cross, mut = gen1["proposals"]
    assert cross["source"] == "fallback" and cross["attempts"] == 3 and len(cross["errors"]) == 3
    assert "expected 4 rates" in cross["errors"][0] and "request failed" in cross["errors"][1]
    assert mut["source"] == "llm" and mut["rates"] == [0.25, 0.35, 0.3, 0.3] and gen1["fallbacks"] == 1
    assert recs[0]["tokens"] == {"prompt": 400, "completion": 80}
    assert res.best.fitness == 0.0 and res.best.rates == [0.1, 0.2, 0.4, 0.5]
    assert all(s["auth"] == "Bearer sk-test-secret-123" and s["path"] == "/v1/chat/completions" for s in StubHandler.seen)
    assert all(s["body"]["model"] == "stub-model" and s["body"]["max_tokens"] <= 400 for s in StubHandler.seen)
    assert "sk-test" not in (tmp_path / "search.jsonl").read_text()


def test_openai_proposer_needs_endpoint(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("SECATEURS_LLM_MODEL", raising=False)
    with pytest.raises(UserError, match="llm-base-url"):
        OpenAIProposer(None, None)


def test_unreachable_endpoint_falls_back(tmp_path):
    p = OpenAIProposer("http://127.0.0.1:9/v1", "m", retries=0, timeout=2)
    res = evolve(SearchSpace(3, 0.3), quadratic([0.2, 0.3, 0.4]), p, EvolutionConfig(3, 1, 1, 1, 0), tmp_path / "s.jsonl")
    assert res.stats["by_source"] == {"fallback": 4} and res.stats["selections_by_source"] == {"fallback": 1}


@pytest.mark.slow
def test_real_search_with_local_proposer(tmp_path):
    """The embedded SmolLM2 proposes rates for pruning SmolLM2 itself: a short real search from the CLI."""
    out = tmp_path / "sp"
    r = subprocess.run([sys.executable, "-m", "secateurs", "prune", "smollm2-135m", "--method", "self-pruner",
                        "--proposer", "local", "--ratio", "0.2", "--population", "3", "--generations", "1",
                        "--crossover", "1", "--mutation", "1", "--nsamples", "2", "--seqlen", "64",
                        "--fitness-rows", "1", "--llm-retries", "1", "--llm-max-tokens", "120", "--eval", "", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    assert abs(res["ratio_achieved"] - 0.2) <= 0.005
    d = res["method_details"]
    assert d["search"]["proposals"] == 4 and d["search"]["tokens"]["completion"] > 0
    assert set(d["search"]["by_source"]) <= {"llm", "llm-repaired", "fallback"}
    recs = [json.loads(x) for x in (out / "search.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(p["attempts"] >= 1 for r in recs for p in r["proposals"] if p["source"] != "uniform")
