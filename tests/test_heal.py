"""``secateurs heal`` on tiny random models (a small byte-level BPE tokenizer trained on wiki:calib, so that the
vocabulary stays small): healing lowers the distillation loss on held-out rows, the merged folder computes what
the adapter model computed, it loads with plain transformers and keeps the source's shapes and plan, a job
killed with SIGKILL and rerun ends with bitwise the same weights, and bad input gets one line, exit 2 and
nothing written. One test on the real SmolLM2 (slow)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_bpe_tokenizer, tiny_model
from secateurs.cli import main
from secateurs.export.checkpoint import _plain_config, load_pruned, save_pruned
from secateurs.models import get_adapter
from secateurs.plan import PruningPlan
from secateurs.surgery import apply_plan

VOCAB = 384
# small and quick: rows of 64 tokens, 4 per step; held-out perplexity on 2 rows of 64
SMALL = ["--seqlen", "64", "--batch-rows", "4", "--eval-rows", "2", "--eval-seqlen", "64", "--quiet"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer of 384 tokens trained on wiki:calib paragraphs."""
    folder = tmp_path_factory.mktemp("tok")
    tiny_bpe_tokenizer(VOCAB, ["<s>", "</s>"], bos="<s>", eos="</s>").save_pretrained(folder)
    return folder


def uneven_plan(spec) -> PruningPlan:
    """Every kind of change (test_export's uneven plan): a removed attention block, fewer heads and channels, a
    removed MLP block, bias compensation on layer 3's attention output."""
    from test_export import plans

    return plans(spec)["uneven"][0]


def make_pruned(root: Path, tokenizer_dir: Path, arch: str = "llama", plan_fn=uneven_plan) -> Path:
    """root/dense (a plain model folder) and root/pruned (pruned from it, result.json naming it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    def model():  # larger weights than the default initialisation: peaked next-token distributions
        return tiny_model(arch, vocab_size=VOCAB, initializer_range=0.25)

    dense = model()
    dense.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    spec = get_adapter(dense).spec()
    plan = plan_fn(spec)
    result = {"method": "hand-made", "model": str(root / "dense"), "ratio_achieved": plan.ratio(spec)}
    save_pruned(apply_plan(model(), plan), tok, plan, _plain_config(dense.config), root / "pruned",
                extra={"result.json": json.dumps(result)})
    return root / "pruned"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tokenizer_dir):
    return make_pruned(tmp_path_factory.mktemp("heal"), tokenizer_dir)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """200 wiki:calib paragraphs (about 60k tokens of the small tokenizer): quicker to read than all of wiki."""
    from secateurs.data import load_texts

    path = tmp_path_factory.mktemp("data") / "wiki-200.txt"
    path.write_text("\n\n".join(load_texts("wiki")[:200]))
    return path


def heal(*args) -> int:
    return main(["heal", *map(str, args)])


def held_out_kd(model, teacher, rows) -> float:
    from secateurs.heal.loss import kd_topk

    with torch.no_grad():
        t = torch.log_softmax(teacher(rows).logits[:, :-1].float(), -1).topk(64, -1)
        return float(kd_topk(model(rows).logits[:, :-1], t.indices, t.values))


def test_heal_lowers_held_out_kd_and_keeps_the_folder(pruned, tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from secateurs.data import eval_rows
    from secateurs.sources import load_model

    out = tmp_path / "healed"
    assert heal(pruned, "--out", out, "--tokens", "20k", "--lr", "3e-3", *SMALL) == 0
    assert not (tmp_path / "healed.partial").exists()
    before, tok = load_pruned(pruned)
    after, _ = load_pruned(out)
    teacher, _ = load_model(str(pruned.parent / "dense"))
    rows = eval_rows(tok, before, "wiki:test", 64, 8)  # held out: never in the heal data
    kd0, kd1 = held_out_kd(before, teacher, rows), held_out_kd(after, teacher, rows)
    assert kd1 < 0.8 * kd0, (kd0, kd1)
    # same shapes, same plan (byte for byte), same export kind; only the adapted weights changed
    sd0, sd1 = before.state_dict(), after.state_dict()
    assert {k: v.shape for k, v in sd0.items()} == {k: v.shape for k, v in sd1.items()}
    assert (out / "plan.json").read_bytes() == (pruned / "plan.json").read_bytes()
    assert json.loads((out / "secateurs.json").read_text()) == json.loads((pruned / "secateurs.json").read_text())
    for k in sd0:
        changed = not torch.equal(sd0[k], sd1[k])
        assert changed == (k.endswith("proj.weight")), k  # LoRA targets only: norms, embeddings and biases as they were
    # the record
    rec = json.loads((out / "heal.json").read_text())
    assert rec["tokens_seen"] >= 20_000 and rec["steps"] == len(rec["loss_curve"])
    assert rec["settings"]["loss"] == "kd" and rec["teacher"] == str(pruned.parent / "dense")
    assert rec["data"]["overlap_check"]["overlaps_reported"] == {"boolq": rec["data"]["overlap_check"]["units"]}
    assert len(rec["data"]["fingerprint"]) == 64 and rec["versions"]["peft"]
    res = json.loads((out / "result.json").read_text())
    assert res["method"] == "hand-made+heal" and res["ppl_test_after"] == rec["eval"]["ppl_healed"]
    assert res["format"] == "secateurs-result/1" and res["eval_seqlen"] == rec["eval"]["seqlen"]  # as prune writes it
    assert res["ppl_test_after"] < res["ppl_test_pruned"]
    # the adapter model before merging computes what the merged folder computes
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(load_pruned(pruned)[0], out / "heal_adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(rows).logits, after(rows).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "gemma3_text"])
def test_other_architectures_heal_and_merge_exactly(arch, tmp_path, tokenizer_dir, small_data):
    """Every architecture: healing changes the adapted weights only, and the merged folder computes what the
    adapter model computed (Qwen2's q/k/v biases and Gemma's BOS rows and norms included)."""
    from peft import PeftModel

    src = make_pruned(tmp_path, tokenizer_dir, arch)
    out = tmp_path / "healed"
    assert heal(src, "--out", out, "--tokens", "1024", "--lr", "3e-3", "--data", small_data, "--eval", "", *SMALL) == 0
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    before, after = load_pruned(src)[0], load_pruned(out)[0]
    adapted = PeftModel.from_pretrained(load_pruned(src)[0], out / "heal_adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, after(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(before(ids).logits, after(ids).logits)
    sd0, sd1 = before.state_dict(), after.state_dict()
    assert {k: v.shape for k, v in sd0.items()} == {k: v.shape for k, v in sd1.items()}
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0 if not k.endswith("proj.weight"))


def test_healed_folder_loads_without_secateurs(pruned, tmp_path, small_data):
    """The folder loads with plain transformers in a process where secateurs cannot be imported."""
    from test_export import run_child

    out = tmp_path / "healed"
    assert heal(pruned, "--out", out, "--tokens", "512", "--loss", "lm", "--data", small_data, "--eval", "", *SMALL) == 0
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    job = {"dir": str(out), "remote": True, "ids": ids.tolist(), "new": 4, "out": str(tmp_path / "child.pt")}
    run_child([job], tmp_path)
    child = torch.load(tmp_path / "child.pt")
    model, _ = load_pruned(out)
    with torch.no_grad():
        torch.testing.assert_close(child["logits"], model(ids).logits, atol=1e-5, rtol=1e-5)
    assert child["class"] == "SecateursForCausalLM"


def test_full_fine_tuning_trains_biases_and_keeps_shapes(pruned, tmp_path, small_data):
    out = tmp_path / "full"
    assert heal(pruned, "--out", out, "--tokens", "1024", "--full", "--lr", "1e-3", "--data", small_data, "--eval", "", *SMALL) == 0
    before, after = load_pruned(pruned)[0].state_dict(), load_pruned(out)[0].state_dict()
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    assert not torch.equal(before["model.layers.3.self_attn.o_proj.bias"], after["model.layers.3.self_attn.o_proj.bias"])
    assert not (out / "heal_adapter").exists()
    assert json.loads((out / "heal.json").read_text())["adapters"] == "full"


def _cli(args, env_extra=None, **kw):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "secateurs", "heal", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _stop_at(args, state: Path, min_step: int, sig) -> tuple[int, int]:
    """Starts a heal, sends ``sig`` once ``state`` holds at least ``min_step`` steps; (exit code, saved step)."""
    p = _cli(args)
    t0 = time.time()
    while not (state.exists() and torch.load(state, weights_only=False)["step"] >= min_step):
        assert p.poll() is None, "the run ended before it could be stopped: " + p.stderr.read()[-2000:]
        assert time.time() - t0 < 300
        time.sleep(0.05)
    p.send_signal(sig)
    rc = p.wait(timeout=300)
    return rc, torch.load(state, weights_only=False)["step"]


def test_resume_after_ctrl_c_and_sigkill_gives_identical_weights(pruned, tmp_path, small_data):
    """Ctrl-C saves after the step in flight (exit 130); SIGKILL loses what followed the last save; each rerun
    of the same command continues, and the end is bitwise the uninterrupted run's."""
    from safetensors.torch import load_file

    args = ["--tokens", "12k", "--data", small_data, "--checkpoint-minutes", "0", "--eval", "", *SMALL]  # 47 steps
    straight = tmp_path / "straight"
    r = _cli([pruned, "--out", straight, *args])
    assert r.wait(timeout=600) == 0, r.stderr.read()[-2000:]

    out = tmp_path / "resumed"
    state = tmp_path / "resumed.partial" / "state.pt"
    rc, first = _stop_at([pruned, "--out", out, *args], state, 3, signal.SIGINT)
    assert rc == 130 and 3 <= first < 47 and not out.exists()
    rc, second = _stop_at([pruned, "--out", out, *args], state, first + 3, signal.SIGKILL)
    assert rc == -signal.SIGKILL and first + 3 <= second < 47 and not out.exists()
    r = _cli([pruned, "--out", out, *args])
    assert r.wait(timeout=600) == 0, r.stderr.read()[-2000:]
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "heal.json").read_text()) for d in (straight, out))
    assert ra["loss_curve"] == rb["loss_curve"] and ra["data"]["fingerprint"] == rb["data"]["fingerprint"]


def test_heal_data_file_and_teacher_override(pruned, tmp_path):
    from secateurs.data import load_texts

    data = tmp_path / "mine.txt"
    data.write_text("\n\n".join(load_texts("wiki")[:60]))
    moved = tmp_path / "teacher"
    os.rename(pruned.parent / "dense", moved)
    try:
        assert heal(pruned, "--out", tmp_path / "o1", "--data", data, "--tokens", "256", *SMALL) == 2  # teacher gone
        assert heal(pruned, "--out", tmp_path / "o1", "--data", data, "--tokens", "256", "--teacher", moved, *SMALL) == 0
    finally:
        os.rename(moved, pruned.parent / "dense")
    rec = json.loads((tmp_path / "o1" / "heal.json").read_text())
    assert rec["teacher"] == str(moved) and rec["data"]["name"] == str(data)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tokenizer_dir, pruned):
    root = tmp_path_factory.mktemp("bad")
    no_plan = root / "no-plan"
    no_plan.mkdir()
    (no_plan / "secateurs.json").write_text((pruned / "secateurs.json").read_text())
    (no_plan / "config.json").write_text((pruned / "config.json").read_text())
    (root / "narrow").mkdir()
    narrow = make_pruned(root / "narrow", tokenizer_dir, plan_fn=_narrow)
    test_text = root / "test.txt"
    from secateurs.data import load_texts

    test_text.write_text("some text of my own, long enough to count as a paragraph\n\n" + load_texts("wiki:test")[3])
    full = root / "full-out"
    full.mkdir()
    (full / "x").write_text("keep me")
    return {"no_plan": no_plan, "dense": pruned.parent / "dense", "narrow": narrow, "test_text": test_text, "full": full}


def _narrow(spec):
    plan = PruningPlan.dense(spec)
    plan.layers[2].channels = list(range(6))  # gate/up/down of layer 2 are 6 channels wide
    return plan


@pytest.mark.parametrize("case, extra, message", [
    ("no_plan", [], "has no plan.json"),
    ("dense", [], "has no plan.json: a model folder without a plan (a dense model?)"),
    ("embedded", [], "is a dense model, not a pruned folder"),
    ("missing", [], "is not a folder; give a folder written by `secateurs prune` or `secateurs apply`"),
    ("few_tokens", ["--tokens", "10M"], "more than --max-epochs 1 pass(es)"),
    ("rank", ["--lora-rank", "8"], "--lora-rank 8 is larger than the width of"),
    ("out_exists", [], "exists and is not empty"),
    ("out_is_source", ["--overwrite"], "is the folder being healed"),
    ("held_out", ["--data", "wiki:test"], "held-out evaluation text"),
    ("held_out_file", [], "shares 1 paragraph(s) with the held-out wiki:test text"),
    ("loss", ["--temperature", "0"], "--temperature must be a positive number"),
])
def test_bad_input_one_line_exit_2_nothing_written(bad_inputs, pruned, tmp_path, capsys, case, extra, message):
    src = {"no_plan": bad_inputs["no_plan"], "dense": bad_inputs["dense"], "embedded": "smollm2-135m",
           "missing": "runs/no-such-folder", "rank": bad_inputs["narrow"]}.get(case, pruned)
    out = {"out_exists": bad_inputs["full"], "out_is_source": pruned}.get(case, tmp_path / "out")
    if case == "held_out_file":
        extra = ["--data", bad_inputs["test_text"]]
    before = sorted(os.listdir(tmp_path))
    assert heal(src, "--out", out, *extra, *SMALL) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("secateurs: error:") and message in err and "\n" not in err, err
    assert sorted(os.listdir(tmp_path)) == before  # neither the output nor a .partial folder
    if case == "out_exists":
        assert os.listdir(out) == ["x"]


def test_resume_refuses_other_settings(pruned, tmp_path, capsys, small_data):
    work = tmp_path / "o.partial"
    work.mkdir()
    (work / "settings.json").write_text("{}")
    assert heal(pruned, "--out", tmp_path / "o", "--tokens", "256", "--data", small_data, *SMALL) == 2
    assert "holds an unfinished heal with other settings" in capsys.readouterr().err


def test_kd_topk_is_the_coarsened_kl():
    """With k = V - 1 the rest bucket is a single token: the coarsened KL is the full KL."""
    from secateurs.heal.loss import kd_topk

    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 3, 10, generator=g) * 2, torch.randn(2, 3, 10, generator=g) * 2
    full = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()
    top = t.log_softmax(-1).topk(9, -1)
    torch.testing.assert_close(kd_topk(s, top.indices, top.values), full)
    top3 = t.log_softmax(-1).topk(3, -1)
    assert 0 < kd_topk(s, top3.indices, top3.values) <= full + 1e-6
    assert float(kd_topk(t, top3.indices, top3.values)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_heal_real_smollm2_lowers_held_out_kd(tmp_path, smollm):
    """The real model: SmolLM2 pruned by FLAP to 20%, healed on 4k tokens, is closer to the dense model on
    held-out wiki:test rows."""
    from secateurs.data import eval_rows

    out = tmp_path / "flap"
    assert main(["prune", "smollm2-135m", "--method", "flap", "--ratio", "0.2", "--nsamples", "4", "--seqlen", "128",
                 "--eval", "", "--quiet", "--out", str(out)]) == 0
    healed = tmp_path / "healed"
    assert heal(out, "--out", healed, "--tokens", "4096", "--seqlen", "128", "--lr", "1e-3", "--eval", "", "--quiet") == 0
    dense, tok = smollm
    rows = eval_rows(tok, dense, "wiki:test", 128, 4)
    kd0, kd1 = (held_out_kd(load_pruned(d)[0], dense, rows) for d in (out, healed))
    assert kd1 < 0.9 * kd0, (kd0, kd1)
    rec = json.loads((healed / "heal.json").read_text())
    assert rec["teacher"] == "smollm2-135m" and rec["steps"] == 16 and rec["export"] == "custom"


def test_shared_teacher_cache_is_reused_and_keyed(pruned, tmp_path, capsys, small_data):
    import numpy as np

    cache = tmp_path / "cache"
    small = ["--data", small_data, "--eval", "", *SMALL]
    assert heal(pruned, "--out", tmp_path / "a", "--tokens", "1024", "--teacher-cache", cache, *small) == 0
    first = np.load(cache / "done.npy").sum()
    assert first == 4 * 4  # 4 steps of 4 rows, each row once (one pass)
    assert heal(pruned, "--out", tmp_path / "b", "--tokens", "2048", "--teacher-cache", cache, *small) == 0
    assert first < np.load(cache / "done.npy").sum() <= 32
    assert json.loads((tmp_path / "b" / "heal.json").read_text())["teacher_cache"] == str(cache)
    assert heal(pruned, "--out", tmp_path / "c", "--tokens", "1024", "--topk", "8", "--teacher-cache", cache, *small) == 2
    assert "was made with other settings (topk differ)" in capsys.readouterr().err
    assert not (tmp_path / "c.partial").exists()
