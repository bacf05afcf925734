"""The lm-evaluation-harness bridge on a tiny local model: a local JSONL task runs offline and its
accuracies equal a direct log-likelihood computation, for a base model and a model + adapter."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from paser.errors import DataError

pytest.importorskip("lm_eval")

QUESTIONS = [
    ("What is two plus two?", ["four", "five", "twenty-two"], 0),
    ("Which city is the capital of France?", ["Paris", "Rome", "Berlin", "Madrid"], 0),
    ("Which number is larger, 3 or 7?", ["3", "7"], 1),
    ("What colour is a clear sky?", ["green", "blue"], 1),
    ("Sort the words: pear apple", ["apple pear", "pear apple", "apple"], 0),
    ("What is the opposite of hot?", ["warm", "cold", "boiling"], 1),
    ("Count the letters in 'cat'.", ["2", "3", "4"], 1),
    ("Which day follows Monday?", ["Sunday", "Tuesday", "Friday"], 1),
    ("Convert 1 kilometre to metres.", ["1000", "100", "10"], 0),
    ("Reverse the string 'abc'.", ["cba", "abc", "bca"], 0),
]


@pytest.fixture()
def choice_file(tmp_path):
    path = tmp_path / "mini_mc.jsonl"
    path.write_text("".join(json.dumps({"query": f"Question: {q}\nAnswer:", "choices": c, "gold": g}) + "\n"
                            for q, c, g in QUESTIONS))
    return path


def direct_accuracy(model, tokenizer) -> tuple[float, float]:
    """acc and acc_norm computed here: each choice scored as ' ' + choice after the query."""
    acc, acc_norm = [], []
    for q, choices, gold in QUESTIONS:
        context = f"Question: {q}\nAnswer:"
        lls = []
        for choice in choices:
            ctx = tokenizer.encode(context)
            whole = tokenizer.encode(context + " " + choice)
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            lls.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        lls = np.array(lls)
        acc.append(float(np.argmax(lls) == gold))
        acc_norm.append(float(np.argmax(lls / np.array([len(c) for c in choices])) == gold))
    return float(np.mean(acc)), float(np.mean(acc_norm))


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
def test_local_jsonl_task_equals_direct_computation(tmp_path, tiny_tokenizer, choice_file, with_adapter):
    from peft import LoraConfig, PeftModel, get_peft_model

    from paser.evaluation import evaluate
    from paser.evaluation.metrics import load_for_eval
    from tests.conftest import build_model

    folder = tmp_path / "model"
    build_model(tiny_tokenizer, seed=3).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    adapter = None
    if with_adapter:
        # random A and B, scaled up, so that the adapter changes the answers
        base = build_model(tiny_tokenizer, seed=3)
        torch.manual_seed(0)
        peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
        adapter = tmp_path / "adapter"
        peft.save_pretrained(adapter)
    result = evaluate(str(folder), str(adapter) if adapter else None, tmp_path / "eval", suite_size=0,
                      lm_eval_tasks=[str(choice_file)])
    scores = result["lm_eval"]["paser_mini_mc"]
    assert scores["samples"] == len(QUESTIONS)

    net, tokenizer, _ = load_for_eval(str(folder), str(adapter) if adapter else None)
    assert isinstance(net, PeftModel) == with_adapter
    acc, acc_norm = direct_accuracy(net, tokenizer)
    if with_adapter:  # the bridge must have scored the adapted model, not its base
        with net.disable_adapter():
            assert (acc, acc_norm) != direct_accuracy(net, tokenizer)
    assert scores["acc"] == pytest.approx(acc)
    assert scores["acc_norm"] == pytest.approx(acc_norm)
    table = (tmp_path / "eval" / "eval.md").read_text()
    assert "paser_mini_mc (10 records, test split, 0-shot), accuracy (acc)" in table
    assert "normalised accuracy (acc_norm, per character)" in table
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["lm_eval"]["paser_mini_mc"] == scores


@pytest.mark.parametrize("line, field", [
    ('{"query": "", "choices": ["a", "b"], "gold": 0}', "query"),
    ('{"query": "q", "choices": ["a"], "gold": 0}', "choices"),
    ('{"query": "q", "choices": ["a", 3], "gold": 0}', "choices"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "gold"),
    ('{"query": "q", "choices": ["a", "b"], "gold": true}', "gold"),
])
def test_bad_choice_record_names_file_line_and_field(tmp_path, line, field):
    from paser.evaluation.harness import resolve_tasks

    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "q", "choices": ["a", "b"], "gold": 1}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"bad.jsonl, line 2, field '{field}'"):
        resolve_tasks([str(path)], tmp_path / "tasks")


def test_task_specs_resolve(tmp_path, choice_file):
    from paser.evaluation.harness import PAPER_TASKS, resolve_tasks

    yaml_task = tmp_path / "own" / "own.yaml"
    yaml_task.parent.mkdir()
    yaml_task.write_text("task: my_own_task\ndataset_path: json\n")
    names, include = resolve_tasks(["paper", str(choice_file), str(yaml_task), "boolq"], tmp_path / "tasks")
    assert names == [*PAPER_TASKS, "paser_mini_mc", "my_own_task"]  # boolq once
    assert include == [str(yaml_task.parent.resolve()), str(tmp_path / "tasks")]
    assert (tmp_path / "tasks" / "paser_mini_mc.yaml").is_file()
    with pytest.raises(DataError, match="no such lm-eval task file"):
        resolve_tasks([str(tmp_path / "missing.jsonl")], tmp_path / "tasks")
    (tmp_path / "nameless.yaml").write_text("dataset_path: json\n")
    with pytest.raises(DataError, match=r"nameless.yaml, field 'task'"):
        resolve_tasks([str(tmp_path / "nameless.yaml")], tmp_path / "tasks")


@pytest.mark.slow
def test_builtin_task_offline_and_unknown_task_fail_before_the_model_loads(tmp_path, monkeypatch):
    from paser.evaluation import evaluate
    from paser.evaluation.harness import prepare_tasks

    with pytest.raises(DataError, match=r"lm-eval task 'arc_esy': unknown; did you mean .*arc_easy"):
        prepare_tasks(["arc_esy"], tmp_path)
    with pytest.raises(DataError, match=r"lm-eval task 'lambada_openai': its data did not load .*local JSONL"):
        prepare_tasks(["lambada_openai"], tmp_path)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the tasks were checked")

    monkeypatch.setattr("paser.evaluation.entry.load_for_eval", no_model)
    with pytest.raises(DataError, match="arc_esy"):
        evaluate("any-model", suite_size=0, lm_eval_tasks=["arc_esy"])


def test_cli_evaluate_with_local_task(tmp_path, tiny_tokenizer, choice_file, monkeypatch):
    from paser.cli import app
    from tests.conftest import build_model

    folder = tmp_path / "model"
    build_model(tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    runner = CliRunner()
    done = runner.invoke(app, ["evaluate", str(folder), "--no-flow", "--suite-size", "0", "--lm-eval-task",
                               str(choice_file), "--lm-eval-limit", "4", "--out", str(tmp_path / "eval")])
    assert done.exit_code == 0, done.output
    assert "lm-eval paser_mini_mc (4 records, test split, 0-shot), accuracy (acc)" in done.output
    assert (tmp_path / "eval" / "lm_eval_tasks" / "paser_mini_mc.yaml").is_file()
    # with no output folder the generated task YAML lives in a temporary folder, removed afterwards
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    done = runner.invoke(app, ["evaluate", str(folder), "--no-flow", "--suite-size", "0", "--lm-eval-task",
                               str(choice_file), "--lm-eval-limit", "2"])
    assert done.exit_code == 0, done.output
    assert "paser_mini_mc (2 records" in done.output and not any((tmp_path / "tmp").iterdir())
    bad = tmp_path / "broken.jsonl"
    bad.write_text("not json\n")
    done = runner.invoke(app, ["evaluate", str(folder), "--no-flow", "--suite-size", "0", "--lm-eval-task", str(bad)])
    assert done.exit_code != 0
    assert "broken.jsonl, line 1: not valid JSON" in done.output


def test_a_query_holding_a_line_separator_is_one_record(tmp_path):
    from paser.evaluation.harness import read_choice_records

    path = tmp_path / "sep.jsonl"
    path.write_text(json.dumps({"query": "one\u2028two", "choices": ["a", "b"], "gold": 1}, ensure_ascii=False)
                    + "\r\n", encoding="utf-8")
    assert [r["query"] for r in read_choice_records(path)] == ["one\u2028two"]
