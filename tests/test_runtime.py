"""The runtime: a model run layer by layer under ``--max-memory`` gives bitwise the results of the same model in
memory (passes, the greedy search's order and losses, width plans, Self-Pruner's fitness, the saved folder), on
every architecture; a pruned folder loads without a dense-sized allocation; a bfloat16 run saves and reloads
bfloat16; bad budgets, devices and dtypes are one-line errors."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ARCHS, prune, tiny_model
from secateurs.cli import main
from secateurs.errors import UserError
from secateurs.methods import PruneContext
from secateurs.models import get_adapter
from secateurs.runtime import onloader_of
from secateurs.runtime.estimate import min_budget, model_sizes, working_bytes
from secateurs.runtime.loading import place
from secateurs.runtime.placement import parse_max_memory, parse_size

ROWS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    out = {}
    for arch in ARCHS:
        tiny_model(arch).save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def _load(folder, max_memory=None, spill=None, workload=(1, 16)):
    from transformers import AutoConfig

    return place(str(folder), AutoConfig.from_pretrained(folder), max_memory=max_memory, spill_dir=spill,
                 workload=workload, log=None)


def _tight(folder, extra=0, workload=(1, 16)):
    """A CPU budget just above what layer-by-layer work needs (far below the weights)."""
    sizes = model_sizes(_load(folder))
    return {"cpu": min_budget(sizes, *workload) + extra}


def _ctx(model, rows, tmp, ratio=0.3):
    tmp.mkdir(parents=True, exist_ok=True)
    return PruneContext.build(model, rows, ratio=ratio, workdir=tmp, progress=False)


def _run(method, ctx, **options):
    return prune(ctx.model, method, ctx.ratio, ctx.calib, ctx.workdir, **options)


def test_parse_max_memory():
    assert parse_max_memory("cuda:0=20GiB,cpu=30GiB") == {"cuda:0": 20 * 2**30, "cpu": 30 * 2**30}
    assert parse_max_memory("8GB") == {"cpu": 8 * 10**9}
    assert parse_max_memory("0=1.5GiB,disk=100MB") == {"cuda:0": int(1.5 * 2**30), "disk": 10**8}
    assert parse_max_memory({"cuda": 5, "cpu": 7}) == {"cuda:0": 5, "cpu": 7}  # the parsed form passes through
    for bad in ({"cpu": 0}, {"gpu": 5}, {"cuda": 1, "0": 2}, {"cpu": "8GiB"}):
        with pytest.raises(UserError, match="--max-memory"):
            parse_max_memory(bad)
    assert parse_size("512") == 512
    for bad in ["", "lots", "cpu=", "gpu=3GB", "cpu=3XB", "cpu=1GB,cpu=2GB", "1GB,2GB", "cpu=0"]:
        with pytest.raises(UserError, match="--max-memory"):
            parse_max_memory(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_passes_equal_resident(folders, arch, tmp_path):
    """Perplexity, input statistics, residual streams, Block Influence and replay inputs: bitwise equal."""
    from secateurs.importance.block_influence import block_influence
    from secateurs.importance.interaction import collect_streams
    from secateurs.importance.width import collect_stats
    from secateurs.runtime.passes import batches_of, capture_batches, row_nll

    res, lazy = _load(folders[arch]), _load(folders[arch], _tight(folders[arch], workload=(2, 16)), tmp_path, (2, 16))
    assert onloader_of(lazy) is not None and onloader_of(res) is None
    assert all(p.device.type == "meta" for p in get_adapter(lazy).layers().parameters())
    assert torch.equal(row_nll(res, ROWS, 2), row_nll(lazy, ROWS, 2))
    sr, sl = collect_stats(res, get_adapter(res), ROWS, 2), collect_stats(lazy, get_adapter(lazy), ROWS, 2)
    for name in sr.stats:
        assert torch.equal(sr.stats[name]["sumsq"], sl.stats[name]["sumsq"]) and torch.equal(sr.mean(name), sl.mean(name))
    for a, b in zip(collect_streams(res, get_adapter(res), ROWS, 2), collect_streams(lazy, get_adapter(lazy), ROWS, 2)):
        assert torch.equal(a, b)
    assert block_influence(res, get_adapter(res), ROWS, 3) == block_influence(lazy, get_adapter(lazy), ROWS, 3)
    er, kr, fr = capture_batches(res, batches_of(ROWS, 2))
    el, kl, fl = capture_batches(lazy, batches_of(ROWS, 2))
    for b in range(2):
        assert torch.equal(er[b], el[b]) and torch.equal(fr.get(b), fl.get(b))
        for i in range(4):
            assert set(kr[b][i]) == set(kl[b][i])
            cos_r, cos_l = kr[b][i]["position_embeddings"][0], kl[b][i]["position_embeddings"][0]
            assert torch.equal(cos_r, cos_l)
    assert onloader_of(lazy).loads >= 5 * 4  # every pass read every layer again


def _greedy(model, steps=5, cache_mb=64):
    from secateurs.search.greedy import Replayer, SearchSettings, block_candidates, greedy_search

    ad = get_adapter(model)
    with torch.inference_mode():
        r = Replayer(model, ad, ROWS, 1, head_chunk=16)
        s = SearchSettings(block_candidates(4, "mix"), max_steps=steps, cache_mb=cache_mb)
        state = greedy_search(r, ad.spec(), s)
        r.close()
    return [(st["removed"], st["loss"]) for st in state["steps"]], r


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_search_same_order_and_losses(folders, arch, tmp_path):
    """BlockPruner's search under a tight budget (layers read as their blocks run, head chunks and pinned states
    in files), and with no disk either (pinned states recomputed): the same order, bitwise the same losses."""
    want, r_res = _greedy(_load(folders[arch]))
    budget = _tight(folders[arch], extra=60_000)
    lazy = _load(folders[arch], budget, tmp_path / "spill")
    got, r_lazy = _greedy(lazy)
    assert got == want
    assert r_lazy.blocks_run >= r_res.blocks_run  # a smaller state cache: more blocks replayed, same results
    assert onloader_of(lazy).loads > 4  # layers were read again and again, not held
    no_disk = _load(folders[arch], {**budget, "disk": 1}, tmp_path / "spill2")
    got2, r2 = _greedy(no_disk)
    assert got2 == want
    assert r2.blocks_run >= r_res.blocks_run  # states that found no room were recomputed


def test_greedy_spills_pinned_states(folders, tmp_path):
    """The tight budget really spills: pinned states go to files (and are read back) during the search."""
    from secateurs.runtime import onload

    spilled = []
    orig = onload.SpillStore.keep

    def keep(self, t, tiers=("device", "cpu", "disk")):
        k = orig(self, t, tiers)
        if k is not None and k.tier == "disk":
            spilled.append(k)
        return k

    onload.SpillStore.keep = keep
    try:
        got, _ = _greedy(_load(folders["llama"], _tight(folders["llama"], extra=20_000), tmp_path / "s"))
    finally:
        onload.SpillStore.keep = orig
    assert spilled and got == _greedy(_load(folders["llama"]))[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_width_plans_and_fitness_same_with_budget(folders, arch, tmp_path, monkeypatch):
    """The same plans resident and layer by layer; tell's responses measured on each (a cache of its own: the
    layer-by-layer replay reads every layer's weights), with nll, which both can measure (auto takes kl on the
    resident model)."""
    from secateurs.methods.self_pruner import MaskedFitness

    res = _load(folders[arch])
    lazy = _load(folders[arch], _tight(folders[arch], workload=(4, 16)), tmp_path / "spill", (4, 16))
    for method, opts in [("flap", {}), ("wanda-sp", {}), ("tell", {"te_rank": 4, "te_tokens": 60, "latency_reps": 1,
                                                                   "latency_len": 8, "response_loss": "nll"})]:
        monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / f"cache-a-{method}"))
        a = _run(method, _ctx(res, ROWS, tmp_path / f"a-{method}"), **opts)
        monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / f"cache-b-{method}"))
        b = _run(method, _ctx(lazy, ROWS, tmp_path / f"b-{method}"), **opts)
        assert a.to_dict()["layers"] == b.to_dict()["layers"], method
    sr, sl = MaskedFitness.scores(_ctx(res, ROWS, tmp_path), 2), MaskedFitness.scores(_ctx(lazy, ROWS, tmp_path), 2)
    assert all(torch.equal(x, y) for a, b in zip(sr, sl) for x, y in zip(a, b))
    fr, fl = MaskedFitness(res, sr, ROWS[:2], 2), MaskedFitness(lazy, sl, ROWS[:2], 2)
    for rates in ([0.2] * 4, [0.0, 0.5, 0.1, 0.3]):
        assert fr(rates) == fl(rates)


def test_tell_speedup_refused_layer_by_layer(folders, tmp_path):
    lazy = _load(folders["llama"], _tight(folders["llama"], workload=(4, 16)), tmp_path, (4, 16))
    with pytest.raises(UserError, match="--speedup"):
        _run("tell", _ctx(lazy, ROWS, tmp_path, ratio=None), speedup=1.2)


def test_tell_kl_refused_layer_by_layer_or_beyond_the_budget(folders, tmp_path):
    """--response-loss kl keeps the dense log-probabilities: refused for a layer-by-layer model, and for a
    resident one whose --max-memory budget cannot hold them beside the weights."""
    lazy = _load(folders["llama"], _tight(folders["llama"], workload=(4, 16)), tmp_path, (4, 16))
    with pytest.raises(UserError, match="--response-loss kl .* layer-by-layer model"):
        _run("tell", _ctx(lazy, ROWS, tmp_path), response_loss="kl")
    from secateurs.methods.tell import TellConfig as _Tell  # auto (the default): nll there, and said why
    assert _Tell().loss_for(lazy, *ROWS.shape) == ("nll", "auto: a layer-by-layer model (--max-memory) cannot hold "
                                                          "the dense log-probabilities kl needs")
    from secateurs.importance.response import kl_cache_bytes
    from secateurs.methods.tell import TellConfig

    sizes = model_sizes(_load(folders["llama"]))
    cache = kl_cache_bytes(*ROWS.shape, sizes.vocab)
    tight = sizes.weights + working_bytes(sizes, 4, 16) + cache // 2  # holds the model, not the cache beside it
    model = _load(folders["llama"], {"cpu": tight}, tmp_path, (4, 16))
    assert onloader_of(model) is None
    with pytest.raises(UserError, match="--response-loss kl keeps .* more than the --max-memory budget"):
        _run("tell", _ctx(model, ROWS, tmp_path / "r"), response_loss="kl")
    assert TellConfig().loss_for(model, *ROWS.shape)[0] == "nll"  # auto: the budget cannot hold kl's cache
    TellConfig(response_loss="kl").check_calibration(_load(folders["llama"], {"cpu": tight + cache}, tmp_path, (4, 16)),
                                                     *ROWS.shape)


# --- whole runs through the command line --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
    """A tiny llama with SmolLM2's tokenizer (and vocabulary size), saved as a model folder."""
    from transformers import AutoTokenizer

    from secateurs.sources import embedded_folder

    folder = tmp_path_factory.mktemp("tok") / "tiny"
    tiny_model("llama", vocab_size=49152).save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded_folder("smollm2-135m", progress=False)).save_pretrained(folder)
    return folder


def _prune(folder, out, *extra):
    args = ["prune", str(folder), "--nsamples", "2", "--seqlen", "32", "--eval-rows", "2", "--quiet", "--out", str(out),
            *extra]
    assert main(args) == 0
    return json.loads((out / "result.json").read_text())


def _tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("method", [["--method", "flap", "--ratio", "0.02"], ["--method", "blockpruner", "--steps", "2"]])
def test_prune_with_budget_writes_the_same_folder(tok_folder, tmp_path, method, capsys):
    a = _prune(tok_folder, tmp_path / "a", *method)
    sizes = model_sizes(_load(tok_folder))
    budget = min_budget(sizes, 4, 32) + 2**20  # below the weights plus one batch: layer by layer
    assert budget < sizes.weights + working_bytes(sizes, 4, 32)
    b = _prune(tok_folder, tmp_path / "b", *method, "--max-memory", str(budget))
    assert a["placement"]["mode"] == "resident" and b["placement"]["mode"] == "onload"
    assert a["removed_blocks"] == b["removed_blocks"]
    assert json.loads((tmp_path / "a" / "plan.json").read_text())["layers"] == json.loads((tmp_path / "b" / "plan.json").read_text())["layers"]
    ta, tb = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (a["ppl_calib_after"], a["ppl_test_after"]) == (b["ppl_calib_after"], b["ppl_test_after"])
    assert not (tmp_path / "b.partial").exists() and not (tmp_path / "b" / "spill").exists()
    assert "estimated peak memory" in capsys.readouterr().out


def test_dtype_round_trip(tok_folder, tmp_path):
    """Pruned in bfloat16: saved in bfloat16 (config says so), reloaded in bfloat16 with the same weights, the
    same with a budget; with --dtype auto on a CPU it computes in float32 and says so."""
    import secateurs
    from secateurs.runtime.precision import checkpoint_dtype

    r = _prune(tok_folder, tmp_path / "bf", "--method", "flap", "--ratio", "0.02", "--dtype", "bfloat16")
    assert r["placement"]["dtype"] == "bfloat16"
    cfg = json.loads((tmp_path / "bf" / "config.json").read_text())
    assert checkpoint_dtype(cfg) == torch.bfloat16
    saved = _tensors(tmp_path / "bf")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    model, _ = secateurs.load(str(tmp_path / "bf"), dtype="bfloat16", progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    r2 = _prune(tok_folder, tmp_path / "bf2", "--method", "flap", "--ratio", "0.02", "--dtype", "bfloat16",
                "--max-memory", "16MiB")
    assert r2["placement"]["mode"] == "onload"
    assert all(torch.equal(v, _tensors(tmp_path / "bf2")[k]) for k, v in saved.items())
    up, _ = secateurs.load(str(tmp_path / "bf"), progress=False)  # auto on a CPU: float32 (documented)
    assert next(up.parameters()).dtype == torch.float32
    emb = "model.embed_tokens.weight"
    assert torch.equal(up.state_dict()[emb], saved[emb].float())


CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    def status(k):
        return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(k)).split()[1]) * 1024
    import torch, transformers, secateurs
    from secateurs.export.checkpoint import load_pruned
    import gc, ctypes
    load_pruned(sys.argv[1])  # a first load imports the modeling code; only the second one is measured
    gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    model, _ = load_pruned(sys.argv[1])
    print(json.dumps({"growth": status("VmHWM") - before,
                      "params": sum(p.numel() * p.element_size() for p in model.parameters())}))
""")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_pruned_folder_loads_below_its_dense_size(tmp_path):
    """A pruned folder is built at its pruned shapes from the start: loading it (in a fresh process) grows the
    peak memory by less than the dense model's size (building the dense model first would need all of it)."""
    from secateurs.export.checkpoint import _plain_config, save_pruned
    from secateurs.plan import PruningPlan
    from secateurs.surgery import apply_plan

    big = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, vocab_size=2048)
    dense = tiny_model("llama", **big)
    dense_bytes = sum(p.numel() * 4 for p in dense.parameters())
    spec = get_adapter(dense).spec()
    plan = PruningPlan.from_removed_blocks(spec, [(i, k) for i in (1, 2, 3, 4) for k in ("attn", "mlp")])
    save_pruned(apply_plan(tiny_model("llama", **big), plan), None, plan, _plain_config(dense.config), tmp_path / "p")
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "p")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["params"] < dense_bytes / 2
    assert got["growth"] < dense_bytes, (got, dense_bytes)


# --- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--max-memory", "lots"], "cannot read the size"),
    (["--max-memory", "gpu=3GB"], "unknown device"),
    (["--max-memory", "10KB"], "the smallest budget that works is"),
    (["--device", "cuda"], "no CUDA device") if not torch.cuda.is_available() else (["--device", "cuda:99"], "CUDA device"),
    (["--device", "tpu"], "not a device name"),
])
def test_bad_runtime_input_is_one_line_exit_2_nothing_written(tok_folder, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code = main(["prune", str(tok_folder), "--method", "flap", "--ratio", "0.02", "--nsamples", "2", "--seqlen", "32",
                 "--quiet", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_smallest_budget_named_works(tok_folder, tmp_path, capsys):
    """The size the error names is enough: a dry run with it loads layer by layer and writes nothing."""
    import re

    args = ["prune", str(tok_folder), "--method", "flap", "--ratio", "0.02", "--nsamples", "2", "--seqlen", "32",
            "--quiet", "--out", str(tmp_path / "o")]
    assert main([*args, "--max-memory", "10KB"]) == 2
    size = re.search(r"smallest budget that works is ([0-9.]+ \w+)", capsys.readouterr().err).group(1)
    assert main([*args, "--max-memory", size.replace(" ", ""), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "estimated peak memory" in out and "layer by layer" in out and "estimated search time" in out
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_search_time_estimate_on_a_busy_machine(tok_folder, tmp_path, monkeypatch, capsys):
    """prune's timing pass for the search-time estimate: on a quiet machine wall time, no note; on a busy one
    (the runnable count faked) the CPU time of the pass and a note that says so."""
    import secateurs.eval.load as load

    args = ["prune", str(tok_folder), "--method", "blockpruner", "--ratio", "0.02", "--nsamples", "2", "--seqlen", "32",
            "--quiet", "--dry-run", "--out", str(tmp_path / "o")]
    monkeypatch.setattr(load, "runnable", lambda: 1)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "estimated search time" in out and "busy while timing" not in out
    monkeypatch.setattr(load, "runnable", lambda: 2 * load.cores() + 1)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "the machine was busy while timing" in out and "timed by the CPU time of the pass" in out
    assert "estimated search time" in out and not (tmp_path / "o").exists()


def test_dtype_the_device_cannot_run(monkeypatch):
    from secateurs.runtime import precision

    def broken(*a, **k):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')

    monkeypatch.setattr(torch.nn.functional, "linear", broken)
    with pytest.raises(UserError, match="--dtype float16 cannot run on cpu"):
        precision.check_dtype_runs(torch.float16, "cpu")


def test_eval_and_apply_with_budget(tok_folder, tmp_path):
    """`eval` of a pruned folder and `apply` of a plan, layer by layer: the same perplexity, the same folder."""
    _prune(tok_folder, tmp_path / "p", "--method", "blockpruner", "--steps", "2")
    sizes = model_sizes(_load(tok_folder))
    budget = str(min_budget(sizes, 4, 32) + 2**20)
    evals = []
    for extra in ([], ["--max-memory", budget]):
        js = tmp_path / f"e{len(evals)}.json"
        assert main(["eval", str(tmp_path / "p"), "--ppl", "wiki:test", "--rows", "3", "--seqlen", "32", "--quiet",
                     "--json", str(js), *extra]) == 0
        evals.append(json.loads(js.read_text()))
    assert evals[0]["ppl"] == evals[1]["ppl"] and evals[1]["settings"]["placement"]["mode"] == "onload"
    for tag, extra in (("a", []), ("b", ["--max-memory", budget])):
        assert main(["apply", str(tmp_path / "p"), str(tok_folder), "--out", str(tmp_path / tag), "--seqlen", "32",
                     "--eval-rows", "2", "--quiet", *extra]) == 0
    ra, rb = (json.loads((tmp_path / t / "result.json").read_text()) for t in "ab")
    assert rb["settings"]["placement"]["mode"] == "onload" and ra["ppl_test_after"] == rb["ppl_test_after"]
    ta, tb = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert all(torch.equal(v, _tensors(tmp_path / "p")[k]) for k, v in ta.items())


def test_tell_kl_refusals_are_one_line_exit_2_nothing_written(tok_folder, tmp_path, capsys):
    """--response-loss kl refused: with an assignment that measures no responses (before loading), with a
    dense log-probability cache over 4 GiB, of the whole vocabulary (--kl-top) or of its 4096 most probable
    tokens a position (before the calibration rows are drawn), and layer by layer."""
    from secateurs.importance.response import kl_cache_bytes
    from secateurs.runtime.placement import format_size

    sizes = model_sizes(_load(tok_folder))
    lazy = str(min_budget(sizes, 4, 32) + 2**20)
    capsys.readouterr()
    for extra, message in [
        (["--assign", "uniform"], "--response-loss kl applies to --assign response"),
        (["--assign", "importance"], "--assign importance measures none"),
        (["--nsamples", "200", "--seqlen", "128", "--kl-top", "49152"],  # the whole vocabulary asked for
         f"200 x 127 positions (over a vocabulary of 49,152; the whole vocabulary), "
         f"{format_size(kl_cache_bytes(200, 128, 49152))}, more than its limit"),
        (["--nsamples", "1100", "--seqlen", "128"],  # not even the 4096 most probable tokens a position
         f"1100 x 127 positions (over a vocabulary of 49,152; their 4,096 most probable tokens a position), "
         f"{format_size(kl_cache_bytes(1100, 128, 49152, 4096))}, more than its limit"),
        (["--max-memory", lazy], "which a layer-by-layer model (--max-memory) cannot hold"),
    ]:
        out = tmp_path / "out"
        code = main(["prune", str(tok_folder), "--method", "tell", "--response-loss", "kl", "--ratio", "0.1",
                     "--nsamples", "2", "--seqlen", "32", "--quiet", "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not (tmp_path / "out.partial").exists()
