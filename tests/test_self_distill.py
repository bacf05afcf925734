"""Self-data distillation (``responses: dense``) on a tiny dense/pruned pair: the answers are the
dense model's greedy ones, cached by content and resumed, an empty answer keeps the file's response,
the ledger counts the generation, and recovery trains on the answers end to end."""

from __future__ import annotations

import json

import pytest

from paser.data.pools import load_pool, write_jsonl
from paser.data.suite import generate_suite
from paser.errors import ConfigError, DataError
from paser.ledger import Ledger, forward_flops
from paser.models.generate import generate_answers
from paser.recovery import recover
from paser.recovery.config import DataSettings
from paser.recovery.dense_answers import AnswerCache, answer_key, count_answers, with_dense_answers

TOKENS = 6  # answer length: short, the tiny model never stops on its own


@pytest.fixture()
def records(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, generate_suite(10, seed=7))
    return load_pool(str(path)).records


@pytest.fixture()
def dense(tiny_pair):
    from paser.models.load import load_model

    return tiny_pair[0], load_model(tiny_pair[0])


def test_answers_are_the_dense_models_greedy_ones_and_come_back_from_the_cache(dense, records, tmp_path):
    ref, loaded = dense
    answered, summary = with_dense_answers(records, ref, loaded.model, loaded.tokenizer, "alpaca", TOKENS, 4,
                                           tmp_path, progress=False)
    expected = generate_answers(loaded.model, loaded.tokenizer, records, "alpaca", TOKENS, 4)
    kept = set(summary["kept_ids"])
    assert [a.response for a in answered] == [r.response if r.id in kept else e
                                             for r, e in zip(records, expected)]
    assert [a.id for a in answered] == [r.id for r in records] and answered[0].instruction == records[0].instruction
    assert summary["generated_now"] == len(records) and summary["new_tokens"] == summary["new_tokens_now"] > 0
    # everything cached: no model is needed the second time, and nothing counts as computed now
    again, second = with_dense_answers(records, ref, None, loaded.tokenizer, "alpaca", TOKENS, 4, tmp_path,
                                       progress=False)
    assert [a.response for a in again] == [a.response for a in answered]
    assert second["generated_now"] == 0 and second["new_tokens_now"] == 0
    assert second["new_tokens"] == summary["new_tokens"] and second["prompt_tokens"] == summary["prompt_tokens"]
    # another answer length is another key: generated again
    _, third = with_dense_answers(records[:2], ref, loaded.model, loaded.tokenizer, "alpaca", TOKENS + 1, 4,
                                  tmp_path, progress=False)
    assert third["generated_now"] == 2


def test_an_interrupted_cache_resumes_and_a_damaged_one_is_named(dense, records, tmp_path):
    ref, loaded = dense
    with_dense_answers(records[:4], ref, loaded.model, loaded.tokenizer, "alpaca", TOKENS, 2, tmp_path,
                       progress=False)
    path = tmp_path / "dense_answers" / "answers.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # the last write cut short
    _, summary = with_dense_answers(records[:4], ref, loaded.model, loaded.tokenizer, "alpaca", TOKENS, 2,
                                    tmp_path, progress=False)
    assert summary["generated_now"] == 1  # only the answer whose line was cut
    path.write_text("not json\n" + path.read_text())
    with pytest.raises(DataError, match=r"answers.jsonl: line 1 is not an answer record"):
        AnswerCache(path.parent)
    odd = tmp_path / "odd"  # an answer holding a line separator that is not a newline comes back whole
    AnswerCache(odd).add([{"key": "k", "id": "a", "answer": "one\u2028two\u00e9", "prompt_tokens": 1,
                           "new_tokens": 2}])
    assert AnswerCache(odd).rows["k"]["answer"] == "one\u2028two\u00e9"


def test_an_empty_answer_keeps_the_files_response(dense, records, tmp_path):
    from paser.data.prompts import format_prompt
    from paser.models.load import model_fingerprint

    ref, loaded = dense
    key = answer_key(model_fingerprint(ref), "alpaca", TOKENS, format_prompt(records[1], "alpaca", loaded.tokenizer))
    AnswerCache(tmp_path / "dense_answers").add([{"key": key, "id": records[1].id, "answer": "  ",
                                                  "prompt_tokens": 30, "new_tokens": 1}])
    answered, summary = with_dense_answers(records[:3], ref, loaded.model, loaded.tokenizer, "alpaca", TOKENS, 4,
                                           tmp_path, progress=False)
    assert answered[1].response == records[1].response and answered[0].response != records[0].response
    assert summary["kept_file_response"] == 1 and summary["kept_ids"] == [records[1].id]
    assert summary["generated_now"] == 2


def test_the_ledger_counts_generation_now_and_from_the_cache():
    params = {"body": 1000, "head": 50, "lora": 0}
    summary = {"model": "m", "params": params, "prompt_tokens": 300, "new_tokens": 60, "prompt_tokens_now": 100,
               "new_tokens_now": 20, "seconds": 1.5}
    ledger = Ledger()
    count_answers(ledger, summary)
    now, earlier = ledger.entries
    assert (now.tokens, now.positions, now.reused) == (120, 20, False)
    assert (earlier.tokens, earlier.positions, earlier.reused) == (240, 40, True)
    assert ledger.total == forward_flops(1000, 50, 360, 60) and ledger.spent == forward_flops(1000, 50, 120, 20)


def test_recovery_on_the_dense_models_answers(tiny_pair, records, tmp_path):
    dense, pruned = tiny_pair
    data = tmp_path / "sel.jsonl"
    write_jsonl(data, [r.fields for r in records])
    settings = dict(batch_size=4, micro_batch_size=2, max_steps=2, val_size=0, save_every=1, progress=False,
                    responses="dense", answer_tokens=TOKENS, teacher=dense)
    result = recover(pruned, str(data), tmp_path / "out", **settings)
    done = json.loads((tmp_path / "out" / "recovery.json").read_text())
    answers = done["dense_answers"]
    assert answers["records"] == len(records) and answers["generated_now"] == len(records)
    assert done["compute"]["flops_by_stage"]["dense answers"] > 0
    plain = recover(pruned, str(data), tmp_path / "plain", **(settings | {"responses": "data"}))
    assert result.first_loss != pytest.approx(plain.first_loss)  # other responses, another loss
    # resumed: the checkpoint is finished and the answers come from the cache, counted as reused
    assert answers["loaded_model"] is True
    recover(pruned, str(data), tmp_path / "out", **settings)
    again = json.loads((tmp_path / "out" / "recovery.json").read_text())
    assert again["dense_answers"]["generated_now"] == 0
    assert [e["reused"] for e in again["compute"]["entries"] if e["stage"] == "dense answers"] == [True]
    # nothing to generate: the dense model is not loaded, its sizes come from beside the cache
    assert again["dense_answers"]["loaded_model"] is False
    first = [e for e in done["compute"]["entries"] if e["stage"] == "dense answers"][0]
    reused = [e for e in again["compute"]["entries"] if e["stage"] == "dense answers"][0]
    assert reused["flops"] == pytest.approx(first["flops"])  # same tokens, same model sizes
    sizes = tmp_path / "out" / "dense_answers" / "models.json"
    sizes.write_text("{not json")  # a damaged sizes file costs a load, nothing else
    recover(pruned, str(data), tmp_path / "out", **settings)
    third = json.loads((tmp_path / "out" / "recovery.json").read_text())
    assert third["dense_answers"]["loaded_model"] is True and json.loads(sizes.read_text())


def test_dense_responses_need_a_teacher_and_a_fixed_file(tiny_pair, records, tmp_path):
    _, pruned = tiny_pair
    data = tmp_path / "loose.jsonl"
    write_jsonl(data, [r.fields for r in records])
    with pytest.raises(ConfigError, match="responses dense trains on the dense model's own answers"):
        recover(pruned, str(data), tmp_path / "out", responses="dense", progress=False)
    with pytest.raises(ValueError, match="responses must be one of"):
        DataSettings(responses="teacher")


def test_cli_recover_on_the_dense_models_answers(tiny_pair, records, tmp_path):
    from typer.testing import CliRunner

    from paser.cli import app

    dense, pruned = tiny_pair
    data = tmp_path / "sel.jsonl"
    write_jsonl(data, [r.fields for r in records])
    result = CliRunner().invoke(app, ["recover", pruned, "--data", str(data), "--out", str(tmp_path / "out"),
                                      "--responses", "dense", "--answer-tokens", str(TOKENS), "--teacher", dense,
                                      "--max-steps", "1", "--batch-size", "4", "--micro-batch-size", "4",
                                      "--val-size", "0", "--no-flow"])
    assert result.exit_code == 0, result.output
    assert f"on {dense}'s own answers ({len(records)} generated now" in result.output
    assert "dense answers" in result.output  # the ledger line names the generation
