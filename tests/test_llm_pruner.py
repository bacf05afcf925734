"""LLM-Pruner checkpoints read by the restricted unpickler: the class layout of LLM-Pruner's own
Llama (a module this process cannot import), fp16, layers of different widths under grouped-query
attention; scores equal to the same weights in paser's format; a poisoned file refused unrun."""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from paser.data.suite import suite_pool
from paser.errors import ModelLoadError, UntrustedPickleError
from paser.models.load import load_model
from paser.selection.configs import ScoreConfig
from paser.selection.passes import score_shard

pytestmark = pytest.mark.usefixtures("prefect_api")  # flows here run against the test process's one Prefect server

MODULE = "LLMPruner.models.hf_llama.modeling_llama"


def _llm_pruner_classes():
    """Stand-ins for LLM-Pruner's transformers-4 era Llama, defined under its module name."""

    class LlamaRMSNorm(nn.Module):
        def __init__(self, weight, eps):
            super().__init__()
            self.weight = nn.Parameter(weight)
            self.variance_epsilon = eps

    class LlamaRotaryEmbedding(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    class LlamaAttention(nn.Module):
        def __init__(self, source, head_dim):
            super().__init__()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(self, name, _copy(getattr(source, name)))
            self.head_dim = head_dim
            self.num_heads = self.q_proj.out_features // head_dim  # LLM-Pruner rewrites these per layer
            self.num_key_value_heads = self.k_proj.out_features // head_dim
            self.rotary_emb = LlamaRotaryEmbedding(head_dim)

    class LlamaMLP(nn.Module):
        def __init__(self, source):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (_copy(getattr(source, n))
                                                            for n in ("gate_proj", "up_proj", "down_proj"))
            self.act_fn = nn.SiLU()

    class LlamaDecoderLayer(nn.Module):
        def __init__(self, source, head_dim, eps):
            super().__init__()
            self.self_attn = LlamaAttention(source.self_attn, head_dim)
            self.mlp = LlamaMLP(source.mlp)
            self.input_layernorm = LlamaRMSNorm(source.input_layernorm.weight.detach().clone(), eps)
            self.post_attention_layernorm = LlamaRMSNorm(source.post_attention_layernorm.weight.detach().clone(), eps)

    class LlamaModel(nn.Module):
        def __init__(self, source, head_dim, eps):
            super().__init__()
            self.embed_tokens = nn.Embedding.from_pretrained(source.embed_tokens.weight.detach().clone(), freeze=False)
            self.layers = nn.ModuleList(LlamaDecoderLayer(layer, head_dim, eps) for layer in source.layers)
            self.norm = LlamaRMSNorm(source.norm.weight.detach().clone(), eps)

    class LlamaForCausalLM(nn.Module):
        def __init__(self, source):
            super().__init__()
            cfg = source.config
            self.config = cfg
            self.model = LlamaModel(source.model, cfg.head_dim, cfg.rms_norm_eps)
            self.lm_head = _copy(source.lm_head)

    class LlamaTokenizer:  # sentencepiece-backed in LLM-Pruner: nothing paser can rebuild
        def __init__(self):
            self.vocab_file = "tokenizer.model"
            self.sp_model_proto = b"\x0a\x00not a real model"

    classes = (LlamaRMSNorm, LlamaRotaryEmbedding, LlamaAttention, LlamaMLP, LlamaDecoderLayer, LlamaModel,
               LlamaForCausalLM, LlamaTokenizer)
    for cls in classes:
        cls.__module__ = MODULE
        cls.__qualname__ = cls.__name__
    return {cls.__name__: cls for cls in classes}


def _copy(linear: nn.Linear) -> nn.Linear:
    out = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    out.load_state_dict(linear.state_dict())
    return out


def _save_llm_pruner_checkpoint(path, source_model, tokenizer):
    """torch.save({'model', 'tokenizer'}) in fp16 with the classes in LLM-Pruner's module, which is
    registered only while saving: the loading process cannot import it."""
    names = ["LLMPruner", "LLMPruner.models", "LLMPruner.models.hf_llama", MODULE]
    classes = _llm_pruner_classes()
    module = types.ModuleType(MODULE)
    module.__dict__.update(classes)
    for name in names:
        sys.modules[name] = module if name == MODULE else types.ModuleType(name)
    try:
        model = classes["LlamaForCausalLM"](source_model).half()
        torch.save({"model": model, "tokenizer": tokenizer if tokenizer is not None else classes["LlamaTokenizer"]()},
                   path)
    finally:
        for name in names:
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def pruned_source(tmp_path_factory, tiny_pair):
    """A tiny GQA model pruned unevenly: heads in layers 1-2 only, MLP channels in layers 0-1."""
    from paser.models.config import PruneConfig
    from paser.models.pruning import prune

    dense = tiny_pair[0]
    folder = tmp_path_factory.mktemp("uneven") / "pruned"
    prune(dense, folder, PruneConfig(importance="l2", attn_layers=(1, 3), mlp_layers=(0, 2), ratio=0.5))
    return dense, str(folder)


def _reference(folder):
    """The same weights in paser's own format, rounded through fp16 as the checkpoint stores them."""
    model = load_model(folder).model.eval()
    with torch.no_grad():
        for param in model.parameters():  # the weights only: rotary frequencies stay fp32
            param.copy_(param.half().float())
    return model


def test_checkpoint_of_llm_pruner_classes_scores_like_the_same_weights(pruned_source, tmp_path):
    from paser.models.layers import layer_shapes

    dense, folder = pruned_source
    source = load_model(folder)
    path = tmp_path / "pytorch_model.bin"
    _save_llm_pruner_checkpoint(path, source.model, source.tokenizer)
    with pytest.raises(ModuleNotFoundError):
        torch.load(path, weights_only=False)  # a plain load needs LLM-Pruner's package
    imported = load_model(path, dtype="float32")  # no trust flag, nothing of the file runs
    reference = _reference(folder)
    assert imported.kind == "llm-pruner"
    shapes = layer_shapes(imported.model)
    assert shapes == layer_shapes(reference) and len({(s.num_heads, s.intermediate_size) for s in shapes}) > 2
    assert any(s.num_heads != s.num_kv_heads for s in shapes)  # grouped-query attention kept
    ids = torch.tensor([[5, 17, 42, 99, 3, 7, 11]])
    with torch.no_grad():
        assert torch.equal(imported.model(input_ids=ids).logits, reference(input_ids=ids).logits)
    records = suite_pool(16, seed=3).records
    dense_model = load_model(dense).model
    cfg = ScoreConfig(batch_size=5)
    a = score_shard(dense_model, imported.model, imported.tokenizer, records, cfg)
    b = score_shard(dense_model, reference, source.tokenizer, records, cfg)
    np.testing.assert_array_equal(a["jsd"], b["jsd"])
    np.testing.assert_array_equal(a["loss_gap"], b["loss_gap"])


def test_transformers_classes_and_a_cached_import(pruned_source, tmp_path):
    from paser.models.pruning import export_llm_pruner_pickle

    _, folder = pruned_source
    source = load_model(folder)
    path = export_llm_pruner_pickle(_reference(folder).half(), source.tokenizer, tmp_path / "hf.bin")
    first = load_model(path, dtype="float32")
    with torch.no_grad():
        ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
        assert torch.equal(first.model(input_ids=ids).logits, _reference(folder)(input_ids=ids).logits)
    assert first.tokenizer.get_vocab() == source.tokenizer.get_vocab()  # rebuilt from the file's state
    from paser.models.llm_pruner import import_checkpoint

    assert import_checkpoint(path) == import_checkpoint(path)  # converted once


def test_sentencepiece_tokenizer_comes_from_the_dense_model(pruned_source, tmp_path):
    from paser.models.load import load_pair

    dense, folder = pruned_source
    path = tmp_path / "sp.bin"
    _save_llm_pruner_checkpoint(path, load_model(folder).model, None)
    with pytest.raises(ModelLoadError, match="give the dense model it was pruned from"):
        load_model(path)
    dense_m, pruned_m = load_pair(dense, str(path))
    assert pruned_m.kind == "llm-pruner" and pruned_m.tokenizer.get_vocab() == dense_m.tokenizer.get_vocab()


class _Poison:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_poisoned_checkpoint_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "poisoned.bin"
    torch.save({"model": _Poison(target), "tokenizer": None}, path)
    with pytest.raises(UntrustedPickleError, match=r"needs posix\.system, which is outside the allowlist"):
        load_model(path)
    assert not target.exists()


def test_kernels_function_modules_are_records_and_never_rebuilt(tmp_path, monkeypatch):
    """transformers >= 5.25 attaches ``kernels`` function modules to attention layers; they pickle
    as a call to ``kernels._internals.layer.layer._rebuild_kernel_func(module, name)``, which imports
    the module the file names. The reader keeps the two names and calls nothing."""
    from paser.models.llm_pruner import InertRecord, restricted_load

    target = tmp_path / "rebuilt"
    fake = types.ModuleType("kernels._internals.layer.layer")

    def _rebuild_kernel_func(module_name, func_name):
        target.touch()

    fake._rebuild_kernel_func = _rebuild_kernel_func
    _rebuild_kernel_func.__module__, _rebuild_kernel_func.__qualname__ = fake.__name__, "_rebuild_kernel_func"
    for parent in ("kernels", "kernels._internals", "kernels._internals.layer"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)

    class _FuncModule:
        def __reduce__(self):
            return _rebuild_kernel_func, ("os", "system"), ({"training": False}, None)

    path = tmp_path / "kernels.bin"
    torch.save({"model": _FuncModule(), "tokenizer": None}, path)
    loaded = restricted_load(path)["model"]
    assert isinstance(loaded, InertRecord) and loaded.args == ("os", "system")
    assert loaded.state == {"training": False} and not target.exists()


def test_poisoned_checkpoint_fails_the_cli_in_one_line_before_any_stage(tmp_path, tiny_pair):
    from typer.testing import CliRunner

    from paser.cli import app

    target = tmp_path / "pwned"
    path = tmp_path / "poisoned.bin"
    torch.save({"model": _Poison(target), "tokenizer": None}, path)
    result = CliRunner().invoke(app, ["select", "--dense", tiny_pair[0], "--pruned", str(path), "--suite-size", "40",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "posix.system" in result.output and "Traceback" not in result.output
    assert not target.exists() and not (tmp_path / "run" / "pool.parquet").exists()
