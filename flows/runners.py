"""Where the degradation shards run: Prefect task runners for this process, Dask or Ray.

``task_runner(cfg)`` builds the runner the scoring subflow uses; ``shard_resources(cfg)`` is the
context under which shards are submitted, so each claims the GPUs it needs (Dask resource
``GPU``, Ray ``num_gpus``) and a GPU worker runs one shard at a time.
"""

from __future__ import annotations

import contextlib

from paser.errors import ConfigError
from paser.settings import DistributeConfig


def _require(module: str, extra: str, engine: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ConfigError(f"engine {engine!r} needs the '{extra}' extra: pip install 'paser[{extra}]'") from None


def gpus_per_shard(cfg: DistributeConfig) -> float:
    if cfg.gpus_per_shard is not None:
        return cfg.gpus_per_shard
    from paser.devices import visible_gpus

    return 1.0 if visible_gpus() else 0.0


def local_dask_cluster(cfg: DistributeConfig) -> dict:
    """Arguments of the local Dask cluster: on GPUs one worker per visible GPU (or as many as
    asked, never more), each offering one GPU resource; numbered workers pick their own GPU (see
    ``paser.devices.scoring_device``)."""
    from paser.devices import local_workers, visible_gpus

    gpus = gpus_per_shard(cfg)
    kwargs = {"n_workers": local_workers(cfg.workers, visible_gpus(), bool(gpus)), "threads_per_worker": 1,
              "processes": True, "dashboard_address": None}
    if gpus:
        kwargs["resources"] = {"GPU": 1}
    return kwargs


def task_runner(cfg: DistributeConfig):
    """local: one shard after another in this process (the models are loaded once); dask or ray:
    the scheduler or cluster at ``cfg.address``, else a local cluster of ``cfg.workers`` processes."""
    if cfg.engine == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)
    if cfg.engine == "dask":
        prefect_dask = _require("prefect_dask", "dask", "dask")
        if cfg.address:
            return prefect_dask.DaskTaskRunner(address=cfg.address)
        return prefect_dask.DaskTaskRunner(cluster_kwargs=local_dask_cluster(cfg))
    if cfg.engine == "ray":
        prefect_ray = _require("prefect_ray", "ray", "ray")
        if cfg.address:
            return prefect_ray.RayTaskRunner(address=cfg.address)
        return prefect_ray.RayTaskRunner(init_kwargs={"num_cpus": cfg.workers or 2, "include_dashboard": False})
    raise ConfigError(f"distribute.engine must be local, dask or ray, got {cfg.engine!r}")


def shard_resources(cfg: DistributeConfig):
    """The context to submit shards under: the GPUs each one claims on Dask or Ray."""
    gpus = gpus_per_shard(cfg) if cfg.engine != "local" else 0
    if not gpus:
        return contextlib.nullcontext()
    if cfg.engine == "dask":
        import dask

        return dask.annotate(resources={"GPU": gpus})
    from prefect_ray.context import remote_options

    return remote_options(num_gpus=gpus)
