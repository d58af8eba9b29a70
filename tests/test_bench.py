"""secateurs bench: FLOP counts agree with torch's own counter on dense and pruned models, runs alternate,
figures and ratios are consistent, peak memory includes what must be resident, and the command writes the
documented JSON. Tiny random models only (timings here are never checked against a goal)."""
import copy
import json
import shutil

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import busy_machine, tiny_model
from secateurs.eval.bench import (BenchSettings, _attention_layers, _head_flops, _linear_flops_per_token, decode_flops,
                                  peak_memory_cpu, prefill_flops, time_models, weight_bytes)
from secateurs.models import get_adapter, unique_param_count
from secateurs.plan import PruningPlan
from secateurs.surgery import apply_plan


def mixed_plan(spec):
    plan = PruningPlan.from_removed_blocks(spec, [(0, "attn"), (2, "mlp")])
    plan.layers[1].heads = [0, 1]  # one KV group (2 query heads per group in the tiny models)
    plan.layers[3].channels = list(range(10, 40))
    return plan


def counted_by_torch(model, T):
    """(mm FLOPs, bmm FLOPs) of one eager forward pass, by torch.utils.flop_counter."""
    model.set_attn_implementation("eager")  # the attention matmuls are then visible as bmm
    ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)  # as the timed prefill runs it
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    return counts.get("aten.mm", 0) + counts.get("aten.addmm", 0), counts.get("aten.bmm", 0)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("pruned", [False, True])
def test_flops_agree_with_torch_counter(arch, pruned):
    model = tiny_model(arch)
    if pruned:
        model = apply_plan(model, mixed_plan(get_adapter(model).spec()))
    T = 16
    mm, bmm = counted_by_torch(model, T)
    layers = _attention_layers(model)
    assert T * _linear_flops_per_token(model, with_head=False) + _head_flops(model) == mm
    # torch computes the full T x T score and value products (masked); we count the visible pairs only
    assert sum(4 * w * T * T for w, _ in layers) == bmm
    visible = {None: T * (T + 1) // 2, 8: sum(min(i + 1, 8) for i in range(T))}
    assert prefill_flops(model, T) == mm + sum(4 * w * visible[win] for w, win in layers)
    if arch == "gemma3_text":  # the tiny gemma has windows of 8 on its first three layers
        assert [win for _, win in _attention_layers(tiny_model(arch))] == [8, 8, 8, None]
    if pruned:
        assert [w for w, _ in layers] == [32, 64, 64]  # layer 0 lost attention, layer 1 kept 2 of 4 heads
    assert decode_flops(model, T) == _linear_flops_per_token(model) + sum(4 * w * (T + 1 if win is None else min(T + 1, win)) for w, win in layers)


def test_runs_alternate_and_medians_are_of_the_timed_rounds():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    calls = []
    a.register_forward_hook(lambda m, i, o: calls.append("a"))
    b.register_forward_hook(lambda m, i, o: calls.append("b"))
    s = BenchSettings(prompt_len=8, decode_tokens=3, warmup=1, reps=3)
    res = time_models([a, b], s)
    per_model = 1 + 1 + s.decode_tokens  # timed prefill, untimed prefill with cache, decode steps
    assert calls == (["a"] * per_model + ["b"] * per_model) * (s.warmup + s.reps)
    for r in res:
        assert len(r["prefill_ms_runs"]) == s.reps and r["prefill_ms"] == sorted(r["prefill_ms_runs"])[1]
        assert r["decode_tokens_per_s"] == sorted(r["decode_tokens_per_s_runs"])[1] > 0


def test_decode_runs_on_a_pruned_model_with_cache():
    model = tiny_model("gemma3_text")
    pruned = apply_plan(copy.deepcopy(model), mixed_plan(get_adapter(model).spec()))
    (r,) = time_models([pruned], BenchSettings(prompt_len=12, decode_tokens=20, warmup=0, reps=1))
    assert r["decode_tokens_per_s"] > 0  # 20 steps past the sliding window of 8, through a PartialLayer


def _folder(model, path, smollm_tokenizer_dir):
    model.save_pretrained(path)
    for f in smollm_tokenizer_dir.glob("tokenizer*"):
        shutil.copy(f, path / f.name)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_dir():
    from secateurs.sources import embedded_folder

    return embedded_folder("smollm2-135m", progress=False)


def test_peak_memory_holds_weights_and_logits(tmp_path, tokenizer_dir):
    # vocab 32,000 and 256 prompt tokens: the logits alone are 32 MB, which must show up in the peak
    model = tiny_model("llama", vocab_size=32000)
    ref = _folder(model, tmp_path / "m", tokenizer_dir)
    s = BenchSettings(prompt_len=256, decode_tokens=2)
    mb = peak_memory_cpu(ref, s)
    logits_mb = 256 * 32000 * 4 / 2**20
    assert mb >= weight_bytes(model) / 2**20 + logits_mb
    assert mb < weight_bytes(model) / 2**20 + 20 * logits_mb  # and not the whole process (torch alone is far more)


def test_bench_command_writes_the_documented_json(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    from secateurs.cli import main
    from secateurs.export.checkpoint import save_pruned

    dense = tiny_model("llama")
    d_ref = _folder(dense, tmp_path / "dense", tokenizer_dir)
    plan = mixed_plan(get_adapter(dense).spec())
    pruned = apply_plan(copy.deepcopy(dense), plan)
    save_pruned(pruned, AutoTokenizer.from_pretrained(d_ref), plan, dense.config.to_dict(), tmp_path / "pruned")
    p_ref = str(tmp_path / "pruned")
    out = tmp_path / "b.json"
    assert main(["bench", p_ref, "--against", d_ref, "--prompt-len", "16", "--decode-tokens", "2", "--reps", "2",
                 "--warmup", "0", "--json", str(out), "--quiet"]) == 0
    d = json.loads(out.read_text())
    for entry in (d, d["against"]):
        for k in ("prefill_ms", "decode_tokens_per_s", "peak_memory_mb", "params"):
            assert entry[k] > 0
    assert (d["model"], d["against"]["model"]) == (p_ref, d_ref)
    assert (d["params"], d["against"]["params"]) == (unique_param_count(pruned), unique_param_count(dense))
    assert d["speedup"]["prefill"] == pytest.approx(d["against"]["prefill_ms"] / d["prefill_ms"])
    assert d["speedup"]["decode"] == pytest.approx(d["decode_tokens_per_s"] / d["against"]["decode_tokens_per_s"])
    assert d["ideal_speedup"]["prefill"] == pytest.approx(prefill_flops(dense, 16) / prefill_flops(pruned, 16))
    assert d["ideal_speedup"]["decode"] == pytest.approx(decode_flops(dense, 16) / decode_flops(pruned, 16))
    assert d["ideal_speedup"]["prefill"] > 1.1
    assert d["settings"]["prompt_len"] == 16 and d["settings"]["order"].startswith("alternating")


def test_bad_settings_are_user_errors():
    from secateurs.cli import main

    assert main(["bench", "smollm2-135m", "--warmup", "-1"]) == 2


def _prefill_speedup(dense, pruned, s):
    from secateurs.eval.load import LoadWatch

    watch = LoadWatch()
    d, p = time_models([dense, pruned], s, watch)
    return d["prefill_ms"] / p["prefill_ms"], watch


def test_speedup_under_load_holds_or_says_the_machine_was_loaded():
    """Under an artificial load (a busy loop per core and one more), the prefill speedup (CPU time on one
    thread, alternated rounds) is within 10% of the quiet figure, or the load is detected: then bench prints
    a note instead of a conclusion. No figure is asserted for itself."""
    dense = tiny_model("llama", hidden_size=256, intermediate_size=1024)
    pruned = apply_plan(copy.deepcopy(dense), PruningPlan.from_removed_blocks(get_adapter(dense).spec(),
                                                                            [(1, "mlp"), (2, "mlp"), (3, "attn")]))
    s = BenchSettings(prompt_len=64, decode_tokens=2, warmup=1, reps=5)
    quiet, _ = _prefill_speedup(dense, pruned, s)
    with busy_machine():
        loaded, watch = _prefill_speedup(dense, pruned, s)
    record = watch.record()
    assert record["runnable"] and len(record["runnable"]) == s.warmup + s.reps + 1  # before, between rounds, after
    assert record["loaded"] or abs(loaded / quiet - 1) <= 0.10, (quiet, loaded, record)


def test_bench_prints_a_note_on_a_loaded_machine(tmp_path, tokenizer_dir, monkeypatch, capsys):
    import secateurs.eval.load as load
    from secateurs.cli import main

    ref = _folder(tiny_model("llama"), tmp_path / "m", tokenizer_dir)
    args = ["bench", ref, "--against", ref, "--prompt-len", "8", "--decode-tokens", "1", "--reps", "1", "--warmup", "0",
            "--no-memory", "--json", str(tmp_path / "b.json"), "--quiet"]
    monkeypatch.setattr(load, "runnable", lambda: 1)  # only this process
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "note:" not in out and "timer process_time, 1 thread" in out
    assert json.loads((tmp_path / "b.json").read_text())["load"]["loaded"] is False
    monkeypatch.setattr(load, "runnable", lambda: 2 * load.cores() + 1)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(machine busy: see the note)" in out and "note: the machine was busy while this was timed" in out
    assert json.loads((tmp_path / "b.json").read_text())["load"]["loaded"] is True
