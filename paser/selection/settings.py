"""The settings of a selection run, built in one place for every entry point.

``Settings`` holds one config per stage (YAML sections of the same names); ``build_settings``
layers defaults, a YAML file, ``{section: {key: value}}`` overrides and named arguments, and is
what ``paser select``, ``paser.select``, the Prefect flows and ``paser run`` all call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from paser.config import SECTIONS, from_mapping, read_yaml, shared_sections, to_mapping
from paser.data.prompts import PromptFormat
from paser.devices import resolve_dtype, scoring_device
from paser.errors import ConfigError
from paser.models.config import PruneConfig
from paser.selection.budget import parse_budget
from paser.selection.configs import (
    STAGE_CONFIGS,
    AdaptiveConfig,
    AllocateConfig,
    ClusterConfig,
    ConceptConfig,
    DistributeConfig,
    EmbedConfig,
    ManifoldConfig,
    SampleConfig,
    ScoreConfig,
    SelectConfig,
)
from paser.selection.methods import Method, method_of


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
        """The settings as YAML sections; the prompt format is a section of its own."""
        sections = {name: to_mapping(getattr(self, name)) for name in STAGE_CONFIGS}
        return {"prompt": sections["score"].pop("prompt")} | sections

    @property
    def prompt(self) -> PromptFormat:
        """The prompt format (the ``prompt`` section) that scoring and the token budget count in."""
        return self.score.prompt

    @classmethod
    def from_dict(cls, data: dict, where: str = "settings") -> Settings:
        unknown = sorted(set(data) - set(SECTIONS))  # recover/evaluate sections belong to other commands
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
        settings = cls(**{name: from_mapping(cfg, dict(data.get(name) or {}), f"{where}: {name}",
                                             shared_sections(cfg, data, where))
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
        # for a remote cluster the flow asks one of its workers (paser.flows.runners.worker_dtype)
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
