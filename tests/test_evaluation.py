"""Evaluation numbers on a tiny model equal a direct computation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from paser.data.pools import write_jsonl
from paser.data.suite import generate_suite, suite_pool
from paser.errors import DataError
from paser.evaluation import evaluate
from paser.evaluation.metrics import answer_found, normalise_answer, perplexity, response_nll


def test_normalise_answer_and_answer_found():
    assert normalise_answer("  Paris.\n") == normalise_answer('"paris"') == "paris"
    assert normalise_answer("[1, 2,\n 3]") == "[1,2,3]"
    assert answer_found("Vienna", "The capital of Austria is Vienna.")
    assert answer_found('{"name": "Ana", "age": 18}', '```json\n{\n  "name": "Ana",\n  "age": 18\n}\n```')
    assert not answer_found("15", "The answer is 155.") and not answer_found("far", "farther away")
    assert not answer_found("", "anything")


def test_perplexity_equals_a_direct_computation(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    text = " ".join(r["instruction"] + " " + r["output"] for r in generate_suite(60, seed=5))
    got = perplexity(model, tiny_tokenizer, text, window=16, batch_size=3)
    ids = tiny_tokenizer(text)["input_ids"]
    nlls = []
    with torch.no_grad():
        for w in range(len(ids) // 16):
            chunk = torch.tensor([ids[w * 16:(w + 1) * 16]])
            logp = torch.log_softmax(model(input_ids=chunk).logits[0, :-1], -1)
            nlls += [-float(logp[i, chunk[0, i + 1]]) for i in range(15)]
    assert got["windows"] == len(ids) // 16 and got["tokens"] == len(nlls)
    assert math.isclose(got["ppl"], math.exp(sum(nlls) / len(nlls)), rel_tol=1e-5)


def test_response_nll_equals_a_direct_computation(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from paser.data.prompts import tokenize_example

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    records = suite_pool(5, seed=6).records
    got = response_nll(model, tiny_tokenizer, records, batch_size=2)
    nlls = []
    with torch.no_grad():
        for r in records:
            ids, n_prompt, _, _ = tokenize_example(tiny_tokenizer, r)
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
            nlls += [-float(logp[i - 1, ids[i]]) for i in range(n_prompt, len(ids))]
    assert got["tokens"] == len(nlls)
    assert math.isclose(got["nll"], sum(nlls) / len(nlls), rel_tol=1e-5)
    assert sum(got["per_record"]["tokens"]) == len(nlls)
    assert math.isclose(sum(got["per_record"]["nll_sum"]), sum(nlls), rel_tol=1e-5)


def test_evaluate_writes_json_and_markdown(tiny_model_dir, tmp_path):
    text = tmp_path / "wiki.txt"
    text.write_text("\n\n".join(r["instruction"] for r in generate_suite(80, seed=8)))
    heldout = tmp_path / "heldout.jsonl"
    write_jsonl(heldout, generate_suite(12, seed=9))
    result = evaluate(str(tiny_model_dir), out=tmp_path / "eval", text=str(text), heldout=str(heldout),
                      suite_size=24, max_new_tokens=6, window=32, long_window=64)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(saved["perplexity"]) == {"llm-pruner (32-token windows)", "long (64-token windows)"}
    suite = saved["suite"]
    assert saved["response_nll"]["records"] == 12 and suite["generated"] == 24
    assert suite["accuracy_records"] == suite["records"]
    assert suite["removed_overlap"] > 0 and suite["records"] == 24 - suite["removed_overlap"]  # seed 0's prompts out
    assert set(suite["per_family"]) == set(suite["answer_nll"]["per_family"])
    assert 0 <= result["suite"]["accuracy"] <= 1
    table = (tmp_path / "eval" / "eval.md").read_text()
    assert "perplexity, llm-pruner (32-token windows)" in table and "accuracy (answer found), all" in table
    assert result["suite"]["exact_match"] <= result["suite"]["accuracy"]  # an exact match is also found


def test_held_out_suite_shares_no_prompt_with_the_pool(tmp_path):
    from paser.evaluation.suite import held_out_suite, pool_prompts

    kept, info = held_out_suite(720, 12345, ["embedded"])
    pool = {(r["instruction"], r["input"]) for r in generate_suite(1000, 0)}
    assert not {(r.instruction, r.input) for r in kept} & pool
    assert info["removed_overlap"] == 720 - len(kept) > 0 and info["generated"] == 720
    # a pool given as a file, and as a selection run folder, remove exactly their own prompts
    write_jsonl(tmp_path / "pool.jsonl", generate_suite(300, 0))
    from_file, info_file = held_out_suite(720, 12345, [str(tmp_path / "pool.jsonl")])
    assert info_file["removed_overlap"] == sum((r.instruction, r.input) in pool_prompts(str(tmp_path / "pool.jsonl"))
                                               for r in suite_pool(720, 12345).records)
    assert len(from_file) >= len(kept)
    assert held_out_suite(24, 12345, [])[1]["removed_overlap"] == 0


def test_answer_nll_equals_a_direct_computation(tiny_model_dir, tiny_tokenizer):
    import numpy as np
    from transformers import AutoModelForCausalLM

    from paser.data.prompts import tokenize_example
    from paser.evaluation.suite import answer_nll

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    records = suite_pool(30, seed=11).records
    got = answer_nll(model, tiny_tokenizer, records, batch_size=4)
    per_family = {}
    with torch.no_grad():
        for r in records:
            ids, n_prompt, _, _ = tokenize_example(tiny_tokenizer, r)
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            nll = np.mean([-float(logp[i - 1, ids[i]]) for i in range(n_prompt, len(ids))])
            per_family.setdefault(r.fields["family"], []).append(nll)
    assert got["per_family"].keys() == per_family.keys()
    for f, values in per_family.items():
        assert math.isclose(got["per_family"][f], np.mean(values), rel_tol=1e-5)
        assert got["records_per_family"][f] == len(values)
    assert math.isclose(got["macro"], np.mean([np.mean(v) for v in per_family.values()]), rel_tol=1e-5)
    assert got["per_record"]["id"] == [r.id for r in records] and len(got["per_record"]["nll"]) == len(records)


def test_suite_accuracy_on_a_few_records_per_family(tiny_model_dir):
    none = evaluate(str(tiny_model_dir), suite_size=24, suite_accuracy_per_family=0)
    assert "accuracy" not in none["suite"] and none["suite"]["answer_nll"]["macro"] > 0
    some = evaluate(str(tiny_model_dir), suite_size=48, suite_accuracy_per_family=1, max_new_tokens=2,
                    suite_exclude=[])["suite"]
    assert some["accuracy_records"] == len(some["per_family"]) == 12 < some["records"]


def test_gap_closed_against_reference_evaluations(tiny_model_dir, tmp_path):
    import pytest

    from paser.errors import DataError
    from paser.evaluation.suite import gap_recovered
    from tests.conftest import build_model

    other = tmp_path / "other"
    from transformers import AutoTokenizer

    build_model(AutoTokenizer.from_pretrained(tiny_model_dir), num_kv_heads=2, seed=3).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    kw = dict(suite_size=36, max_new_tokens=2)
    evaluate(str(tiny_model_dir), out=tmp_path / "dense", **kw)
    evaluate(str(other), out=tmp_path / "pruned", **kw)
    result = evaluate(str(other), out=tmp_path / "mid", reference_dense=str(tmp_path / "dense"),
                      reference_pruned=str(tmp_path / "pruned" / "eval.json"), **kw)
    dense, pruned = (json.loads((tmp_path / n / "eval.json").read_text())["suite"]["answer_nll"]
                     for n in ("dense", "pruned"))
    gap = result["suite"]["answer_nll_gap_closed"]
    for f, value in result["suite"]["answer_nll"]["per_family"].items():
        assert gap["per_family"][f] == gap_recovered(dense["per_family"][f], pruned["per_family"][f], value)
    assert gap["macro"] == 0.0  # the same model as the pruned reference closes nothing
    assert "answer-NLL gap closed, macro average | 0.0%" in (tmp_path / "mid" / "eval.md").read_text()
    with pytest.raises(DataError, match="evaluated on another suite"):
        evaluate(str(other), reference_dense=str(tmp_path / "dense"), reference_pruned=str(tmp_path / "pruned"),
                 suite_size=48, max_new_tokens=2)


def test_jsd_to_a_reference_model(tiny_pair, tmp_path):
    import numpy as np

    from paser.models.load import load_model
    from paser.selection.configs import ScoreConfig
    from paser.selection.passes import score_shard

    dense, pruned = tiny_pair
    heldout = tmp_path / "heldout.jsonl"
    write_jsonl(heldout, generate_suite(10, seed=9))
    kw = dict(heldout=str(heldout), suite_size=24, suite_accuracy_per_family=0, divergence_from=dense)
    same = evaluate(dense, **kw)["jsd_to_reference"]
    assert same["heldout"]["mean"] < 1e-6 and same["suite"]["mean"] < 1e-6
    result = evaluate(pruned, out=tmp_path / "e", **kw)["jsd_to_reference"]
    suite = result["suite"]
    assert result["reference"] == dense and suite["records"] == len(suite["per_record"]["jsd"])
    assert set(suite["per_family"]) and suite["macro"] == np.mean(list(suite["per_family"].values()))
    # the same values as degradation scoring of the pair
    from paser.data.pools import load_pool

    d, p = load_model(dense), load_model(pruned)
    direct = score_shard(d.model, p.model, d.tokenizer, load_pool(str(heldout)).records, ScoreConfig())["jsd"]
    np.testing.assert_allclose(result["heldout"]["per_record"]["jsd"], direct, rtol=1e-5, atol=1e-7)
    assert "mean token JSD to" in (tmp_path / "e" / "eval.md").read_text()


def test_jsd_and_nll_come_from_one_pass(tiny_pair, tmp_path, monkeypatch):
    """With a reference model the NLLs come from the JSD pass (the evaluated model runs once over
    each record set) and equal those of the NLL pass without one."""
    import numpy as np

    import paser.evaluation.metrics as ev

    dense, pruned = tiny_pair
    heldout = tmp_path / "heldout.jsonl"
    write_jsonl(heldout, generate_suite(10, seed=9))
    kw = dict(heldout=str(heldout), suite_size=24, suite_accuracy_per_family=0, batch_size=3)
    alone = evaluate(pruned, **kw)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the NLL pass ran beside the JSD pass")

    monkeypatch.setattr(ev, "response_token_nll", no_second_pass)
    both = evaluate(pruned, divergence_from=dense, **kw)
    for key in ("nll_sum", "tokens"):
        np.testing.assert_allclose(both["response_nll"]["per_record"][key], alone["response_nll"]["per_record"][key],
                                   rtol=1e-5)
    assert both["response_nll"]["nll"] == pytest.approx(alone["response_nll"]["nll"], rel=1e-6)
    got, want = both["suite"]["answer_nll"], alone["suite"]["answer_nll"]
    assert got["records_per_family"] == want["records_per_family"] and "jsd" not in both["suite"]
    np.testing.assert_allclose(list(got["per_family"].values()), list(want["per_family"].values()), rtol=1e-5)
    assert both["jsd_to_reference"]["suite"]["records"] == both["suite"]["records"]


def test_evaluation_refuses_a_record_without_response_tokens(tiny_pair, tmp_path):
    dense, pruned = tiny_pair
    heldout = tmp_path / "heldout.jsonl"
    write_jsonl(heldout, [{"instruction": "word " * 40, "input": "", "output": "yes"}])
    for reference in (None, dense):
        with pytest.raises(DataError, match="no response token is left"):
            evaluate(pruned, heldout=str(heldout), suite_size=0, prompt={"cutoff": 8}, divergence_from=reference)
