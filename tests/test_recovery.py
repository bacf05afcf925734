"""LoRA recovery on tiny models: the loss mask, gradient accumulation, training progress,
adapter and merged-model round trips, and resuming a killed run."""

from __future__ import annotations

import json

import pytest
import torch

from paser.config import config_with
from paser.data.prompts import PromptFormat
from paser.data.suite import suite_pool
from paser.recovery import RecoverConfig, recover
from paser.recovery.losses import IGNORE, collate, encode_for_training
from tests.conftest import FAST


def test_loss_mask_covers_exactly_the_response(tiny_tokenizer):
    from paser.data.prompts import format_prompt

    records = suite_pool(6, seed=2).records
    for record, ex in zip(records, encode_for_training(tiny_tokenizer, records, PromptFormat())):
        prompt = tiny_tokenizer(format_prompt(record), add_special_tokens=True)["input_ids"]
        response = tiny_tokenizer(record.response, add_special_tokens=False)["input_ids"]
        response = response + [tiny_tokenizer.eos_token_id]
        assert ex.ids == prompt + response
        assert ex.labels == [IGNORE] * len(prompt) + response
    batch = collate(encode_for_training(tiny_tokenizer, records, PromptFormat()), tiny_tokenizer.pad_token_id, "cpu")
    padded = batch["attention_mask"] == 0
    assert (batch["labels"][padded] == IGNORE).all() and padded.any()


def test_accumulated_micro_batches_give_the_full_batch_step(tiny_model_dir, train_file, tmp_path):
    """recover() itself: an effective batch of 8 in one forward pass or in micro-batches of 2 and
    4 ends with the same adapter (dropout off, whose masks depend on the micro-batch shapes;
    clipping off, which rescales every gradient by a norm summed in another float order, and Adam
    magnifies that rounding on near-zero gradients: tests/test_trainer.py checks it on with a
    tolerance of that size). Records are sorted by length inside a step, so each micro-batch size
    sums in its own float order: 3e-5 is 0.6% of one step's update at this learning rate, while
    weighting micro-batches wrongly (a mean per micro-batch, not per token) turns the gradient."""
    from safetensors.torch import load_file

    run = dict(FAST, dropout=0.0, max_steps=3, val_size=0, max_grad_norm=0.0)
    adapters = []
    for micro in (8, 4, 2):
        out = tmp_path / f"micro{micro}"
        recover(str(tiny_model_dir), train_file, out, **(run | {"micro_batch_size": micro}))
        adapters.append(load_file(out / "adapter" / "adapter_model.safetensors"))
    for other in adapters[1:]:
        assert other.keys() == adapters[0].keys()
        for key in other:
            torch.testing.assert_close(other[key], adapters[0][key], atol=3e-5, rtol=1e-4)


def test_a_few_steps_reduce_the_loss_and_the_adapter_round_trips(tiny_model_dir, train_file, tmp_path):
    from peft import PeftModel

    from paser.models.load import load_model

    out = tmp_path / "rec"
    result = recover(str(tiny_model_dir), train_file, out, epochs=3, merge=True, **FAST | {"pictures": True})
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert result.steps == len(log) == 15  # 40 training records -> 5 steps per epoch
    assert sum(e["loss"] for e in log[-3:]) < sum(e["loss"] for e in log[:3])
    val = [e["val_loss"] for e in log if "val_loss" in e]
    assert len(val) == 8 and val[-1] < val[0]
    assert (out / "training_curve.png").is_file() and json.loads((out / "recovery.json").read_text())["steps"] == 15

    ids = torch.tensor([[5, 17, 42, 99, 3, 7]])
    adapted = PeftModel.from_pretrained(load_model(str(tiny_model_dir)).model, out / "adapter").eval()
    merged = load_model(str(out / "merged")).model
    base = load_model(str(tiny_model_dir)).model
    with torch.no_grad():
        a, m, b = (net(input_ids=ids).logits for net in (adapted, merged, base))
    torch.testing.assert_close(a, m, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a, b, atol=1e-4)  # the adapter changed the model

    # the trained-token count: labelled response tokens of the training records, one epoch
    from paser.data.pools import load_pool
    from paser.recovery.plan import split_validation

    config = config_with(RecoverConfig(), FAST)
    train, _ = split_validation(load_pool(train_file).records, config.data)
    examples = encode_for_training(load_model(str(tiny_model_dir)).tokenizer, train, config.prompt)
    expected = sum(sum(1 for t in e.labels[1:] if t != IGNORE) for e in examples)
    assert result.train_tokens == expected == json.loads((out / "recovery.json").read_text())["train_tokens"] > 0


def test_merged_pruned_model_keeps_its_layer_widths(tiny_model_dir, train_file, tmp_path):
    from paser.models.config import PruneConfig
    from paser.models.layers import layer_shapes
    from paser.models.load import load_model
    from paser.models.pruning import prune

    prune(str(tiny_model_dir), tmp_path / "pruned", PruneConfig(importance="l2", attn_layers=(1, 3)))
    recover(str(tmp_path / "pruned"), train_file, tmp_path / "rec", max_steps=2, merge=True, **FAST)
    merged = load_model(str(tmp_path / "rec" / "merged"))
    assert merged.kind == "paser-pruned"
    assert layer_shapes(merged.model) == layer_shapes(load_model(str(tmp_path / "pruned")).model)


def test_killed_run_resumes_to_the_same_adapter(tiny_model_dir, train_file, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import paser.recovery.losses as rec

    recover(str(tiny_model_dir), train_file, tmp_path / "whole", max_steps=6, **FAST)
    assert not (tmp_path / "whole" / "training_curve.png").exists()  # pictures off
    calls = {"n": 0}
    original = rec.token_loss_sum

    def dies_in_step_5(model, batch):
        if model.training:
            calls["n"] += 1
            if calls["n"] > 8:  # two micro-batches per step: step 5 never finishes
                raise KeyboardInterrupt
        return original(model, batch)

    monkeypatch.setattr(rec, "token_loss_sum", dies_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        recover(str(tiny_model_dir), train_file, tmp_path / "killed", max_steps=6, **FAST)
    monkeypatch.setattr(rec, "token_loss_sum", original)
    result = recover(str(tiny_model_dir), train_file, tmp_path / "killed", max_steps=6, **FAST)
    assert result.resumed_from == 4
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_from_other_settings_is_refused(tiny_model_dir, train_file, tmp_path):
    from paser.errors import ConfigError

    recover(str(tiny_model_dir), train_file, tmp_path / "rec", max_steps=3, **FAST)
    with pytest.raises(ConfigError, match="other settings"):
        recover(str(tiny_model_dir), train_file, tmp_path / "rec", max_steps=3, **(FAST | {"learning_rate": 1e-3}))
    assert recover(str(tiny_model_dir), train_file, tmp_path / "rec", max_steps=3, restart=True,
                   **(FAST | {"learning_rate": 1e-3})).resumed_from == 0


@pytest.mark.parametrize("seed", range(8))
def test_token_steps_equal_for_subsets_of_equal_tokens(seed):
    import random

    from paser.recovery.plan import token_steps

    rng = random.Random(seed)
    # two subsets with the same tokens: one of few long records, one of many short ones
    a = [rng.randint(60, 120) for _ in range(40)]
    b, left = [], sum(a)
    while left > 0:
        b.append(min(left, rng.randint(8, 40)))
        left -= b[-1]
    assert sum(a) == sum(b)
    sa = token_steps(list(range(len(a))), a, 512)
    sb = token_steps(list(range(len(b))), b, 512)
    assert len(sa) == len(sb) == round(sum(a) / 512)
    for steps, lengths in ((sa, a), (sb, b)):
        assert sorted(i for s in steps for i in s) == list(range(len(lengths)))  # each record once, in order
        assert [i for s in steps for i in s] == list(range(len(lengths)))
        width = sum(lengths) / len(steps)
        assert all(abs(sum(lengths[i] for i in s) - width) <= max(lengths) for s in steps)


def test_token_steps_never_leave_a_step_empty():
    from paser.recovery.plan import token_steps

    # a record longer than the asked step: fewer, larger steps instead of empty ones
    steps = token_steps([0, 1, 2, 3], [250, 10, 10, 250], 100)
    assert all(steps) and len(steps) == 2


def test_recovery_with_token_batches(tiny_model_dir, train_file, tmp_path):
    from paser.data.pools import load_pool
    from paser.models.load import load_model
    from paser.recovery.plan import split_validation, step_batches

    out = tmp_path / "rec"
    result = recover(str(tiny_model_dir), train_file, out, epochs=1, **(FAST | {"batch_tokens": 600}))
    done = json.loads((out / "recovery.json").read_text())
    config = config_with(RecoverConfig(), FAST | {"batch_tokens": 600, "epochs": 1})
    train, _ = split_validation(load_pool(train_file).records, config.data)
    examples = encode_for_training(load_model(str(tiny_model_dir)).tokenizer, train, config.prompt)
    lengths = [len(e.ids) for e in examples]
    planned = step_batches(len(train), config.steps, lengths)
    assert result.steps == done["steps"] == round(sum(lengths) / 600) == len(planned)
    assert done["batch_unit"] == "tokens"
    assert done["tokens_per_step"]["mean"] == pytest.approx(sum(lengths) / result.steps, abs=0.1)
    assert done["tokens_per_step"]["max"] - done["tokens_per_step"]["min"] <= 2 * max(lengths)


def test_recovery_seed_changes_training_noise_only(tiny_model_dir, train_file, tmp_path):
    from safetensors.torch import load_file

    def adapter(name, seed):
        result = recover(str(tiny_model_dir), train_file, tmp_path / name, max_steps=3, seed=seed, **FAST)
        done = json.loads((tmp_path / name / "recovery.json").read_text())
        return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors"), done, result

    a, done_a, _ = adapter("a", 0)
    b, _, _ = adapter("b", 0)
    c, done_c, _ = adapter("c", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same adapter
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another seed, another adapter
    # ... trained on the same records: the validation split has its own seed
    assert done_a["train_records"] == done_c["train_records"] and done_a["fingerprint"] != done_c["fingerprint"]
    assert done_a["train_tokens"] == done_c["train_tokens"]


def test_early_stopping_keeps_the_best_adapter_and_stays_stopped(tiny_model_dir, train_file, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from paser.data.pools import load_pool
    from paser.errors import ConfigError
    from paser.evaluation.metrics import response_nll
    from paser.recovery.plan import split_validation

    # a learning rate too high for the tiny model: the validation loss soon stops improving
    settings = FAST | {"learning_rate": 0.2, "eval_every": 1, "patience": 2, "epochs": 20}
    result = recover(str(tiny_model_dir), train_file, tmp_path / "rec", **settings)
    done = json.loads((tmp_path / "rec" / "recovery.json").read_text())
    log = [json.loads(line) for line in (tmp_path / "rec" / "train_log.jsonl").read_text().splitlines()]
    assert done["stopped_early"] and result.steps == len(log) < done["planned_steps"]
    val = [e["val_loss"] for e in log]
    best = min(range(len(val)), key=val.__getitem__)
    assert done["best_step"] == best + 1 and len(val) - 1 - best == 2  # two evaluations without improvement
    # the saved adapter is the best one: its validation loss is the best logged
    from peft import PeftModel

    from paser.models.load import load_model

    loaded = load_model(str(tiny_model_dir))
    adapted = PeftModel.from_pretrained(loaded.model, tmp_path / "rec" / "adapter").eval()
    _, held = split_validation(load_pool(train_file).records, config_with(RecoverConfig(), settings).data)
    assert response_nll(adapted, loaded.tokenizer, held, batch_size=4)["nll"] == pytest.approx(val[best], rel=1e-5)
    assert result.val_loss == pytest.approx(val[best])
    # the same command again trains nothing more (no Trainer is even built) and keeps the same adapter
    import paser.recovery.job as rec

    def no_trainer(*args, **kwargs):
        raise AssertionError("a finished run built a Trainer")

    monkeypatch.setattr(rec, "RecoveryTrainer", no_trainer)
    before = load_file(tmp_path / "rec" / "adapter" / "adapter_model.safetensors")
    again = recover(str(tiny_model_dir), train_file, tmp_path / "rec", **settings)
    after = load_file(tmp_path / "rec" / "adapter" / "adapter_model.safetensors")
    assert again.steps == result.steps and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ConfigError, match="give a validation set"):
        recover(str(tiny_model_dir), train_file, tmp_path / "noval", **(settings | {"val_size": 0}))


def test_the_trained_model_is_freed_when_recover_returns(tiny_model_dir, train_file, tmp_path, monkeypatch):
    """The Trainer and its step callback hold each other, so without an explicit collection the
    student (and on a GPU its memory) outlives recover() until some later garbage collection;
    paser run evaluates next in the same process."""
    import gc
    import weakref

    import paser.recovery.job as rec

    made = []
    original = rec.lora_model

    def watched(model, config):
        wrapped = original(model, config)
        made.append(weakref.ref(wrapped))
        return wrapped

    monkeypatch.setattr(rec, "lora_model", watched)
    gc.disable()  # the check is that recover() frees it, not that a collection happened to run meanwhile
    try:
        recover(str(tiny_model_dir), train_file, tmp_path / "run", **dict(FAST, max_steps=2, val_size=0))
        assert made and made[0]() is None
    finally:
        gc.enable()
