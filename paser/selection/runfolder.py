"""The run folder: where every stage keeps its output, sealed with what it was made from.

A stage's output ``X`` is accompanied by ``X.fp``, the fingerprint of everything it depends on
(data content, model files, stage config, earlier outputs); a stage whose output carries the
fingerprint it would compute now is reused instead of re-run. This module computes those
fingerprints, writes outputs atomically, times the stages (``timings.json``) and reads the run's
records and selection table back for the stages, the report and notebooks. Layout:
  settings.json         the run's settings
  pool.parquet          the validated records (id, texts, original fields as JSON); data.json
  tokens.parquet        prompt and response tokens of every record
  embeddings.npy        unit-norm instruction embeddings
  manifold.npz          spectral coordinates and eigenvalues
  clusters.parquet      cluster of each record, plus cluster_fit.json (K curve, knee, eigengap)
  scores/<fp>/shard-*   degradation shards; degradation.parquet once complete
  concepts.parquet      each record's concepts
  scores.parquet        every record: cluster, JSD, tokens, IES, concepts, status, reason, rank
  selected.jsonl        the selected records in the input's layout plus paser's fields
  clusters.json         K, sizes, CDS, allocation, selected, rejected, the K-selection curve
  manifest.json         settings, fingerprints, package versions, per-stage wall time
  report.md + *.png     the human report
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from paser import progress
from paser.cache import file_identity
from paser.config import to_mapping
from paser.data.pools import Record, hub_dataset, hub_id
from paser.devices import resolve_dtype, scoring_device
from paser.errors import DataError, PaserError
from paser.models.load import model_fingerprint
from paser.selection.concepts import record_concepts
from paser.selection.configs import ConceptConfig, SelectConfig
from paser.selection.degradation import SCORE_COLUMNS
from paser.selection.embedding import SentenceEmbedder
from paser.selection.settings import Settings
from paser.selection.shards import scoring_fingerprint


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_fresh(path: Path, fp: str) -> bool:
    """Whether ``path`` exists and was sealed with fingerprint ``fp``."""
    marker = path.with_name(path.name + ".fp")
    return path.exists() and marker.is_file() and marker.read_text() == fp


def seal(path: Path, fp: str) -> None:
    """Mark ``path`` as made for fingerprint ``fp`` (after it is complete)."""
    path.with_name(path.name + ".fp").write_text(fp)


def atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write ``frame`` so that ``path`` is either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def atomic_parquet_parts(frames, path: Path) -> None:
    """Write the frames, one row group each, as one Parquet file (``path`` is the old file or the
    whole new one): only one frame's Arrow copy is in memory at a time. Given no frame, nothing is
    written: pass at least an empty one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp")
    writer = None
    try:
        for frame in frames:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    if writer is not None:
        os.replace(tmp, path)


def record_stage(run: Path, stage: str, seconds: float, reused: bool) -> None:
    """Note a stage's wall time in timings.json (the manifest's per-stage table)."""
    path = run / "timings.json"
    timings = json.loads(path.read_text()) if path.is_file() else {}
    timings[stage] = {"seconds": round(seconds, 3), "reused": reused}
    path.write_text(json.dumps(timings, indent=2))


class Stage:
    """Times a stage and records whether it reused earlier output."""

    def __init__(self, run: Path, name: str):
        self.run, self.name, self.reused = run, name, False

    def __enter__(self):
        self.start = time.perf_counter()
        if self.name in STAGE_NAMES:
            progress.announce(f"{STAGE_NAMES[self.name]} ...")
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            seconds = time.perf_counter() - self.start
            record_stage(self.run, self.name, seconds, self.reused)
            if self.reused and self.name in STAGE_NAMES:
                progress.announce(f"{STAGE_NAMES[self.name]}: reused the run folder's result")


# stages named as they start (the twin says when it prunes; scoring's display names itself)
STAGE_NAMES = {"data": "reading the pool", "tokens": "counting tokens", "embed": "embedding the instructions",
               "cluster": "finding capability clusters", "select": "allocating the budget, ranking and filtering",
               "baseline": "baseline selection"}


def data_fingerprint(cfg: SelectConfig) -> str:
    """The input pool's content (file bytes, a hub dataset's own fingerprint or the suite's size and
    seed) and how it is read."""
    if cfg.data is None:
        source = ("suite", cfg.suite_size, cfg.seed)
    elif not Path(cfg.data).expanduser().exists() and hub_id(cfg.data):
        # a Hugging Face dataset id: the cached Arrow data's own fingerprint
        source = ("hub", cfg.data, cfg.split, hub_dataset(cfg.data, cfg.split)._fingerprint)
    else:
        path = Path(cfg.data).expanduser()
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        h = hashlib.sha256()
        for f in files:
            try:
                h.update(f.read_bytes())
            except OSError as err:
                raise DataError(f"{f}: cannot read: {err.strerror}") from None
        source = ("file", h.hexdigest())
    return fingerprint(source, cfg.layout, cfg.field_map, cfg.strict)


_POOL_FRAMES: dict = {}  # this process's copy of a run's pool.parquet, by path and sealed fingerprint
TEXT_COLUMNS = ["id", "instruction", "input", "response", "index", "context"]  # all but the records' fields


def _pool_frame(run: Path, fields: bool = True) -> pd.DataFrame:
    """The run's pool table, read once per process and pool (a scoring worker reads it once for all
    the shards it scores, not once per shard); without ``fields`` the records' own fields (their
    JSON, which holds the texts again) are not read, unless the table is already in memory."""
    path = Path(run).resolve() / "pool.parquet"
    marker = path.with_name("pool.parquet.fp")
    key = (str(path), marker.read_text() if marker.is_file() else None, path.stat().st_mtime_ns)
    held = _POOL_FRAMES.get(key)
    if held is None or (fields and "fields" not in held):
        _POOL_FRAMES.clear()
        if fields:
            held = pd.read_parquet(path)
        else:
            import pyarrow.parquet as pq

            names = set(pq.read_schema(path).names)
            held = pd.read_parquet(path, columns=[c for c in TEXT_COLUMNS if c in names])  # context: newer runs
        _POOL_FRAMES[key] = held
    return held


def read_run_pool(run: Path, rows=None, fields: bool = True) -> list[Record]:
    """The validated records the data stage stored in ``run``; with ``rows`` (pool positions) only
    those, in that order. ``fields=False``: for stages that need the texts alone (token counts,
    embeddings, scoring), each record's ``fields`` is None and the table is read without them
    (what it saves: docs/benchmarks.md)."""
    frame = _pool_frame(run, fields)
    if rows is not None:
        frame = frame.iloc[list(rows)]
    contexts = frame["context"] if "context" in frame else ["[]"] * len(frame)  # runs made before chat layouts
    found = frame["fields"] if fields else [None] * len(frame)
    return [Record(id=row.id, instruction=row.instruction, input=row.input, response=row.response,
                   fields=json.loads(raw) if fields else None, index=int(row.index),
                   context=tuple(json.loads(context)))
            for row, raw, context in zip(frame.itertuples(), found, contexts)]


def sealed_fingerprint(path: Path) -> str:
    """The fingerprint ``path`` was sealed with."""
    return path.with_name(path.name + ".fp").read_text()


STAGE_OUTPUTS = {"data": "pool.parquet", "tokens": "tokens.parquet", "embed": "embeddings.npy",
                 "cluster": "clusters.parquet", "score": "degradation.parquet"}


def stage_fingerprint(stage: str, settings: Settings, run: Path, pruned_ref: str | None = None) -> str:
    """What a stage's output depends on, computed without running it; needs the earlier stages'
    outputs (and, for ``score``, the pruned model's reference)."""
    if stage == "data":
        return data_fingerprint(settings.select)
    if stage not in STAGE_OUTPUTS:
        raise ValueError(f"no fingerprint for stage {stage!r}; known: {list(STAGE_OUTPUTS)}")
    pool_fp = sealed_fingerprint(run / "pool.parquet")
    if stage == "embed":
        cfg = settings.embed
        given = file_identity(cfg.precomputed) if cfg.precomputed and Path(cfg.precomputed).is_file() else None
        return fingerprint(pool_fp, to_mapping(cfg), SentenceEmbedder(cfg.model).fingerprint(), given)
    if stage == "tokens":
        prompt = settings.prompt
        return fingerprint(pool_fp, model_fingerprint(settings.select.dense), prompt.template, prompt.cutoff)
    if stage == "cluster":
        return fingerprint(sealed_fingerprint(run / "embeddings.npy"), to_mapping(settings.manifold),
                           to_mapping(settings.cluster), settings.select.seed)
    if stage == "score":
        ids = pd.read_parquet(run / "pool.parquet", columns=["id"])["id"]
        rows = scored_rows(settings, run)
        ids = (ids if rows is None else ids.iloc[rows]).tolist()
        score = dataclasses.replace(settings.score, dtype=resolve_dtype(settings.score.dtype,
                                                                        scoring_device(settings.score.device)))
        fp = scoring_fingerprint(score, model_fingerprint(settings.select.dense),
                                 model_fingerprint(pruned_ref), ids)
        return fingerprint(fp, pool_fp)


def scored_rows(settings: Settings, run: Path) -> list[int] | None:
    """The pool positions degradation scoring covers: every record (None), or with
    ``score.per_cluster`` m a seeded sample of m records per cluster (all of a smaller one), in
    pool order."""
    if not settings.sampled_scores:
        return None
    labels = pd.read_parquet(run / "clusters.parquet", columns=["cluster"])["cluster"].to_numpy()
    rng = np.random.default_rng(settings.select.seed)
    m = settings.score.per_cluster
    rows = [rng.choice(members, m, replace=False) if len(members) > m else members
            for members in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    return sorted(int(i) for i in np.concatenate(rows))


def stage_state(stage: str, settings: Settings, run: Path, pruned_ref: str | None = None) -> tuple[str, bool]:
    """The stage's fingerprint and whether its output in ``run`` already matches it."""
    fp = stage_fingerprint(stage, settings, run, pruned_ref)
    return fp, output_fresh(stage, run, fp)


def output_fresh(stage: str, run: Path, fp: str) -> bool:
    """Whether the stage's output in ``run`` was made for fingerprint ``fp``."""
    return is_fresh(run / STAGE_OUTPUTS[stage], fp)


def record_concepts_cached(run: Path, records: list[Record], config: ConceptConfig) -> list[list[str]]:
    """Concepts of every record, kept in the run folder: re-selecting at another budget does not
    extract them again."""
    path = run / "concepts.parquet"
    fp = fingerprint(sealed_fingerprint(run / "pool.parquet"), config.max_concepts, config.max_phrase_words)
    if is_fresh(path, fp):
        return [list(c) for c in pd.read_parquet(path)["concepts"]]
    concepts = [record_concepts(r, config) for r in records]
    atomic_parquet(pd.DataFrame({"id": [r.id for r in records], "concepts": concepts}), path)
    seal(path, fp)
    return concepts


def selection_table(settings: Settings, run: Path) -> tuple[list[Record], pd.DataFrame]:
    """The run's records and the table selection works on: degradation, cluster and concepts per
    record. Records that were not scored (a per-cluster sample, or a method that scores none) have
    no degradation values (NaN) and their token counts from the token stage."""
    records = read_run_pool(run)
    tokens = pd.read_parquet(run / "tokens.parquet")
    if settings.scored:
        scores = pd.read_parquet(run / "degradation.parquet")
        table = tokens[["id"]].merge(scores, on="id", how="left", validate="one_to_one")
        unscored = table["n_prompt"].isna()
        if unscored.any():  # token counts and truncation come from the token stage, as scoring counts them
            for column in ("n_prompt", "n_response", "truncated"):
                table[column] = table[column].where(~unscored, tokens[column])
            table = table.astype({"n_prompt": "int64", "n_response": "int64", "truncated": bool})
    else:
        table = tokens[["id", "n_prompt", "n_response", "truncated"]].assign(
            **{c: np.nan for c in SCORE_COLUMNS if c not in tokens}).reindex(columns=SCORE_COLUMNS)
    table = table.merge(pd.read_parquet(run / "clusters.parquet"), on="id", how="left", validate="one_to_one")
    if table["cluster"].isna().any() or len(table) != len(records):
        raise PaserError(f"{run}: scores and clusters cover different records; rerun without --out reuse")
    table["concepts"] = record_concepts_cached(run, records, settings.concepts)
    return records, table


def selection_embeddings(settings: Settings, run: Path) -> np.ndarray | None:
    """The instruction embeddings when the method compares records by them (strat's near-duplicate
    removal), else None."""
    if settings.method.uses_embeddings(settings):
        return np.load(run / "embeddings.npy")
    return None


def run_folder(settings: Settings) -> Path:
    """The run folder of ``settings``, created, with the settings written into it."""
    run = Path(settings.select.out)
    run.mkdir(parents=True, exist_ok=True)
    (run / "settings.json").write_text(json.dumps(settings.to_dict(), indent=2))
    return run
