"""paser prune on tiny MHA and GQA Llamas: validity, widths, round trips, importance."""

from __future__ import annotations

import copy

import pytest
import torch

from paser.models.config import PruneConfig
from paser.models.layers import layer_shapes, load_pruned_folder, save_pruned_folder
from paser.models.load import load_model
from paser.models.pruning import (
    accumulate_gradients,
    apply_plan,
    calibration_batches,
    calibration_texts,
    default_layer_range,
    group_scores,
    plan_layer,
    prune,
    prune_model,
)


def _loss(model, batch) -> float:
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(**batch, labels=labels).loss.item()


def _all_layers(**kw) -> PruneConfig:
    return PruneConfig(attn_layers=(0, 4), mlp_layers=(0, 4), **kw)


@pytest.mark.parametrize("importance", ["taylor", "l2", "random"])
def test_pruned_model_runs_forward_and_generate(tiny_model_dir, batch, importance):
    loaded = load_model(tiny_model_dir)
    result = prune_model(loaded.model, loaded.tokenizer, _all_layers(importance=importance))
    with torch.no_grad():
        logits = result.model(**batch).logits
    assert torch.isfinite(logits).all()
    assert logits.shape[-1] == len(loaded.tokenizer)
    out = result.model.generate(**{k: v[:2] for k, v in batch.items()}, max_new_tokens=5, do_sample=False,
                                pad_token_id=loaded.tokenizer.pad_token_id)
    assert out.shape[1] == batch["input_ids"].shape[1] + 5
    assert result.params_after < result.params_before


def test_widths_match_requested_ratio_mha(tiny_tokenizer, tmp_path):
    from tests.conftest import build_model

    model = build_model(tiny_tokenizer, num_kv_heads=8)
    result = prune_model(model, tiny_tokenizer, _all_layers(importance="l2", ratio=0.25))
    for shape in result.shapes_after:
        # MHA: a head goes with its key and value head; 8 * 0.25 = 2 removed
        assert (shape.num_heads, shape.num_kv_heads, shape.intermediate_size) == (6, 6, 96)


def test_widths_gqa_heads_and_groups(tiny_tokenizer):
    from tests.conftest import build_model

    heads = prune_model(build_model(tiny_tokenizer, num_kv_heads=2), tiny_tokenizer,
                        _all_layers(importance="l2", ratio=0.25, gqa="heads"))
    # 4 query heads per key/value group; one removed from each group, both groups kept
    assert {(s.num_heads, s.num_kv_heads) for s in heads.shapes_after} == {(6, 2)}
    groups = prune_model(build_model(tiny_tokenizer, num_kv_heads=2), tiny_tokenizer,
                         _all_layers(importance="l2", attn_ratio=0.5, mlp_ratio=0.0, gqa="groups"))
    assert {(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in groups.shapes_after} == {(4, 1, 128)}


def test_separate_ratios_layer_ranges_and_rounding(tiny_tokenizer):
    from tests.conftest import build_model

    cfg = PruneConfig(attn_ratio=0.5, mlp_ratio=0.3, attn_layers=(1, 3), mlp_layers=(2, 4),
                      importance="l2", round_to=8)
    shapes = prune_model(build_model(tiny_tokenizer), tiny_tokenizer, cfg).shapes_after
    assert [s.num_heads for s in shapes] == [8, 4, 4, 8]
    # 128 - round(38.4) = 90 channels, rounded to the nearest multiple of 8
    assert [s.intermediate_size for s in shapes] == [128, 128, 88, 88]


def test_default_layer_range_follows_llm_pruner():
    assert default_layer_range(32) == (4, 30)
    assert default_layer_range(30) == (4, 28)
    assert default_layer_range(4) == (1, 4)


def test_save_then_load_gives_identical_logits(tiny_model_dir, batch, tmp_path):
    loaded = load_model(tiny_model_dir)
    pruned = prune_model(loaded.model, loaded.tokenizer, _all_layers(importance="taylor")).model
    save_pruned_folder(pruned, loaded.tokenizer, tmp_path / "p", {"base_model": "tiny"})
    reloaded = load_model(tmp_path / "p")
    assert reloaded.kind == "paser-pruned"
    assert layer_shapes(reloaded.model) == layer_shapes(pruned)
    with torch.no_grad():
        assert torch.equal(pruned(**batch).logits, reloaded.model(**batch).logits)


def test_tied_embeddings_round_trip(tiny_tokenizer, batch, tmp_path):
    from tests.conftest import build_model

    model = build_model(tiny_tokenizer, num_kv_heads=2, tie=True)
    prune_model(model, tiny_tokenizer, _all_layers(importance="l2"))
    save_pruned_folder(model, tiny_tokenizer, tmp_path / "p", {})
    reloaded = load_pruned_folder(tmp_path / "p")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)


def test_bf16_load_of_pruned_folder(tiny_model_dir, tmp_path):
    out = tmp_path / "p"
    prune(str(tiny_model_dir), out, _all_layers(importance="l2"))
    assert next(load_model(out, dtype="bfloat16").model.parameters()).dtype == torch.bfloat16


def _train(model, batches, steps: int) -> None:
    """A few optimiser steps, so the tiny model has structure for importance to find."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        b = batches[step % len(batches)]
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        model(**b, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("part", ["channel", "head"])
def test_taylor_importance_ranking_matters(tiny_tokenizer, batch, part):
    """Removing the least important quarter changes the loss less than removing the most important."""
    from tests.conftest import build_model

    base = build_model(tiny_tokenizer, num_kv_heads=8, seed=1)
    texts = calibration_texts(None, 16, seed=0)
    _train(base, calibration_batches(tiny_tokenizer, calibration_texts(None, 64, seed=5), 128), steps=60)
    accumulate_gradients(base, calibration_batches(tiny_tokenizer, texts, 128))
    scores = group_scores(base, "taylor")
    dense_loss = _loss(base, batch)

    def pruned_loss(keep_most: bool) -> float:
        model = copy.deepcopy(base)
        plans = []
        for shape, s in zip(layer_shapes(model), scores):
            flipped = {k: (v if keep_most else -v) for k, v in s.items()}
            a, m = (0.25, 0.0) if part == "head" else (0.0, 0.25)
            plans.append(plan_layer(shape, flipped, a, m, "heads", None))
        apply_plan(model, plans)
        return _loss(model, batch)

    drop_least, drop_most = pruned_loss(keep_most=True), pruned_loss(keep_most=False)
    assert abs(drop_least - dense_loss) < abs(drop_most - dense_loss)


def test_random_importance_is_seeded(tiny_model_dir):
    def shapes_and_weights(seed):
        loaded = load_model(tiny_model_dir)
        m = prune_model(loaded.model, loaded.tokenizer, _all_layers(importance="random", seed=seed)).model
        return m.model.layers[1].mlp.down_proj.weight.clone()

    assert torch.equal(shapes_and_weights(3), shapes_and_weights(3))
    assert not torch.equal(shapes_and_weights(3), shapes_and_weights(4))


def test_prune_api_writes_folder_and_pickle(tiny_model_dir, batch, tmp_path):
    result = prune(str(tiny_model_dir), tmp_path / "out", ratio=0.25, importance="l2",
                   attn_layers=(0, 4), export_pickle=tmp_path / "ckpt.bin")
    assert (tmp_path / "out" / "paser_pruned.json").is_file()
    from_folder = load_model(tmp_path / "out").model
    from_pickle = load_model(tmp_path / "ckpt.bin")
    assert from_pickle.kind == "llm-pruner"
    with torch.no_grad():
        assert torch.equal(from_folder(**batch).logits, from_pickle.model(**batch).logits)
    assert result.params_after == sum(p.numel() for p in from_folder.parameters())


def test_calibration_from_instruction_file_and_text(tiny_model_dir, tmp_path):
    import json

    records = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(5)]
    (tmp_path / "cal.json").write_text(json.dumps(records))
    (tmp_path / "cal.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    assert len(calibration_texts(str(tmp_path / "cal.json"), 10, 0)) == 5
    assert calibration_texts(str(tmp_path / "cal.txt"), 10, 0) in (
        ["First paragraph.", "Second paragraph."], ["Second paragraph.", "First paragraph."])
    prune(str(tiny_model_dir), tmp_path / "o", calibration=str(tmp_path / "cal.txt"))


@pytest.mark.parametrize("bad", [dict(ratio=1.0), dict(ratio=-0.1), dict(importance="grad"),
                                 dict(gqa="kv"), dict(attn_layers=(3, 1)), dict(num_calibration=0)])
def test_invalid_config_is_refused(bad):
    with pytest.raises(ValueError):
        PruneConfig(**bad)


def test_layer_range_past_depth_is_refused(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    with pytest.raises(ValueError, match="past the model's 4 layers"):
        prune_model(loaded.model, loaded.tokenizer, PruneConfig(attn_layers=(0, 9)))


def test_the_plan_reads_a_layers_scores_in_one_copy_not_element_by_element():
    """On a GPU each element read is a device sync (hundreds of thousands for a 7B's MLP channels):
    the plan copies a layer's scores to the host once."""
    from paser.models.pruning import _lowest

    class Counting(torch.Tensor):
        reads = 0

        def __getitem__(self, index):
            Counting.reads += 1
            return super().__getitem__(index)

    scores = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3]).as_subclass(Counting)
    assert _lowest(scores, 2) == {1, 3}  # ties to the lower index
    assert Counting.reads == 0


@pytest.mark.parametrize("importance", ["taylor"])
def test_offloaded_gradients_give_the_same_scores_and_leave_the_device_as_made(tiny_tokenizer, importance):
    """On a GPU the calibration gradients go to the host as the backward pass makes them (the
    device holds the weights once, not twice): the same fp32 sums, bitwise the same scores, and at
    no moment more than a layer's gradients held on the model."""
    from paser.models.pruning import (
        accumulate_gradients,
        calibration_batches,
        calibration_texts,
        decoder_layers,
        group_scores,
    )
    from tests.conftest import build_model

    model = build_model(tiny_tokenizer, num_kv_heads=2)
    batches = calibration_batches(tiny_tokenizer, calibration_texts(None, 6, 0), 64, batch_size=2)
    accumulate_gradients(model, batches)
    kept = group_scores(model, importance)
    per_layer = max(sum(1 for _ in layer.parameters()) for layer in decoder_layers(model))
    held = []

    def count(_):
        held.append(sum(1 for p in model.parameters() if p.grad is not None))

    hooks = [p.requires_grad_(True).register_post_accumulate_grad_hook(count) for layer in decoder_layers(model)
             for p in layer.parameters()]
    accumulate_gradients(model, batches, offload=True)
    for hook in hooks:
        hook.remove()
    offloaded = group_scores(model, importance)
    assert all(p.grad is None for p in model.parameters())
    assert held and max(held) <= per_layer
    for a, b in zip(kept, offloaded):
        for name in a:
            assert torch.equal(a[name], b[name])


def test_a_twin_pruned_for_gpu_scoring_is_saved_in_the_scoring_dtype(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    from paser.models.pruning import prune

    prune(str(tiny_model_dir), tmp_path / "p", ratio=0.5, importance="l2", save_dtype="bfloat16")
    with safe_open(next((tmp_path / "p").glob("*.safetensors")), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
