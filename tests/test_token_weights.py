"""Token-weighted recovery: the weighted loss's gradient, weights that average one over each step
whatever the micro-batches, the signal cache, and a run on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from paser.data.prompts import PromptFormat
from paser.data.suite import suite_pool
from paser.recovery import RecoverConfig, recover
from paser.recovery.losses import IGNORE, collate, encode_for_training, objective_loss_sum
from paser.recovery.token_weights import SignalCache, step_weights
from tests.conftest import FAST


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_weights_of_zero_on_all_tokens_but_one_give_that_tokens_gradient_alone(tiny_tokenizer):
    from tests.conftest import build_model

    model = build_model(tiny_tokenizer, num_kv_heads=2)
    config = RecoverConfig()
    batch = collate(encode_for_training(tiny_tokenizer, suite_pool(3, seed=4).records, config.prompt),
                    tiny_tokenizer.pad_token_id, "cpu")
    labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    one = 5
    weights = torch.zeros(labelled)
    weights[one] = 1.0
    loss, nll, _ = objective_loss_sum(model, batch | {"weights": weights}, config.loss)
    loss.backward()
    weighted = _grads(model)
    model.zero_grad()
    # that token's NLL alone, computed from the full logits
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    token_nll = torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="none")
    token_nll[one].backward()
    torch.testing.assert_close(weighted, _grads(model), atol=1e-6, rtol=1e-5)
    assert nll == pytest.approx(float(token_nll.sum()), rel=1e-5)  # the unweighted NLL is logged beside


def test_weights_average_one_over_each_step_whatever_the_micro_batches():
    signal = [np.array([0.0, 2.0, 1.0]), np.array([3.0]), np.array([0.0, 0.0]), np.array([1.0, 1.0])]
    # one step of records 0..3 in one micro-batch, or in three; a second step of record 3 alone
    whole = step_weights(signal, [[0, 1, 2], [3]], 1, 0.5)
    cut = step_weights(signal, [[0], [1, 2], [], [3], [], []], 3, 0.5)
    assert whole[0].mean() == pytest.approx(1.0)
    assert np.allclose(whole[0], np.concatenate([cut[0], cut[1]]))
    assert cut[2] is None and np.allclose(whole[1], cut[3]) and np.allclose(whole[1], 1.0)
    # lambda 1: in proportion to the signal (mean 1); lambda 0: plain SFT
    full = step_weights(signal, [[0, 1, 2]], 1, 1.0)[0]
    assert np.allclose(full, np.array([0.0, 2.0, 1.0, 3.0, 0.0, 0.0]) / 1.0)
    assert np.allclose(step_weights(signal, [[0, 1, 2]], 1, 0.0)[0], 1.0)


def test_the_signal_cache_reads_finished_parts_back_without_a_model(tiny_tokenizer, tmp_path):
    from paser.recovery.losses import labelled_logits
    from tests.conftest import build_model

    dense, pruned = build_model(tiny_tokenizer, seed=0), build_model(tiny_tokenizer, seed=1)
    examples = encode_for_training(tiny_tokenizer, suite_pool(7, seed=5).records, PromptFormat())
    cache = SignalCache(tmp_path, "fp")
    pad = tiny_tokenizer.pad_token_id
    first = cache.build(dense, pruned, examples, collate, pad, "cpu", "excess", 3, labelled_logits)
    again = cache.build(None, None, examples, collate, pad, "cpu", "excess", 3, labelled_logits)
    assert [len(v) for v in first] == [sum(1 for t in e.labels[1:] if t != IGNORE) for e in examples]
    assert all(np.array_equal(a, b) for a, b in zip(first, again)) and all((v >= 0).all() for v in first)
    jsd = SignalCache(tmp_path, "jsd").build(dense, pruned, examples, collate, tiny_tokenizer.pad_token_id, "cpu",
                                             "jsd", 3, labelled_logits)
    assert all(((v >= 0) & (v <= np.log(2) + 1e-6)).all() for v in jsd)


def test_a_token_weighted_recovery_records_its_signal_and_compute(tiny_pair, train_file, tmp_path):  # noqa: F811
    dense, pruned = tiny_pair
    run = dict(FAST, max_steps=3, val_size=0, teacher=dense)
    plain = recover(pruned, train_file, tmp_path / "plain", **run)
    weighted = recover(pruned, train_file, tmp_path / "weighted", token_weighting=0.5, **run)
    done = json.loads((tmp_path / "weighted" / "recovery.json").read_text())
    assert done["token_weighting"] == {"strength": 0.5, "signal": "excess", "reference": dense}
    stages = [e["stage"] for e in done["compute"]["entries"]]
    assert stages.count("token signal") == 2 and "recovery" in stages
    log = [json.loads(line) for line in (tmp_path / "weighted" / "train_log.jsonl").read_text().splitlines()]
    assert all("nll" in e for e in log) and log[0]["loss"] != pytest.approx(log[0]["nll"])
    assert plain.steps == weighted.steps
    training = [e for e in done["compute"]["entries"] if e["stage"] == "recovery"][0]
    assert training["flops"] > 0 and weighted.ledger.total == pytest.approx(done["compute"]["flops_total"])
    assert any((tmp_path / "weighted" / "token_signal").rglob("part-00000.npz"))
