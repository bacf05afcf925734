"""The selection pipeline's stages as functions of a run folder, and their settings.

Each stage reads what earlier stages wrote into the run folder and writes its own output there,
with a fingerprint of everything it depends on; a stage whose fingerprint matches is skipped.
So re-selecting at another budget reuses embeddings, clusters and scores (no model is loaded),
and changing the clustering settings re-runs clustering and what follows, nothing before it.
The Prefect flow in ``flows/selection.py`` calls these same functions as tasks.

Run folder:
  pool.parquet          the validated records (id, texts, original fields as JSON)
  embeddings.npy        unit-norm instruction embeddings
  manifold.npz          spectral coordinates and eigenvalues
  clusters.parquet      cluster of each record, plus cluster_fit.json (K curve, knee, eigengap)
  scores/<fp>/shard-*   degradation shards; degradation.parquet once complete
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
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from paser import progress
from paser.allocation import AllocateConfig
from paser.budget import parse_budget, take_in_order
from paser.clustering import ClusterConfig, SpectralClusterer
from paser.concepts import ConceptConfig, cluster_names, record_concepts
from paser.config import from_mapping, read_yaml, to_mapping
from paser.data import Pool, Record, hub_dataset, hub_id, load_pool
from paser.degradation import (
    ScoreConfig,
    collect_shards,
    score_pool_shard,
    score_pool_two_pass,
    scoring_fingerprint,
    shard_path,
    shard_ranges,
)
from paser.devices import resolve_dtype
from paser.embedding import EmbedConfig, embed_texts, instruction_texts
from paser.errors import ConfigError, DataError, PaserError, ShardError
from paser.manifold import ManifoldConfig, learn_manifold
from paser.pruning import PruneConfig


@dataclass
class SelectConfig:
    """What to select from, with which models, and how much."""

    data: str | None = None
    """Instruction pool (JSON, JSONL, CSV, Parquet, datasets folder, or a Hugging Face dataset id
    read offline from the datasets cache); None: the generated suite."""
    split: str = "train"
    """The split of a Hugging Face dataset id."""
    layout: str | None = None
    """alpaca, lamini, dolly, messages (chat turns) or sharegpt (conversations); detected from the
    first record when omitted."""
    field_map: dict | None = None
    """Explicit field names: {instruction, input, response, id}, or {messages} for a field holding
    conversation turns (``--fields``)."""
    strict: bool = False
    """Refuse records with an empty instruction or response instead of setting them aside."""
    suite_size: int = 1000
    """Records of the generated capability suite (when data is None)."""
    dense: str = "smollm2-135m-instruct"
    """The unpruned model."""
    pruned: str | None = None
    """The pruned twin; None makes one with paser prune at prune_ratio (made once, cached)."""
    prune_ratio: float = 0.25
    """Ratio for the twin made when pruned is None."""
    budget: float | str = 0.2
    """What to select: records as a count (100) or a fraction of the pool (0.2), or tokens as an
    amount ("40000tok") or a fraction of the pool's tokens ("0.2tok"); see paser.budget."""
    method: Literal["paser", "random", "full", "longest", "shortest", "pruned_loss", "uniform", "random_order",
                    "no_cost", "no_ccg", "kmeans"] = "paser"
    """paser; the baselines random (seeded), full (every record), longest (longest responses
    first), shortest (fewest tokens first), pruned_loss (highest response NLL under the pruned
    model first); or an ablation of PASER: uniform allocation, random order inside clusters instead
    of IES, degradation order inside clusters (IES without its compute-cost denominator), no
    concept filter, k-means clusters instead of NMF. An ablation sets its stage's option
    (allocate.method, concepts.enabled, cluster.method) whatever the config says."""
    out: str = "runs/select"
    """The run folder."""
    trust_pickle: bool = False
    """Unpickle whole a pickle the restricted reader refuses (it can run code); LLM-Pruner
    checkpoints need no flag."""
    seed: int = 0
    """Seed for every random choice: the same inputs and seed give the same selection."""
    progress: bool = True
    """Progress bars on long stages."""

    def __post_init__(self):
        parse_budget(self.budget)  # a malformed budget fails when the settings are read


@dataclass
class DistributeConfig:
    """Where the degradation shards run. Scores do not depend on it: every engine gives the same."""

    engine: Literal["local", "dask", "ray"] = "local"
    """local: shards one after another in this process; dask or ray: spread over that engine."""
    address: str | None = None
    """Dask scheduler (tcp://host:8786) or Ray cluster (ray://host:10001, auto) to use; None starts a
    local cluster of ``workers`` processes for the run. The run folder must be on storage the
    workers can read and write."""
    workers: int | None = None
    """Worker processes of a local cluster. None: one per visible GPU when shards claim GPUs, else
    2. On GPUs never more than the GPUs visible (each worker is pinned to its own)."""
    gpus_per_shard: float | None = None
    """GPUs each shard claims (Dask resource GPU, Ray num_gpus); None: 1 when CUDA is available
    here, else 0."""

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be positive, got {self.workers}")


BASELINES = ("random", "full", "longest", "shortest")  # need the tokenizer, no model
SCORED_BASELINES = ("pruned_loss",)  # need the scoring passes, no clusters

STAGE_CONFIGS = {"select": SelectConfig, "embed": EmbedConfig, "manifold": ManifoldConfig,
            "cluster": ClusterConfig, "score": ScoreConfig, "allocate": AllocateConfig,
            "concepts": ConceptConfig, "prune": PruneConfig, "distribute": DistributeConfig}


@dataclass
class Settings:
    """All stage configs of a selection run; YAML sections of the same names."""

    select: SelectConfig = field(default_factory=SelectConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    manifold: ManifoldConfig = field(default_factory=ManifoldConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    allocate: AllocateConfig = field(default_factory=AllocateConfig)
    concepts: ConceptConfig = field(default_factory=ConceptConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)

    def to_dict(self) -> dict:
        return {name: to_mapping(getattr(self, name)) for name in STAGE_CONFIGS}

    @classmethod
    def from_dict(cls, data: dict, where: str = "settings") -> Settings:
        from paser.config import SECTIONS

        unknown = sorted(set(data) - set(SECTIONS))  # recover/evaluate sections belong to other commands
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
        settings = cls(**{name: from_mapping(cfg, dict(data.get(name) or {}), f"{where}: {name}")
                          for name, cfg in STAGE_CONFIGS.items()})
        method = settings.select.method
        if method == "uniform":
            settings.allocate.method = "uniform"
        elif method == "no_ccg":
            settings.concepts.enabled = False
        elif method == "kmeans":
            settings.cluster.method = "kmeans"
        if settings.score.dtype == "auto":  # resolved once, here: workers and fingerprints see the dtype used
            settings.score.dtype = resolve_dtype("auto", scoring_device(settings.score))
        return settings

    @property
    def baseline(self) -> bool:
        """A method that selects without models (random, full, longest, shortest): only the data
        and token-count stages run."""
        return self.select.method in BASELINES

    @property
    def clustered(self) -> bool:
        """A method that runs every stage (PASER and its ablations), not a baseline."""
        return self.select.method not in BASELINES + SCORED_BASELINES

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict | None = None) -> Settings:
        """Settings from a YAML file (or defaults) with ``{section: {key: value}}`` overrides on top;
        override values of None are ignored."""
        data = read_yaml(path) if path is not None else {}
        where = str(path) if path is not None else "settings"
        for section, values in (overrides or {}).items():
            data.setdefault(section, {})
            data[section] = dict(data[section] or {}) | {k: v for k, v in values.items() if v is not None}
        return cls.from_dict(data, where)


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fresh(path: Path, fp: str) -> bool:
    marker = path.with_name(path.name + ".fp")
    return path.exists() and marker.is_file() and marker.read_text() == fp


def _seal(path: Path, fp: str) -> None:
    path.with_name(path.name + ".fp").write_text(fp)


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def record_stage(run: Path, stage: str, seconds: float, reused: bool) -> None:
    """Note a stage's wall time in timings.json (the manifest's per-stage table)."""
    path = run / "timings.json"
    timings = json.loads(path.read_text()) if path.is_file() else {}
    timings[stage] = {"seconds": round(seconds, 3), "reused": reused}
    path.write_text(json.dumps(timings, indent=2))


class _Stage:
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


# ---------------------------------------------------------------- data


def data_fingerprint(cfg: SelectConfig) -> str:
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
    return _hash(source, cfg.layout, cfg.field_map, cfg.strict)


def read_input_pool(cfg: SelectConfig) -> Pool:
    if cfg.data is None:
        from paser.suite import suite_pool

        return suite_pool(cfg.suite_size, cfg.seed)
    return load_pool(cfg.data, layout=cfg.layout, field_map=cfg.field_map, strict=cfg.strict, split=cfg.split)


def _stage_output(settings: Settings, run: Path, stage: str, make) -> Path:
    """The stage's output file in ``run``: reused when its fingerprint matches, else written by
    ``make(path, fingerprint)`` and sealed with the fingerprint; timed either way."""
    path = run / STAGE_OUTPUTS[stage]
    fp = stage_fingerprint(stage, settings, run)
    with _Stage(run, stage) as st:
        if _fresh(path, fp):
            st.reused = True
        else:
            make(path, fp)
            _seal(path, fp)
    return path


def stage_data(settings: Settings, run: Path) -> Path:
    """Validate the pool once and store it in the run folder."""

    def make(path: Path, fp: str) -> None:
        pool = read_input_pool(settings.select)
        frame = pd.DataFrame({
            "id": [r.id for r in pool.records],
            "instruction": [r.instruction for r in pool.records],
            "input": [r.input for r in pool.records],
            "response": [r.response for r in pool.records],
            "fields": [json.dumps(r.fields, ensure_ascii=False, default=str) for r in pool.records],
            "index": [r.index for r in pool.records],
            "context": [json.dumps(list(r.context), ensure_ascii=False) for r in pool.records],
        })
        _atomic_parquet(frame, path)
        (run / "data.json").write_text(json.dumps({
            "source": str(pool.source) if pool.source else "generated capability suite",
            "layout": pool.layout, "records": len(pool), "fingerprint": fp,
            "field_map": dataclasses.asdict(pool.field_map),
            "rejected": [dataclasses.asdict(r) for r in pool.rejected],
        }, indent=2))

    return _stage_output(settings, run, "data", make)


def dense_tokenizer(settings: Settings):
    """The dense model's tokenizer (scoring and recovery count tokens with it)."""
    from paser.models import load_model, load_tokenizer

    cfg = settings.select
    return (load_tokenizer(cfg.dense, cfg.trust_pickle)
            or load_model(cfg.dense, trust_pickle=cfg.trust_pickle).tokenizer)


def stage_tokens(settings: Settings, run: Path) -> Path:
    """Count every record's prompt and response tokens (the dense tokenizer, the template, the
    cutoff): what a token budget spends and what every method reports, models not needed."""
    from paser.degradation import token_table

    return _stage_output(settings, run, "tokens", lambda path, fp: _atomic_parquet(
        token_table(dense_tokenizer(settings), read_run_pool(run), settings.score), path))


def resolve_run_budget(settings: Settings, run: Path) -> tuple[int, str]:
    """The budget in its unit (records or tokens) for the run's pool (its tokens.parquet); a
    ConfigError when the pool cannot hold it or a token budget is below the shortest record. Runs
    right after the token count, before any embedding or model."""
    budget = parse_budget(settings.select.budget)
    tokens = pd.read_parquet(run / "tokens.parquet", columns=["n_tokens"])["n_tokens"]
    try:
        amount = budget.resolve(len(tokens), int(tokens.sum()))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if budget.tokens and len(tokens) and amount < int(tokens.min()):
        raise ConfigError(f"budget of {amount} tokens is smaller than the shortest record "
                          f"({int(tokens.min())} tokens under the {settings.score.cutoff}-token cutoff)")
    return amount, budget.unit


def read_run_pool(run: Path) -> list[Record]:
    frame = pd.read_parquet(run / "pool.parquet")
    contexts = frame["context"] if "context" in frame else ["[]"] * len(frame)  # runs made before chat layouts
    return [Record(id=row.id, instruction=row.instruction, input=row.input, response=row.response,
                   fields=json.loads(row.fields), index=int(row.index), context=tuple(json.loads(context)))
            for row, context in zip(frame.itertuples(), contexts)]


def _fp_of(path: Path) -> str:
    return path.with_name(path.name + ".fp").read_text()


# ---------------------------------------------------------------- embed and cluster


def stage_embed(settings: Settings, run: Path, cache_dir: Path | None = None) -> Path:
    from paser.embedding import SentenceEmbedder

    cfg = settings.embed
    embedder = SentenceEmbedder(cfg.model, cfg.batch_size, cfg.device, progress=settings.select.progress)

    def make(path: Path, fp: str) -> None:
        texts = instruction_texts(read_run_pool(run), cfg.include_input)
        np.save(path, embed_texts(texts, cfg, cache_dir, embedder=embedder))

    return _stage_output(settings, run, "embed", make)


def stage_cluster(settings: Settings, run: Path) -> Path:
    seed = settings.select.seed

    def make(path: Path, fp: str) -> None:
        x = np.load(run / "embeddings.npy")
        coords, eigenvalues = learn_manifold(x, settings.manifold, random_state=seed)
        np.savez(run / "manifold.npz", coords=coords, eigenvalues=eigenvalues)
        clusterer = SpectralClusterer.from_config(settings.cluster, seed, settings.select.progress).fit(
            coords, eigenvalues if settings.manifold.method == "diffusion" else None)
        ids = pd.read_parquet(run / "pool.parquet", columns=["id"])["id"]
        _atomic_parquet(pd.DataFrame({"id": ids, "cluster": clusterer.labels_}), path)
        (run / "cluster_fit.json").write_text(json.dumps({
            "k": int(clusterer.k_), "n_clusters": int(clusterer.n_clusters_),
            "knee_k": clusterer.knee_k_, "knee_band": clusterer.knee_band_,
            "k_selection": settings.cluster.k_selection, "eigengap_k": clusterer.eigengap_k_,
            "k_curve": clusterer.k_curve_, "eigenvalues": [float(v) for v in eigenvalues],
            "method": settings.cluster.method, "manifold": settings.manifold.method,
        }, indent=2))

    return _stage_output(settings, run, "cluster", make)


# ---------------------------------------------------------------- degradation


def _twin_folder(settings: Settings) -> Path:
    from paser.models import cache_dir, model_fingerprint

    cfg = settings.select
    prune_cfg = dataclasses.replace(settings.prune, ratio=cfg.prune_ratio)
    key = _hash(model_fingerprint(cfg.dense), to_mapping(prune_cfg))
    # pruned on a GPU, float rounding may rank near-equal groups differently: a twin of its own
    on = "" if twin_device(settings) == "cpu" else "-cuda"
    return cache_dir() / "twins" / f"{Path(str(cfg.dense)).name}-pruned-{key}{on}"


def twin_device(settings: Settings) -> str:
    """Where paser prunes its own twin: the scoring device (GPU 0 of a GPU machine), else CPU."""
    device = scoring_device(settings.score)
    return "cuda" if device.startswith("cuda") and settings.score.device in (None, "cuda") else device


def twin_reference(settings: Settings) -> str:
    """The pruned model: given, or paser's own prune of the dense model (made once, cached)."""
    cfg = settings.select
    if cfg.pruned is not None:
        return cfg.pruned
    folder = _twin_folder(settings)
    if not (folder / "paser_pruned.json").is_file():
        progress.announce(f"pruning {cfg.dense} by {cfg.prune_ratio:.0%} into paser's twin on "
                          f"{twin_device(settings)} (once; cached in {folder.parent})")
        prune_cfg = dataclasses.replace(settings.prune, ratio=cfg.prune_ratio)
        from paser.pruning import prune

        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
        prune(cfg.dense, tmp, prune_cfg, trust_pickle=cfg.trust_pickle, device=twin_device(settings))
        try:
            os.replace(tmp, folder)
        except OSError:
            # another process finished the same twin first: keep theirs
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            if not (folder / "paser_pruned.json").is_file():
                raise
    return str(folder)


@dataclass
class ScoringPlan:
    """One scoring run: its fingerprint, the two model references and the shards' record ranges.
    Small and picklable, so shards can be handed to Dask or Ray workers."""

    run: str
    fingerprint: str
    dense: str
    pruned: str
    shards: list[tuple[int, int]]

    @property
    def shard_dir(self) -> Path:
        return Path(self.run) / "scores" / self.fingerprint


def plan_scoring(settings: Settings, run: Path, pruned_ref: str) -> ScoringPlan:
    n = len(pd.read_parquet(run / "pool.parquet", columns=["id"]))
    return ScoringPlan(str(run), stage_fingerprint("score", settings, run, pruned_ref), settings.select.dense,
                       pruned_ref, shard_ranges(n, settings.score.shard_size))


_LOADED: dict = {}
_LOADED_LOCK = threading.Lock()


def scoring_device(config: ScoreConfig) -> str:
    """The device of this scoring process (see ``paser.devices.worker_device``): ``cpu`` or
    ``cuda:K`` as configured; otherwise, on a local Dask cluster whose workers are numbered, worker
    i takes GPU i modulo the GPUs it sees, even with ``device: cuda`` (Ray already narrows
    CUDA_VISIBLE_DEVICES to the GPU it granted); else CUDA when available, else CPU."""
    from paser.devices import visible_gpus, worker_device

    name = None
    if config.device in (None, "cuda") and visible_gpus():
        try:
            from distributed import get_worker

            name = get_worker().name
        except (ImportError, ValueError):
            pass
    return worker_device(config.device, name)


def loaded_pair(settings: Settings, plan: ScoringPlan):
    """The dense and pruned models of ``plan``, loaded once per process and reused for every shard
    this process scores (a Dask or Ray worker keeps them between shards)."""
    from paser.models import load_pair, model_fingerprint

    scfg = settings.score
    device = scoring_device(scfg)
    dtype = resolve_dtype(scfg.dtype, device)
    key = (model_fingerprint(plan.dense), model_fingerprint(plan.pruned), dtype, device,
           settings.select.trust_pickle)
    with _LOADED_LOCK:
        if key not in _LOADED:
            _LOADED.clear()
            progress.announce(f"loading {plan.dense} and {plan.pruned} on {device} ({dtype})")
            _LOADED[key] = load_pair(plan.dense, plan.pruned, dtype=dtype, device=device,
                                     trust_pickle=settings.select.trust_pickle)
        return _LOADED[key]


def release_models() -> None:
    """Drop the models ``loaded_pair`` keeps in this process."""
    with _LOADED_LOCK:
        _LOADED.clear()


def score_planned_shard(settings: Settings, plan: ScoringPlan, index: int) -> dict:
    """Score shard ``index`` of ``plan`` unless its file exists; returns a small report (record
    range, worker, seconds). A failure raises ``ShardError`` naming the shard and its records."""
    lo, hi = plan.shards[index]
    report = {"shard": index, "records": [lo, hi], "worker": f"{socket.gethostname()}:{os.getpid()}",
              "computed": False, "seconds": 0.0}
    if shard_path(plan.shard_dir, index).is_file():
        return report
    start = time.perf_counter()
    shown = progress.active(plan.fingerprint)  # a display in this process (local engine, --no-flow)
    on_batch = None if shown is None else (lambda n, tokens: shown.batch(index, n, tokens))
    try:
        dense, pruned = loaded_pair(settings, plan)
        records = read_run_pool(Path(plan.run))
        score_pool_shard(dense.model, pruned.model, dense.tokenizer, records, settings.score, plan.shard_dir, index,
                         on_batch)
    except PaserError:
        raise
    except Exception as err:
        ids = pd.read_parquet(Path(plan.run) / "pool.parquet", columns=["id"])["id"]
        raise ShardError(f"{plan.run}: scoring shard {index} (records {lo}..{hi - 1}, ids {ids[lo]!r}.."
                         f"{ids[hi - 1]!r}) failed: {type(err).__name__}: {err}",
                         transient=isinstance(err, OSError)) from err
    return report | {"computed": True, "seconds": round(time.perf_counter() - start, 3),
                     "models": {"dense": dense.describe(), "pruned": pruned.describe()}}


def finish_scoring(settings: Settings, plan: ScoringPlan, reports: list[dict], described: dict | None = None) -> Path:
    """Collect the finished shards into degradation.parquet, with models.json and scoring.json."""
    from paser.models import model_fingerprint

    run = Path(plan.run)
    scores = collect_shards(read_run_pool(run), settings.score, plan.shard_dir)
    _atomic_parquet(scores, run / "degradation.parquet")
    computed = [r for r in reports if r.get("computed")]
    described = described or (computed[0]["models"] if computed else {})
    (run / "models.json").write_text(json.dumps({
        which: {"reference": ref, "fingerprint": model_fingerprint(ref),
                "description": described.get(which, "reused finished shards")}
        for which, ref in (("dense", plan.dense), ("pruned", plan.pruned))}, indent=2))
    (run / "scoring.json").write_text(json.dumps({
        "fingerprint": plan.fingerprint, "shards": sorted(reports, key=lambda r: r["shard"])}, indent=2))
    _seal(run / "degradation.parquet", plan.fingerprint)
    release_models()
    return run / "degradation.parquet"


def _score_two_pass(settings: Settings, plan: ScoringPlan) -> dict:
    from paser.models import check_same_tokenizer, load_model, load_tokenizer

    cfg, scfg = settings.select, settings.score
    device = scoring_device(scfg)
    kwargs = dict(dtype=resolve_dtype(scfg.dtype, device), trust_pickle=cfg.trust_pickle, device=device)
    described = {}

    def load(which: str, reference: str):
        loaded = load_model(reference, **kwargs, tokenizer_from=plan.dense if which == "pruned" else None)
        described[which] = loaded.describe()
        return loaded.model

    tokenizer = load_tokenizer(plan.dense, cfg.trust_pickle) or load_model(plan.dense, **kwargs).tokenizer
    pruned_tok = load_tokenizer(plan.pruned, cfg.trust_pickle, tokenizer_from=plan.dense)
    if pruned_tok is not None:
        check_same_tokenizer(tokenizer, pruned_tok, plan.dense, plan.pruned)
    score_pool_two_pass(lambda: load("dense", plan.dense), lambda: load("pruned", plan.pruned), tokenizer,
                        read_run_pool(Path(plan.run)), scfg, plan.shard_dir, progress=cfg.progress)
    return described


def stage_twin(settings: Settings, run: Path) -> str:
    """The pruned model's reference, making paser's twin first when none was given (timed)."""
    with _Stage(run, "twin") as st:
        st.reused = settings.select.pruned is not None or (_twin_folder(settings) / "paser_pruned.json").is_file()
        return twin_reference(settings)


def scoring_progress(settings: Settings, plan: ScoringPlan) -> progress.ScoringProgress:
    """The scoring display of ``plan``, registered so that shards scored in this process report
    their batches to it until it is closed."""
    total = plan.shards[-1][1] if plan.shards else 0
    shards = f"{len(plan.shards)} shard{'s' if len(plan.shards) != 1 else ''}"
    progress.announce(f"scoring degradation of {total:,} records ({shards}, engine {settings.distribute.engine})")
    shown = progress.ScoringProgress(total, "degradation (JSD, both models)", settings.select.progress)
    progress.register(plan.fingerprint, shown)
    return shown


def stage_score(settings: Settings, run: Path) -> Path:
    """Score every record in this process (the flow maps the same shards over workers instead)."""
    path = run / "degradation.parquet"
    pruned_ref = stage_twin(settings, run)
    with _Stage(run, "score") as st:
        plan = plan_scoring(settings, run, pruned_ref)
        if _fresh(path, plan.fingerprint):
            st.reused = True
            return path
        if settings.score.two_pass:
            return finish_scoring(settings, plan, [], _score_two_pass(settings, plan))
        reports = []
        with scoring_progress(settings, plan) as shown:
            for i, (lo, hi) in enumerate(plan.shards):
                reports.append(score_planned_shard(settings, plan, i))
                shown.shard_done(i, hi - lo, reports[-1]["computed"])
        return finish_scoring(settings, plan, reports)


# ---------------------------------------------------------------- fingerprints


STAGE_OUTPUTS = {"data": "pool.parquet", "tokens": "tokens.parquet", "embed": "embeddings.npy",
                 "cluster": "clusters.parquet", "score": "degradation.parquet"}


def stage_fingerprint(stage: str, settings: Settings, run: Path, pruned_ref: str | None = None) -> str:
    """What a stage's output depends on, computed without running it; needs the earlier stages'
    outputs (and, for ``score``, the pruned model's reference)."""
    if stage == "data":
        return data_fingerprint(settings.select)
    if stage == "embed":
        from paser.embedding import SentenceEmbedder

        cfg = settings.embed
        return _hash(_fp_of(run / "pool.parquet"), to_mapping(cfg), SentenceEmbedder(cfg.model).fingerprint())
    if stage == "tokens":
        from paser.models import model_fingerprint

        sc = settings.score
        return _hash(_fp_of(run / "pool.parquet"), model_fingerprint(settings.select.dense), sc.template, sc.cutoff)
    if stage == "cluster":
        return _hash(_fp_of(run / "embeddings.npy"), to_mapping(settings.manifold), to_mapping(settings.cluster),
                     settings.select.seed)
    if stage == "score":
        from paser.models import model_fingerprint

        ids = pd.read_parquet(run / "pool.parquet", columns=["id"])["id"].tolist()
        score = dataclasses.replace(settings.score, dtype=resolve_dtype(settings.score.dtype,
                                                                        scoring_device(settings.score)))
        fp = scoring_fingerprint(score, model_fingerprint(settings.select.dense),
                                 model_fingerprint(pruned_ref), ids)
        return _hash(fp, _fp_of(run / "pool.parquet"))
    raise ValueError(f"no fingerprint for stage {stage!r}; known: {list(STAGE_OUTPUTS)}")


def stage_state(stage: str, settings: Settings, run: Path, pruned_ref: str | None = None) -> tuple[str, bool]:
    """The stage's fingerprint and whether its output in ``run`` already matches it."""
    fp = stage_fingerprint(stage, settings, run, pruned_ref)
    return fp, output_fresh(stage, run, fp)


def output_fresh(stage: str, run: Path, fp: str) -> bool:
    """Whether the stage's output in ``run`` was made for fingerprint ``fp``."""
    return _fresh(run / STAGE_OUTPUTS[stage], fp)


# ---------------------------------------------------------------- select and write


def record_concepts_cached(run: Path, records: list[Record], config: ConceptConfig) -> list[list[str]]:
    """Concepts of every record, kept in the run folder: re-selecting at another budget does not
    extract them again (0.63 s per 5,000 Alpaca records on the 2-core machine)."""
    path = run / "concepts.parquet"
    fp = _hash(_fp_of(run / "pool.parquet"), config.max_concepts, config.max_phrase_words)
    if _fresh(path, fp):
        return [list(c) for c in pd.read_parquet(path)["concepts"]]
    concepts = [record_concepts(r, config) for r in records]
    _atomic_parquet(pd.DataFrame({"id": [r.id for r in records], "concepts": concepts}), path)
    _seal(path, fp)
    return concepts


def selection_table(settings: Settings, run: Path) -> tuple[list[Record], pd.DataFrame]:
    """The run's records and the table selection works on: degradation, cluster and concepts per record."""
    records = read_run_pool(run)
    table = pd.read_parquet(run / "degradation.parquet").merge(
        pd.read_parquet(run / "clusters.parquet"), on="id", how="left", validate="one_to_one")
    if table["cluster"].isna().any() or len(table) != len(records):
        raise PaserError(f"{run}: scores and clusters cover different records; rerun without --out reuse")
    table["concepts"] = record_concepts_cached(run, records, settings.concepts)
    return records, table


def select_from(settings: Settings, table: pd.DataFrame, budget: float | int | str | None = None):
    """Allocation, IES ranking and the concept filter over a selection table; writes nothing."""
    from paser.selection import Selector

    order = {"random_order": "random", "no_cost": "signal"}.get(settings.select.method, "ies")
    return Selector(settings.select.budget if budget is None else budget, settings.allocate.method,
                    use_concepts=settings.concepts.enabled, order=order, random_state=settings.select.seed,
                    signal=settings.score.signal).fit(table).result_


def selection_summary(method: str, amount: int, unit: str, selected: pd.DataFrame) -> dict:
    """What every method's clusters.json and manifest say about the selection: the budget in its
    unit and the selection in records, tokens (prompt + response) and response tokens."""
    return {"method": method, "budget": int(amount), "budget_unit": unit, "selected": int(len(selected)),
            "selected_tokens": int(selected["n_tokens"].sum()),
            "selected_response_tokens": int(selected["n_response"].sum())}


def _write_selected(run: Path, records: list[Record], selected: pd.DataFrame, extra) -> None:
    """selected.jsonl: each selected record in the input's layout plus paser's fields, in rank order."""
    from paser.data import write_jsonl

    by_id = {r.id: r for r in records}
    write_jsonl(run / "selected.jsonl", [
        dict(by_id[row.id].fields) | {"paser_id": row.id} | extra(row)
        | {"paser_tokens": int(row.n_tokens), "paser_rank": int(row.rank)}
        for row in selected.itertuples()])


def stage_select(settings: Settings, run: Path) -> Path:
    """Allocation, IES ranking and the concept filter over the saved scores; writes the outputs."""
    with _Stage(run, "select"):
        records, table = selection_table(settings, run)
        result = select_from(settings, table)
        out = result.table
        _atomic_parquet(out.assign(concepts=out["concepts"].map(list)), run / "scores.parquet")
        _write_selected(run, records, result.selected, lambda row: {
            "paser_cluster": int(row.cluster), "paser_jsd": float(row.jsd), "paser_loss_gap": float(row.loss_gap),
            "paser_ies": float(row.ies)})
        fit = json.loads((run / "cluster_fit.json").read_text())
        names = cluster_names(out["cluster"], out["concepts"])
        (run / "clusters.json").write_text(json.dumps(
            selection_summary(settings.select.method, result.budget, result.unit, result.selected) | {
                "signal": result.signal, "K": fit["k"], "n_clusters": fit["n_clusters"], "knee_k": fit["knee_k"],
                "knee_band": fit.get("knee_band"), "k_selection": fit.get("k_selection", "knee"),
                "eigengap_k": fit["eigengap_k"], "k_curve": fit["k_curve"],
                "clusters": [{"cluster": c, "name": names.get(c, ""), "size": int(result.sizes[c]),
                              "cds": float(result.cds[c]),
                              "allocation": int(result.allocation[c]),
                              "selected": int(result.selected_per_cluster[c]),
                              "selected_tokens": int(result.selected_tokens_per_cluster[c]),
                              "rejected": int(result.rejected_per_cluster[c])}
                             for c in range(len(result.sizes))],
            }, indent=2))
    return run / "selected.jsonl"


def baseline_order(settings: Settings, table: pd.DataFrame) -> np.ndarray:
    """Row indices of ``table`` in the order a baseline takes them; ties go to the earlier record,
    and pruned_loss leaves out the records it could not score."""
    method = settings.select.method
    index = np.arange(len(table))
    if method == "random":
        return np.random.default_rng(settings.select.seed).permutation(len(table))
    if method == "longest":  # response tokens kept, then the whole response's characters
        chars = table["response_chars"].to_numpy()
        return np.lexsort((index, -chars, -table["n_response"].to_numpy()))
    if method == "shortest":
        return np.lexsort((index, table["n_tokens"].to_numpy()))
    if method == "pruned_loss":
        nll = table["nll_pruned"].to_numpy(dtype=float)
        scored = np.flatnonzero(np.isfinite(nll))
        return scored[np.lexsort((scored, -nll[scored]))]
    return index  # full


def stage_baseline(settings: Settings, run: Path) -> Path:
    """The baselines, in the same output files as PASER (selected.jsonl in the input's layout,
    scores.parquet, clusters.json with no clusters) so that recovery and evaluation treat every arm
    alike: full takes every record; random, longest, shortest and pruned_loss take records in their
    order while the next one fits the budget (records or tokens)."""
    method = settings.select.method
    with _Stage(run, "select"):
        records = read_run_pool(run)
        table = pd.read_parquet(run / "tokens.parquet")
        if method == "pruned_loss":
            scores = pd.read_parquet(run / "degradation.parquet").drop(columns=["n_prompt", "n_response", "truncated"])
            table = table.merge(scores, on="id", how="left", validate="one_to_one")
        table["response_chars"] = [len(r.response) for r in records]
        order = baseline_order(settings, table)
        amount, unit = resolve_run_budget(settings, run)
        if method == "full":
            chosen = order.tolist()
            amount = int(table["n_tokens"].sum()) if unit == "tokens" else len(table)
        else:
            cost = table["n_tokens"].to_numpy() if unit == "tokens" else np.ones(len(table), dtype=np.int64)
            chosen = take_in_order(order, cost, amount)
        rank = np.zeros(len(records), dtype=np.int64)
        rank[chosen] = np.arange(1, len(chosen) + 1)
        table["status"] = np.where(rank > 0, "selected", "unvisited")
        table["rank"] = rank
        if method == "pruned_loss":
            table.loc[~np.isfinite(table["nll_pruned"]), "status"] = "unscored"
        _atomic_parquet(table.drop(columns=["response_chars"]), run / "scores.parquet")
        selected = table[rank > 0].sort_values("rank")
        _write_selected(run, records, selected, lambda row: {})
        (run / "clusters.json").write_text(json.dumps(
            selection_summary(method, amount, unit, selected) | {"clusters": []}, indent=2))
    return run / "selected.jsonl"


def preflight(settings: Settings) -> None:
    """Check what can be checked cheaply before any stage starts, so a bad input fails in a
    second with one clear message: the pool, a record budget against its size, the model
    references, and (when the pruned model is given) that the two tokenizers match. A token budget
    is checked once the tokens are counted, the stage right after the data."""
    from paser.models import check_same_tokenizer, load_tokenizer

    cfg = settings.select
    pool = read_input_pool(cfg)
    budget = parse_budget(cfg.budget)
    if not budget.tokens:
        budget.resolve(len(pool))
    # loading a tokenizer resolves its model reference: a missing or refused model fails here
    dense_tok = load_tokenizer(cfg.dense, cfg.trust_pickle)
    if settings.baseline:
        return  # random, full, longest and shortest use the tokenizer only
    if cfg.pruned is not None:
        # an LLM-Pruner checkpoint is imported here (once, cached), so a refusal comes before any stage
        pruned_tok = load_tokenizer(cfg.pruned, cfg.trust_pickle, tokenizer_from=cfg.dense)
        if dense_tok is not None and pruned_tok is not None:
            check_same_tokenizer(dense_tok, pruned_tok, cfg.dense, cfg.pruned)


def run_folder(settings: Settings) -> Path:
    run = Path(settings.select.out)
    run.mkdir(parents=True, exist_ok=True)
    (run / "settings.json").write_text(json.dumps(settings.to_dict(), indent=2))
    return run


def run_selection(settings: Settings, cache_dir: Path | None = None) -> Path:
    """Every stage in order, without Prefect (the flow runs the same functions as tasks)."""
    from paser.report import write_report

    run = run_folder(settings)
    stage_data(settings, run)
    stage_tokens(settings, run)
    resolve_run_budget(settings, run)
    if settings.clustered:
        stage_embed(settings, run, cache_dir)
        stage_cluster(settings, run)
    if not settings.baseline:
        stage_score(settings, run)
    (stage_select if settings.clustered else stage_baseline)(settings, run)
    write_report(settings, run)
    return run
