"""Evaluation numbers on a tiny model equal a direct computation."""

from __future__ import annotations

import json
import math

import torch

from paser.data import write_jsonl
from paser.evaluation import answer_found, evaluate, normalise_answer, perplexity, response_nll
from paser.suite import generate_suite, suite_pool


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

    from paser.prompts import tokenize_example

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


def test_evaluate_writes_json_and_markdown(tiny_model_dir, tmp_path):
    text = tmp_path / "wiki.txt"
    text.write_text("\n\n".join(r["instruction"] for r in generate_suite(80, seed=8)))
    heldout = tmp_path / "heldout.jsonl"
    write_jsonl(heldout, generate_suite(12, seed=9))
    result = evaluate(str(tiny_model_dir), out=tmp_path / "eval", text=str(text), heldout=str(heldout),
                      suite_size=24, max_new_tokens=6, window=32, long_window=64)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(saved["perplexity"]) == {"llm-pruner (32-token windows)", "long (64-token windows)"}
    assert saved["response_nll"]["records"] == 12 and saved["suite"]["records"] == 24
    assert set(saved["suite"]["per_family"]) == {r["family"] for r in generate_suite(24)}
    assert 0 <= result["suite"]["accuracy"] <= 1
    table = (tmp_path / "eval" / "eval.md").read_text()
    assert "perplexity, llm-pruner (32-token windows)" in table and "accuracy (answer found), all" in table
    assert result["suite"]["exact_match"] <= result["suite"]["accuracy"]  # an exact match is also found
