"""Distillation recovery on a tiny dense/pruned pair: the loss against a direct computation, the
top-k cache against the teacher in memory, gradient accumulation, resuming, and the teacher's
default and refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from paser.data.pools import write_jsonl
from paser.data.prompts import PromptFormat
from paser.data.suite import generate_suite, suite_pool
from paser.errors import ConfigError, TokenizerMismatchError
from paser.recovery import recover
from paser.recovery.config import LossSettings
from paser.recovery.distill import in_memory_targets
from paser.recovery.losses import IGNORE, collate, encode_for_training, objective_loss_sum
from tests.conftest import build_model, build_tokenizer

FAST = dict(batch_size=8, micro_batch_size=4, learning_rate=5e-3, val_size=0, save_every=2, progress=False)


@pytest.fixture()
def train_file(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, generate_suite(24, seed=7))
    return str(path)


def _models(tiny_pair):
    from paser.models.load import load_model

    dense, pruned = tiny_pair
    return load_model(dense).model, load_model(pruned).model


@pytest.mark.parametrize("kind,temperature", [("kl", 1.0), ("kl", 2.0), ("jsd", 1.0)])
def test_distillation_loss_equals_a_direct_computation(tiny_pair, tiny_tokenizer, kind, temperature):
    teacher, student = _models(tiny_pair)
    examples = encode_for_training(tiny_tokenizer, suite_pool(6, seed=3).records, PromptFormat())
    batch = collate(examples, tiny_tokenizer.pad_token_id, "cpu")
    config = LossSettings(objective="distill", divergence=kind, temperature=temperature)
    loss, nll, div = objective_loss_sum(student, batch, config, in_memory_targets(teacher, batch, temperature))

    expected = expected_nll = 0.0
    with torch.no_grad():
        for e in examples:  # one record at a time, no padding, full logits, float64
            ids = torch.tensor([e.ids])
            zt, zs = teacher(input_ids=ids).logits[0].double(), student(input_ids=ids).logits[0].double()
            for t in range(1, len(e.ids)):
                if e.labels[t] == IGNORE:
                    continue
                p = torch.softmax(zt[t - 1] / temperature, -1)
                q = torch.softmax(zs[t - 1] / temperature, -1)
                if kind == "kl":
                    value = (p * (p.log() - q.log())).sum()
                else:
                    m = (p + q) / 2
                    value = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
                expected += float(value) * temperature ** 2
                expected_nll -= float(torch.log_softmax(zs[t - 1], -1)[e.labels[t]])
    assert div == pytest.approx(expected, rel=1e-4)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)
    assert nll == pytest.approx(expected_nll, rel=1e-5)
    mix = LossSettings(objective="mix", divergence=kind, temperature=temperature, mix_weight=0.3)
    mixed, _, _ = objective_loss_sum(student, batch, mix, in_memory_targets(teacher, batch, temperature))
    assert float(mixed.detach()) == pytest.approx(0.3 * expected_nll + 0.7 * expected, rel=1e-4)


def test_accumulated_micro_batches_give_the_full_batch_gradient(tiny_pair, tiny_tokenizer):
    teacher, student = _models(tiny_pair)
    examples = encode_for_training(tiny_tokenizer, suite_pool(8, seed=4).records, PromptFormat())
    config = LossSettings(objective="mix", mix_weight=0.25)
    n = sum(sum(1 for t in e.labels[1:] if t != IGNORE) for e in examples)

    def grads(chunks):
        student.zero_grad()
        for chunk in chunks:
            batch = collate(chunk, tiny_tokenizer.pad_token_id, "cpu")
            loss, _, _ = objective_loss_sum(student, batch, config, in_memory_targets(teacher, batch))
            (loss / n).backward()
        return torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])

    torch.testing.assert_close(grads([examples]), grads([examples[:3], examples[3:]]), atol=1e-6, rtol=1e-4)


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter" / "adapter_model.safetensors")


def test_top_k_cache_of_the_whole_vocabulary_equals_the_teacher_in_memory(tiny_pair, train_file, tmp_path):
    dense, pruned = tiny_pair
    run = dict(FAST, objective="distill", teacher=dense, max_steps=4)
    recover(pruned, train_file, tmp_path / "memory", **run)
    cached = recover(pruned, train_file, tmp_path / "cache", teacher_top_k=10_000, **run)
    logs = [[json.loads(line) for line in (tmp_path / f / "train_log.jsonl").read_text().splitlines()]
            for f in ("memory", "cache")]
    for x, y in zip(*logs):
        # the cache's teacher passes pad records to other widths than training's length-sorted
        # micro-batches, so its logits differ in the float order: 1e-4 of a divergence near 1e-3
        assert x["divergence"] == pytest.approx(y["divergence"], rel=1e-4)
    a, b = _adapter(tmp_path / "memory"), _adapter(tmp_path / "cache")
    assert a.keys() == b.keys()
    for key in a:  # Adam's normalisation magnifies float-rounding differences of near-zero gradients
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)
    summary = json.loads((cached.out / "recovery.json").read_text())
    assert summary["objective"]["teacher_targets"] == "top-10000 cache on disk"
    assert len(list((cached.out / "teacher_topk").glob("part-*.pt"))) == 1

    # fewer tokens than the vocabulary: the first step (same start) sees a lower bound of the divergence
    recover(pruned, train_file, tmp_path / "top8", teacher_top_k=8, **run)
    first = [json.loads((tmp_path / f / "train_log.jsonl").read_text().splitlines()[0]) for f in ("memory", "top8")]
    assert 0 < first[1]["divergence"] <= first[0]["divergence"]
    assert first[1]["nll"] == pytest.approx(first[0]["nll"], rel=1e-6)


def test_distillation_reduces_the_divergence_and_the_sft_path_is_unchanged(tiny_pair, train_file, tmp_path):
    dense, pruned = tiny_pair
    result = recover(pruned, train_file, tmp_path / "kd", **FAST, objective="distill", teacher=dense, epochs=4)
    log = [json.loads(line) for line in (result.out / "train_log.jsonl").read_text().splitlines()]
    assert all(e["loss"] == pytest.approx(e["divergence"]) for e in log)
    assert sum(e["divergence"] for e in log[-2:]) < sum(e["divergence"] for e in log[:2])
    # an sft run ignores the distillation settings, and logs no divergence
    a = recover(pruned, train_file, tmp_path / "sft", **FAST, max_steps=2)
    b = recover(pruned, train_file, tmp_path / "sft2", **FAST, max_steps=2, teacher=dense, temperature=3.0)
    assert "divergence" not in (a.out / "train_log.jsonl").read_text()
    assert all(torch.equal(x, y) for x, y in zip(_adapter(a.out).values(), _adapter(b.out).values()))


def test_killed_distillation_run_resumes_to_the_same_adapter(tiny_pair, train_file, tmp_path, monkeypatch):
    import paser.recovery.job as rec

    dense, pruned = tiny_pair
    run = dict(FAST, objective="mix", teacher=dense, teacher_top_k=16, max_steps=5)
    recover(pruned, train_file, tmp_path / "whole", **run)
    calls = {"n": 0}
    original = rec.objective_loss_sum

    def dies_in_step_4(model, batch, config, targets=None):
        calls["n"] += 1
        if calls["n"] > 6:  # two micro-batches per step: step 4 never finishes
            raise KeyboardInterrupt
        return original(model, batch, config, targets)

    monkeypatch.setattr(rec, "objective_loss_sum", dies_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        recover(pruned, train_file, tmp_path / "killed", **run)
    monkeypatch.setattr(rec, "objective_loss_sum", original)
    parts = sorted((tmp_path / "killed" / "teacher_topk").glob("part-*.pt"))
    stamp = [p.stat().st_mtime_ns for p in parts]
    result = recover(pruned, train_file, tmp_path / "killed", **run)
    assert result.resumed_from == 2 and [p.stat().st_mtime_ns for p in parts] == stamp  # the cache was reused
    a, b = _adapter(tmp_path / "whole"), _adapter(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finished run again: neither the teacher nor a Trainer runs, the adapter stays
    def never(*args, **kwargs):
        raise AssertionError("a finished run loaded the teacher or built a Trainer")

    monkeypatch.setattr(rec, "load_teacher", never)
    monkeypatch.setattr(rec, "RecoveryTrainer", never)
    again = recover(pruned, train_file, tmp_path / "whole", **run)
    assert again.steps == 5 and all(torch.equal(a[k], _adapter(tmp_path / "whole")[k]) for k in a)
    assert json.loads((tmp_path / "whole" / "recovery.json").read_text())["objective"]["teacher_targets"] \
        .startswith("top-16")


def test_the_teacher_defaults_to_the_dense_model_of_the_selection_run(tiny_pair, tmp_path):
    dense, pruned = tiny_pair
    run = tmp_path / "select"
    run.mkdir()
    write_jsonl(run / "selected.jsonl", generate_suite(12, seed=3))
    (run / "models.json").write_text(json.dumps({"dense": {"reference": dense}, "pruned": {"reference": pruned}}))
    result = recover(pruned, str(run / "selected.jsonl"), tmp_path / "rec", **FAST, objective="distill", max_steps=1)
    assert json.loads((result.out / "recovery.json").read_text())["objective"]["teacher"] == dense

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(run / "selected.jsonl", alone / "train.jsonl")
    with pytest.raises(ConfigError, match="--teacher"):
        recover(pruned, str(alone / "train.jsonl"), tmp_path / "rec2", **FAST, objective="distill", max_steps=1)


def test_a_teacher_of_another_vocabulary_is_refused(tiny_pair, train_file, tmp_path, tiny_tokenizer):
    _, pruned = tiny_pair
    other = build_tokenizer(vocab_size=300)
    build_model(other).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(TokenizerMismatchError):
        recover(pruned, train_file, tmp_path / "rec", **FAST, objective="distill", teacher=str(tmp_path / "other"))

    # the same tokenizer but a wider output layer: the distributions range over other ids
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaConfig(vocab_size=len(tiny_tokenizer) + 8, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4)
    LlamaForCausalLM(wide).save_pretrained(tmp_path / "wide")
    tiny_tokenizer.save_pretrained(tmp_path / "wide")
    with pytest.raises(ConfigError, match="same vocabulary"):
        recover(pruned, train_file, tmp_path / "rec", **FAST, objective="distill", teacher=str(tmp_path / "wide"))


def test_bad_distillation_settings_are_refused():
    for bad in ({"objective": "dpo"}, {"divergence": "rkl"}, {"temperature": 0}, {"mix_weight": 1.5},
                {"teacher_top_k": 0}):
        with pytest.raises(ValueError):
            LossSettings(**bad)
