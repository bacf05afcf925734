"""The pruning flow: ``paser prune --flow`` through Prefect, so pruning shows up beside selection runs."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from paser.config import load_config
from paser.models.config import PruneConfig
from paser.models.pruning import PruneResult
from paser.models.pruning import prune as prune_model


@task(name="prune", cache_policy=NO_CACHE)
def prune(model: str, out: str, config: PruneConfig, export_pickle: str | None, trust_pickle: bool,
          dtype: str, device: str | None) -> PruneResult:
    return prune_model(model, out, config, export_pickle=export_pickle, trust_pickle=trust_pickle, dtype=dtype,
                       device=device)


@flow(name="paser-prune")
def prune_flow(model: str = "smollm2-135m-instruct", out: str = "runs/pruned", config: str | None = None,
               overrides: dict | None = None, export_pickle: str | None = None, trust_pickle: bool = False,
               dtype: str = "float32", device: str | None = None) -> PruneResult:
    """Prune attention heads and MLP channels of ``model`` (LLM-Pruner block-wise) into ``out``.

    ``config`` is a YAML file whose ``prune`` section is read; ``overrides`` are PruneConfig fields on top.
    """
    cfg = load_config(PruneConfig, config, "prune", overrides)
    return prune(model, str(Path(out)), cfg, export_pickle, trust_pickle, dtype, device)

