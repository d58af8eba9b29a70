"""The Ray worker pool (``--workers``): the searches give exactly the results of one process.

- BlockPruner's and SLEB's greedy search on a pool of 2 CPU workers: the same removal order and bitwise the
  same step losses as one process, also when candidates are abandoned against bounds found by the other
  worker, in the fast and the straightforward search; on the real model through the command line;
- Self-Pruner's generations scored on the pool: the same log (fitness values, populations) and plan;
- a worker killed in the middle of a step: its candidates are rerun on the other, the result is unchanged;
- bad input: an unreachable Ray address, workers the pool cannot place, options without ``--workers``, a
  method without candidates to spread, Ray not installed: one line, exit 2, nothing written.

One local Ray instance (2 CPUs) serves the whole module; each test starts its own workers on it.
"""
import json
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

import secateurs
from conftest import tiny_model
from secateurs.methods import get_method, make_config
from secateurs.models import get_adapter
from secateurs.runtime.pool import PoolSettings, WorkerPool
from secateurs.search.greedy import (CandidateScorer, PooledSteps, Replayer, SearchSettings, block_candidates,
                                     greedy_search, layer_candidates)

ROWS = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def shared():
    """A local Ray instance and a pool of 2 workers for the module (the worker processes are reused from test
    to test); workers import this folder's modules (the test models)."""
    pool = WorkerPool(PoolSettings(2), None).open(num_cpus=2, paths=[Path(__file__).parent])
    yield pool
    pool.close()


@pytest.fixture
def ray_session(shared):
    """Ray, with no worker of the shared pool holding CPUs (for tests that start their own pool)."""
    shared.stop_workers()
    return shared.ray


def steep_model(arch: str = "llama"):
    """A tiny model that is good on its rows only without its (huge) last MLP block: most candidates are
    abandoned early, against bounds that may come from the other worker."""
    model = tiny_model(arch)
    ad = get_adapter(model)
    with torch.no_grad():
        ad.final_norm().weight.mul_(10)
        ad.layers()[3].mlp.down_proj.weight.mul_(1000)
    return model


def scorer(model, rows, s, head_chunk=16):
    with torch.inference_mode():
        return CandidateScorer(Replayer(model, get_adapter(model), rows, 1, head_chunk), s)


def one_process(model, s, rows=ROWS):
    with torch.inference_mode():
        return greedy_search(Replayer(model, get_adapter(model), rows, 1, 16), get_adapter(model).spec(), s)


def on_pool(pool, loader, s, rows=ROWS, hook=None, state_path=None, on_step=None):
    """The search on the pool's 2 workers (their replicas loaded by ``loader``); returns the state."""
    pool.loader = loader
    with pool.start(scorer, rows, s, progress=False) as workers:
        workers.hook = hook
        steps = PooledSteps(workers, Replayer.count_tokens(rows), s)
        return greedy_search(steps, get_adapter(loader()).spec(), s, state_path=state_path, on_step=on_step)


def _order(state):
    return [(st["removed"], st["loss"]) for st in state["steps"]]


def test_pooled_search_equals_one_process(shared):
    loader = partial(steep_model, "llama")
    s = SearchSettings(block_candidates(4, "mix"), max_steps=6, cache_mb=64)
    ref = one_process(loader(), s)
    lost = shared.lost
    pooled = on_pool(shared, loader, s)
    assert _order(pooled) == _order(ref)  # same blocks, bitwise the same losses
    assert pooled["dense"] == ref["dense"]
    assert [st["ppl"] for st in pooled["steps"]] == [st["ppl"] for st in ref["steps"]]
    assert [st["ratio"] for st in pooled["steps"]] == [st["ratio"] for st in ref["steps"]]
    assert sum(st["evaluations_abandoned"] for st in pooled["steps"]) >= 5
    assert shared.lost == lost
    # the straightforward search on the pool, and SLEB's layer candidates on another architecture: the same
    exact = SearchSettings(block_candidates(4, "mix"), max_steps=3, exact=True)
    assert _order(on_pool(shared, loader, exact)) == _order(ref)[:3]
    layers = SearchSettings(layer_candidates(4, keep_ends=False), max_steps=2, cache_mb=64)
    gemma = partial(tiny_model, "gemma3_text")
    assert _order(on_pool(shared, gemma, layers)) == _order(one_process(gemma(), layers))


class Stop(Exception):
    pass


def test_interrupted_pooled_search_resumes(shared, tmp_path):
    loader = partial(tiny_model, "qwen2")
    s = SearchSettings(block_candidates(4, "mix"), max_steps=5, cache_mb=64)
    ref = one_process(loader(), s)
    path = tmp_path / "order.json"

    def interrupt(state):
        if len(state["steps"]) == 2:
            raise Stop

    with pytest.raises(Stop):
        on_pool(shared, loader, s, state_path=path, on_step=interrupt)
    seen = []
    resumed = on_pool(shared, loader, s, state_path=path, on_step=lambda st: seen.append(len(st["steps"])))
    assert seen == [3, 4, 5] and _order(resumed) == _order(ref)


def test_self_pruner_on_pool_equals_one_process(shared, tmp_path):
    calib = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    opts = dict(proposer="classic", population=5, generations=2, crossover=3, mutation=3, fitness_rows=2)
    runs = {}
    for name, loader in (("one", None), ("pool", partial(tiny_model, "llama"))):
        if loader is not None:
            shared.loader = loader
        cfg = make_config(get_method("self-pruner"), opts)
        plan = secateurs.prune(tiny_model("llama"), None, cfg, ratio=0.3, calib=calib, workdir=tmp_path / name,
                               workers=shared if loader is not None else None, progress=False)
        log = [json.loads(x) for x in (tmp_path / name / "search.jsonl").read_text().splitlines()]
        runs[name] = (plan.to_dict(), [{k: v for k, v in r.items() if k != "wall_s"} for r in log],
                      plan.record["method_details"]["best_fitness"])
    assert runs["pool"] == runs["one"]


def test_worker_killed_mid_step_loses_nothing(shared, tmp_path):
    loader = partial(steep_model, "llama")
    s = SearchSettings(block_candidates(4, "mix"), max_steps=5, cache_mb=64)
    ref = one_process(loader(), s)
    seen = {"results": 0}

    def kill_in_step_two(workers):
        seen["results"] += 1
        if seen["results"] == 8 + 3:  # step 1 has 8 candidates: the 3rd result of step 2, both workers busy
            shared.ray.kill(workers.actors[0])

    lost, rerun = shared.lost, shared.rerun
    killed = on_pool(shared, loader, s, hook=kill_in_step_two, state_path=tmp_path / "order.json")
    assert shared.lost == lost + 1 and shared.rerun > rerun
    assert _order(killed) == _order(ref)
    assert json.loads((tmp_path / "order.json").read_text())["steps"] == killed["steps"]


def test_worker_error_is_the_callers_error(ray_session):
    """A worker that cannot load the model (e.g. a node without it) stops the job with the loader's own line."""
    from secateurs.errors import UserError
    from secateurs.sources import replica_loader

    with WorkerPool(PoolSettings(2), partial(replica_loader, "no/such/model")).open() as pool:
        with pytest.raises(UserError, match="unknown model 'no/such/model'"):
            pool.start(scorer, ROWS, SearchSettings(block_candidates(4, "mix"), max_steps=1), progress=False)


@pytest.mark.slow
def test_cli_blockpruner_with_workers_on_smollm(ray_session, tmp_path):
    """The real model through the command line: ``--workers 2`` gives the order, losses and result of one process."""
    from secateurs.cli import main

    common = ["--method", "blockpruner", "--steps", "1", "--nsamples", "2", "--seqlen", "16", "--eval", "", "--quiet"]
    assert main(["prune", "smollm2-135m", *common, "--out", str(tmp_path / "one")]) == 0
    assert main(["prune", "smollm2-135m", *common, "--workers", "2", "--out", str(tmp_path / "pool")]) == 0
    one, pool = ({k: json.loads((tmp_path / d / f).read_text()) for f, k in (("order.json", "order"), ("result.json", "result"))}
                 for d in ("one", "pool"))
    assert _order(pool["order"]) == _order(one["order"])
    for k in ("ratio_achieved", "ppl_calib_after", "removed_blocks", "params_after"):
        assert pool["result"][k] == one["result"][k]
    assert pool["result"]["workers"]["workers"] == 2 and pool["result"]["workers"]["threads_per_worker"] == 1
    assert pool["result"]["settings"] == one["result"]["settings"]  # the pool is not a setting of the result


@pytest.mark.parametrize("extra, msg", [
    (["--workers", "2", "--ray-address", "127.0.0.1:1"], "cannot reach a Ray cluster at 127.0.0.1:1"),
    (["--workers", "2", "--ray-address", "nowhere"], "is not HOST:PORT"),
    (["--workers", "3"], "--workers 3 cannot be placed: each worker needs 1 CPU, and the Ray pool (1 node with 2 CPU) holds 2"),
    (["--workers", "2", "--threads-per-worker", "2"], "each worker needs 2 CPU"),
    (["--ray-address", "auto"], "--ray-address needs --workers N"),
    (["--workers", "2", "--gpus-per-worker", "1"], "--gpus-per-worker 1.0 needs --device cuda"),
])
def test_bad_pool_input(ray_session, tmp_path, capsys, extra, msg):
    from secateurs.cli import main

    out = tmp_path / "out"
    assert main(["prune", "smollm2-135m", "--method", "blockpruner", "--steps", "1", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_bad_method_and_cuda_placement(ray_session, tmp_path, capsys):
    from secateurs.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        main(["prune", "smollm2-135m", "--method", "sleb", "--ratio", "0.1", "--workers", "0", "--out", str(out)])
    assert "expected a whole number >= 1, got 0" in capsys.readouterr().err
    assert main(["prune", "smollm2-135m", "--method", "shortgpt", "--ratio", "0.1", "--workers", "2", "--out", str(out)]) == 2
    assert "--workers applies to the methods that search candidates (blockpruner, self-pruner, sleb), not shortgpt" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["prune", "smollm2-135m", "--method", "sleb", "--ratio", "0.1", "--workers", "1", "--device", "cuda",
                     "--out", str(out)]) == 2
        assert "each worker needs 1 CPU and 1 GPU" in capsys.readouterr().err
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_ray_missing(tmp_path, capsys, monkeypatch):
    from secateurs.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    out = tmp_path / "out"
    assert main(["prune", "smollm2-135m", "--method", "blockpruner", "--steps", "1", "--workers", "2", "--out", str(out)]) == 2
    assert "--workers needs Ray, which is not installed: pip install 'secateurs[ray]'" in capsys.readouterr().err
    assert not out.exists() and not out.with_name("out.partial").exists()



@pytest.mark.parametrize("loss,dtype", [("nll", "auto"), ("kl", "auto"), ("nll", "bfloat16")])
def test_tell_responses_on_pool_equal_one_process(shared, tmp_path, monkeypatch, loss, dtype):
    """tell's block responses fanned out over 2 workers: bitwise the same responses (the same files), the same
    whole-plan losses of --refine, the same plan as one process; with either --response-loss (kl: each worker
    computes the dense log-probabilities from its own replica), and with --response-dtype bfloat16 (one
    process measures on a copy, a worker converts its replica in place)."""
    from secateurs.methods.tell import TellConfig

    calib = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(2))
    cfg = TellConfig(levels="0.5", refine=2, response_loss=loss, response_dtype=dtype)
    runs = {}
    for name, pool in (("one", None), ("pool", shared)):
        monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / name / "cache"))
        if pool is not None:
            pool.loader = partial(tiny_model, "llama")
            for fn in ("measure_responses", "plan_loss"):  # nothing measured here: on the workers only
                monkeypatch.setattr(f"secateurs.methods.tell.{fn}", lambda *a, **k: pytest.fail("measured here"))
        model = tiny_model("llama")
        plan = secateurs.prune(model, None, cfg, ratio=0.3, calib=calib, workdir=tmp_path / name,
                               workers=pool, progress=False)
        assert next(model.parameters()).dtype == torch.float32  # the user's model is not converted
        files = sorted((tmp_path / name).glob("tell_responses_*.json"))
        details = plan.record["method_details"]["allocation"]
        runs[name] = (plan.to_dict()["layers"], [(f.name, f.read_bytes()) for f in files], details["refine"],
                      details["evaluations_measured"])
    assert runs["pool"] == runs["one"]
    assert runs["one"][3] > 16 and len(runs["one"][2]) == 3  # every block's options; the start and 2 refine plans
