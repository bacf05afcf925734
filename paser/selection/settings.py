"""The settings of a selection run, built in one place for every entry point.

``Settings`` holds one config per stage (YAML sections of the same names); ``build_settings``
layers defaults, a YAML file, ``{section: {key: value}}`` overrides and named arguments, and is
what ``paser select``, ``paser.select``, the Prefect flows and ``paser run`` all call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from paser.config import SECTIONS, from_mapping, read_yaml, to_mapping
from paser.devices import resolve_dtype, scoring_device
from paser.errors import ConfigError
from paser.models.pruning import PruneConfig
from paser.selection.adaptive import AdaptiveConfig
from paser.selection.allocation import AllocateConfig
from paser.selection.budget import parse_budget
from paser.selection.clustering import ClusterConfig
from paser.selection.concepts import ConceptConfig
from paser.selection.degradation import ScoreConfig
from paser.selection.embedding import EmbedConfig
from paser.selection.manifold import ManifoldConfig
from paser.selection.methods import Method, method_of
from paser.selection.stratified import SampleConfig


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
    amount ("40000tok") or a fraction of the pool's tokens ("0.2tok"); see paser.selection.budget."""
    method: str = "paser"
    """A registered selection method (paser.selection.methods): paser; strat, tempered stratified
    selection (cluster shares by size and tempered CDS, records drawn by tempered IES,
    near-duplicates skipped: the ``sample`` section); adaptive, the budget spent in rounds of
    recovery whose cluster shares follow the gaps that remain (the ``adaptive`` section: selection
    plans the rounds and draws the first, ``paser recover`` on its selected.jsonl trains them and
    draws the rest); the baselines random (seeded), full (every record), longest (longest
    responses first), shortest (fewest tokens first), pruned_loss (highest response NLL under the
    pruned model first); or an ablation of PASER: uniform allocation, random_order inside
    clusters instead of IES, no_cost (IES without its compute-cost denominator), no_ccg (no
    concept filter), kmeans clusters instead of NMF. An ablation sets its stage's option
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
    pictures: bool = True
    """Draw the report's pictures (cluster map with its t-SNE, allocation, rejections); False writes
    the report without them."""

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


STAGE_CONFIGS = {"select": SelectConfig, "embed": EmbedConfig, "manifold": ManifoldConfig,
            "cluster": ClusterConfig, "score": ScoreConfig, "allocate": AllocateConfig, "sample": SampleConfig,
            "adaptive": AdaptiveConfig, "concepts": ConceptConfig, "prune": PruneConfig,
            "distribute": DistributeConfig}


@dataclass
class Settings:
    """All stage configs of a selection run; YAML sections of the same names."""

    select: SelectConfig = field(default_factory=SelectConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    manifold: ManifoldConfig = field(default_factory=ManifoldConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    allocate: AllocateConfig = field(default_factory=AllocateConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    concepts: ConceptConfig = field(default_factory=ConceptConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)

    def to_dict(self) -> dict:
        return {name: to_mapping(getattr(self, name)) for name in STAGE_CONFIGS}

    @classmethod
    def from_dict(cls, data: dict, where: str = "settings") -> Settings:
        unknown = sorted(set(data) - set(SECTIONS))  # recover/evaluate sections belong to other commands
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
        settings = cls(**{name: from_mapping(cfg, dict(data.get(name) or {}), f"{where}: {name}")
                          for name, cfg in STAGE_CONFIGS.items()})
        try:
            method = method_of(settings.select.method)
        except KeyError as err:
            raise ConfigError(f"{where}: select.method: {err.args[0]}") from None
        method.configure(settings)
        if settings.score.per_cluster is not None and method.scores(settings) == "all":
            raise ConfigError(f"{where}: score.per_cluster scores a sample of each cluster, but --method "
                              f"{method.name} needs every record's score; it serves --method strat with "
                              "sample.ies_temperature 0")
        # resolved once, here, where this machine scores (workers and fingerprints see the dtype used);
        # for a remote cluster the flow asks one of its workers (flows.runners.worker_dtype)
        if settings.score.dtype == "auto" and not settings.remote_scoring:
            settings.score.dtype = resolve_dtype("auto", scoring_device(settings.score.device))
        return settings

    @property
    def method(self) -> Method:
        """The selection method ``select.method`` names (paser.selection.methods)."""
        return method_of(self.select.method)

    @property
    def clustered(self) -> bool:
        """Whether the method needs embeddings and clusters (PASER, its ablations, strat, adaptive)."""
        return self.method.clusters

    @property
    def remote_scoring(self) -> bool:
        """Whether shards are scored on a remote cluster (Dask or Ray at ``distribute.address``)."""
        return self.distribute.engine != "local" and self.distribute.address is not None

    @property
    def scored(self) -> bool:
        """Whether degradation scoring runs (the method needs some record's score)."""
        return self.method.scores(self) != "none"

    @property
    def sampled_scores(self) -> bool:
        """Whether scoring covers a per-cluster sample (``score.per_cluster``) instead of every record."""
        return self.method.scores(self) == "sample"

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



def build_settings(data: str | None = None, dense: str | None = None, pruned: str | None = None,
                   prune_ratio: float | None = None, budget: str | float | int | None = None,
                   out: str | None = None, config: str | Path | None = None, trust_pickle: bool | None = None,
                   seed: int | None = None, engine: str | None = None, address: str | None = None,
                   workers: int | None = None, overrides: dict | None = None) -> Settings:
    """The run's settings: defaults, then ``config``, then ``overrides``, then the named arguments
    (those left as None keep what is below them)."""
    top = {"data": data, "dense": dense, "pruned": pruned, "prune_ratio": prune_ratio,
           "budget": parse_budget(budget).setting if budget is not None else None, "out": out,
           "trust_pickle": trust_pickle, "seed": seed}
    merged = {section: dict(values or {}) for section, values in (overrides or {}).items()}
    merged["select"] = merged.get("select", {}) | {k: v for k, v in top.items() if v is not None}
    distribute = {"engine": engine, "address": address, "workers": workers}
    merged["distribute"] = merged.get("distribute", {}) | {k: v for k, v in distribute.items() if v is not None}
    return Settings.load(config, merged)
