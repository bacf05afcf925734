"""LLM-Pruner checkpoints, read without running them.

LLM-Pruner saves ``torch.save({'model': model, 'tokenizer': tokenizer})`` (usually fp16): a pickle
of whole Python objects whose classes live in LLM-Pruner's own module
(``LLMPruner.models.hf_llama.modeling_llama``, a transformers-4 era Llama) or in transformers 4.
Unpickling it normally imports those modules and can run any code the file carries. paser reads it
with a restricted unpickler instead:
- it never imports a module named in the file;
- it calls only the allowlist below: torch's tensor and parameter rebuilders (the storages come
  from the archive's own tensor files; ``_rebuild_from_type_v2`` only with arguments that passed
  the same allowlist, casting to ``torch.Tensor`` or ``nn.Parameter``), ``collections.OrderedDict``,
  ``set``/``frozenset``, torch dtypes, ``torch.Size``/``torch.device``, ``_codecs.encode`` for
  latin-1 text (how protocol 2 stores bytes) and ``copyreg._reconstructor`` for plain objects;
- a class from a namespace a checkpoint's model and tokenizer come from (``LLMPruner``,
  ``transformers``, ``torch.nn.modules``, ``tokenizers``, ``peft``, and ``kernels``, whose function
  modules and mode flags transformers >= 5.25 attaches to a model) becomes an inert record: calling
  or building it only stores its arguments and state, no method of the class runs (kernels'
  ``_rebuild_kernel_func`` would import a module the file names; its record keeps the two names);
- any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``...) refuses the file
  with one line naming it, before anything in it is called.

From the records paser reads the weights and each layer's shapes (query and key/value heads from
the q/k/v rows and the head size, MLP width from gate/up/down) and the config's fields, and writes
its own pruned-model folder (safetensors, per-layer widths), cached like GGUF conversions. The
tokenizer is rebuilt from the checkpoint's state when it is a fast (``tokenizers``) one; otherwise
(LLM-Pruner's Llama-2 sentencepiece tokenizer) from ``tokenizer_from``, the dense model, which
LLM-Pruner never changes.

    python -c "from paser.models.llm_pruner import import_checkpoint; print(import_checkpoint('pytorch_model.bin'))"
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import json
import pickle
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from paser.cache import converted_folder, write_folder
from paser.errors import ModelLoadError, UnsafeCheckpointError
from paser.models.layers import FORMAT_VERSION, PRUNED_MARKER, WEIGHTS_FILE, LayerShape

RECORD_NAMESPACES = ("LLMPruner", "transformers", "torch.nn.modules", "tokenizers", "peft", "kernels")
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                  "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias", "mlp_bias",
                  "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id", "sliding_window")


class InertRecord:
    """What a class from the checkpoint becomes: its name, the arguments it was called or created
    with, and the state it was given. Nothing of the original class runs."""

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state[0] if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict) else state

    def get(self, key, default=None):
        return self.state.get(key, default) if isinstance(self.state, dict) else default

    def __repr__(self) -> str:
        return f"<inert {self.global_name}>"


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` for plain objects only: a record, never a base class's __init__."""
    if base is not object or not (isinstance(cls, type) and issubclass(cls, InertRecord)):
        raise UnsafeCheckpointError(f"copyreg._reconstructor with {cls!r} / {base!r}")
    return cls.__new__(cls)


def _latin1(text, encoding="latin1"):
    if encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, encoding)


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    # a tensor carrying Python attributes: rebuilt by one of the above, cast to one of these types
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    ("torch", "Tensor"): torch.Tensor, ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("builtins", "object"): object, ("__builtin__", "object"): object,
    ("torch", "Size"): torch.Size, ("torch", "device"): torch.device,
    ("_codecs", "encode"): _latin1,
    ("copyreg", "_reconstructor"): _reconstructor, ("copy_reg", "_reconstructor"): _reconstructor,
}


class _RestrictedUnpickler(pickle.Unpickler):
    _records: dict = {}  # one record class per global name, shared by every load

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if any(module == ns or module.startswith(ns + ".") for ns in RECORD_NAMESPACES):
            key = f"{module}.{name}"
            if key not in self._records:
                self._records[key] = type(name, (InertRecord,), {"global_name": key})
            return self._records[key]
        raise UnsafeCheckpointError(f"{module}.{name}")


_RESTRICTED = types.SimpleNamespace(__name__="paser_restricted_pickle", Unpickler=_RestrictedUnpickler,
                                    load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load())


def restricted_load(path: str | Path):
    """The checkpoint's objects, with classes as inert records (see the module docstring)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED)
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(
            f"{path}: refused: the file needs {err}, which is outside the allowlist of an LLM-Pruner "
            "checkpoint (nothing of the file has run); load only files from a source you trust with "
            "--trust-pickle") from None
    except Exception as err:
        raise ModelLoadError(f"{path}: not a readable torch checkpoint: {type(err).__name__}: {err}") from None


def _tensors(record, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a module record and its children, by dotted name."""
    if not isinstance(record, InertRecord):
        return {}
    out: dict[str, torch.Tensor] = {}
    skip = record.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, tensor in (record.get(group) or {}).items():
            if isinstance(tensor, torch.Tensor) and name not in skip:
                out[prefix + name] = tensor.detach()
    for name, child in (record.get("_modules") or {}).items():
        out |= _tensors(child, f"{prefix}{name}.")
    return out


def _config_fields(record) -> dict:
    config = record.get("config") if isinstance(record, InertRecord) else None
    state = config.state if isinstance(config, InertRecord) and isinstance(config.state, dict) else None
    if state is None:
        raise ModelLoadError("the model has no config object with its fields")
    return state


def _text(value):
    """A special token as text: a string, or the content of an AddedToken record."""
    if isinstance(value, InertRecord):
        state = value.state if isinstance(value.state, dict) else {}
        return state.get("content") or (value.args[0] if value.args else None)
    return value if isinstance(value, str) else None


def rebuild_tokenizer(record):
    """A fast tokenizer from a tokenizer record whose backend is ``tokenizers`` (its JSON is in the
    state), or None when it is another kind (sentencepiece)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if not isinstance(record, InertRecord):
        return None
    backend = record.get("_tokenizer")
    raw = backend.state if isinstance(backend, InertRecord) else None
    if isinstance(raw, (bytes, bytearray)):
        raw = raw.decode("utf-8")
    if not isinstance(raw, str):
        return None
    kwargs = dict(record.get("init_kwargs") or {})
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = _text(kwargs.get(name)) or _text(record.get(f"_{name}")) or _text(
            (record.get("_special_tokens_map") or {}).get(name))
        if value:
            special[name] = value
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(raw), **special)


def _layer_shapes(tensors: dict, n_layers: int, hd: int, where: Path):
    shapes = []
    for i in range(n_layers):
        p = f"model.layers.{i}."
        try:
            q, k = tensors[p + "self_attn.q_proj.weight"], tensors[p + "self_attn.k_proj.weight"]
            gate = tensors[p + "mlp.gate_proj.weight"]
        except KeyError as err:
            raise ModelLoadError(f"{where}: layer {i} has no {err.args[0]} (expected a Llama-family decoder with "
                                 "q/k/v/o projections and a gated MLP)") from None
        if q.shape[0] % hd or k.shape[0] % hd:
            raise ModelLoadError(f"{where}: layer {i}: q/k rows {q.shape[0]}/{k.shape[0]} are not whole heads of "
                                 f"{hd}")
        shapes.append(LayerShape(q.shape[0] // hd, k.shape[0] // hd, gate.shape[0]))
    return shapes


def import_checkpoint(path: str | Path, tokenizer_from: str | None = None,
                      load_tokenizer: Callable[[str], Any] | None = None) -> Path:
    """The checkpoint rebuilt as a paser pruned-model folder (made once, cached by the file's name,
    size and modification time); see the module docstring. When the checkpoint's tokenizer cannot
    be rebuilt, ``tokenizer_from``'s is used, loaded by ``load_tokenizer`` (``paser.models.load`` passes
    its own loader, which reads every model reference paser takes; default: a folder's
    ``AutoTokenizer``)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    target = converted_folder(path, "llm-pruner-")
    if (target / PRUNED_MARKER).is_file():
        return target
    obj = restricted_load(path)
    if not isinstance(obj, dict) or "model" not in obj:
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise ModelLoadError(f"{path}: expected LLM-Pruner's layout, a dict with 'model' and 'tokenizer', "
                             f"found {found}")
    model = obj["model"]
    try:
        fields = _config_fields(model)
    except ModelLoadError as err:
        raise ModelLoadError(f"{path}: {err}") from None
    model_type = fields.get("model_type", "llama")
    if model_type not in SUPPORTED_TYPES:
        raise ModelLoadError(f"{path}: a {model_type!r} model; paser imports LLM-Pruner checkpoints of "
                             f"{', '.join(SUPPORTED_TYPES)} decoders")
    tensors = _tensors(model)
    hd = fields.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"]
    shapes = _layer_shapes(tensors, fields["num_hidden_layers"], hd, path)
    config = AutoConfig.for_model(model_type, **{k: fields[k] for k in _CONFIG_FIELDS if fields.get(k) is not None})
    config.head_dim = hd
    tokenizer, tokenizer_source = rebuild_tokenizer(obj.get("tokenizer")), "the checkpoint"
    if tokenizer is None and tokenizer_from is not None:
        load = load_tokenizer or AutoTokenizer.from_pretrained
        tokenizer, tokenizer_source = load(tokenizer_from), str(tokenizer_from)
    if tokenizer is None:
        kind = getattr(obj.get("tokenizer"), "global_name", type(obj.get("tokenizer")).__name__)
        raise ModelLoadError(f"{path}: its tokenizer ({kind}) is not a fast tokenizer paser can rebuild from the "
                             "file; give the dense model it was pruned from (paser select --dense ...), whose "
                             "tokenizer LLM-Pruner keeps")
    keep = {n: t.contiguous() for n, t in tensors.items() if not n.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        keep.pop("lm_head.weight", None)

    def write(folder: Path) -> None:
        config.save_pretrained(folder)
        save_file(keep, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        tokenizer.save_pretrained(folder)
        (folder / PRUNED_MARKER).write_text(json.dumps({
            "format": "paser-pruned", "version": FORMAT_VERSION,
            "layers": [dataclasses.asdict(s) for s in shapes], "imported_from": str(path),
            "source": "LLM-Pruner checkpoint", "tokenizer_from": tokenizer_source}, indent=2) + "\n")

    return write_folder(target, write, PRUNED_MARKER)

