"""The compute ledger: its counting rule, parameter counts of real (tiny) models, and what a
selection run reports."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from paser.ledger import Ledger, flop_params, forward_flops, human, training_flops


def test_the_counting_rule():
    params = {"body": 1000, "head": 300, "lora": 10}
    assert forward_flops(1000, 300, tokens=50, positions=20) == 2 * 1000 * 50 + 2 * 300 * 20
    assert training_flops(params, 50, 20) == 2 * forward_flops(1000, 300, 50, 20) + 6 * 10 * 50
    assert training_flops(params, 50, 20, checkpointing=True) == 3 * forward_flops(1000, 300, 50, 20) + 6 * 10 * 50
    ledger = Ledger().forward("score", "a", params, 50, 20).forward("score", "b", params, 50, 20, reused=True)
    one = forward_flops(1000, 300, 50, 20) + 2 * 10 * 50  # the adapters run beside the weights
    assert ledger.total == 2 * one and ledger.spent == one
    assert Ledger.from_dict(ledger.to_dict()).total == ledger.total
    assert human(2.5e12) == "2.5 TFLOP" and "score" in ledger.line()


def test_parameter_counts_of_a_model_and_its_adapters(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    from tests.conftest import build_model

    tiny_model = build_model(tiny_tokenizer, num_kv_heads=2)
    counts = flop_params(tiny_model)
    embed = tiny_model.get_input_embeddings().weight.numel()
    decoder = sum(p.numel() for p in tiny_model.get_decoder().parameters())
    assert counts["body"] == decoder - embed and counts["lora"] == 0
    assert counts["head"] == tiny_model.get_output_embeddings().weight.numel()
    wrapped = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with_lora = flop_params(wrapped)
    assert with_lora["body"] == counts["body"] and with_lora["lora"] == sum(
        p.numel() for n, p in wrapped.named_parameters() if "lora_" in n) > 0


@pytest.fixture(scope="module")
def models(tiny_pair):
    return tiny_pair


def test_a_selection_reports_what_it_computed(models, tmp_path):
    from paser.selection.pipeline import run_selection
    from paser.selection.settings import Settings

    dense, pruned = models
    settings = Settings.load(None, {"select": {"dense": dense, "pruned": pruned, "suite_size": 60, "budget": 0.25,
                                               "out": str(tmp_path / "run"), "progress": False},
                                    "score": {"batch_size": 8}, "cluster": {"k_max": 6}})
    run = run_selection(settings)
    compute = json.loads((run / "manifest.json").read_text())["compute"]
    scores = pd.read_parquet(run / "degradation.parquet")
    tokens = int((scores["n_prompt"] + scores["n_response"]).sum())
    lines = {(e["stage"], e["model"]): e for e in compute["entries"]}
    assert {stage for stage, _ in lines} == {"embed", "score"}
    models_json = json.loads((run / "models.json").read_text())
    for which in ("dense", "pruned"):
        entry = lines[("score", models_json[which]["reference"])]
        params = models_json[which]["flop_params"]
        assert entry["tokens"] == tokens and entry["positions"] == int(scores["n_scored"].sum())
        assert entry["flops"] == forward_flops(params["body"], params["head"], tokens, entry["positions"])
    assert compute["flops_spent"] == compute["flops_total"] > 0
    assert "## Compute" in (run / "report.md").read_text()
    run_selection(settings)  # everything reused: the selection still costs the same, nothing is computed now
    again = json.loads((run / "manifest.json").read_text())["compute"]
    assert again["flops_total"] == pytest.approx(compute["flops_total"]) and again["flops_spent"] == 0


def test_random_selection_computes_nothing(models, tmp_path):
    from paser.selection.pipeline import run_selection
    from paser.selection.settings import Settings

    dense, _ = models
    run = run_selection(Settings.load(None, {"select": {"dense": dense, "suite_size": 40, "budget": 0.25,
                                                        "method": "random", "out": str(tmp_path / "r"),
                                                        "progress": False}}))
    assert json.loads((run / "manifest.json").read_text())["compute"]["flops_total"] == 0
