"""Where the degradation shards run: Prefect task runners for this process, Dask or Ray.

``task_runner(cfg)`` builds the runner the scoring subflow uses; ``shard_resources(cfg)`` is the
context under which shards are submitted, so each claims the GPUs it needs (Dask resource
``GPU``, Ray ``num_gpus``) and a GPU worker runs one shard at a time. Whether shards claim GPUs is
decided by the machines that score: this one for a local cluster, the workers of a remote one.
"""

from __future__ import annotations

import contextlib

from paser.errors import ConfigError
from paser.selection.configs import DistributeConfig


def _require(module: str, extra: str, engine: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ConfigError(f"engine {engine!r} needs the '{extra}' extra: pip install 'paser[{extra}]'") from None


def gpus_per_shard(cfg: DistributeConfig) -> float:
    """GPUs each shard claims: as configured, else 1 when the machines that score have GPUs: this
    one for a local engine or cluster, the cluster's workers for a remote one (a CPU launcher in
    front of GPU workers must still have each shard claim its GPU)."""
    if cfg.gpus_per_shard is not None:
        return cfg.gpus_per_shard
    if cfg.engine != "local" and cfg.address:
        return 1.0 if cluster_gpus(cfg) else 0.0
    from paser.devices import visible_gpus

    return 1.0 if visible_gpus() else 0.0


def cluster_gpus(cfg: DistributeConfig) -> float:
    """GPUs the remote cluster at ``cfg.address`` offers: Dask workers' ``GPU`` resources (start them
    with ``--resources GPU=1``), Ray's cluster resources."""
    if cfg.engine == "dask":
        distributed = _require("distributed", "dask", "dask")
        from paser.devices import visible_gpus

        with distributed.Client(cfg.address, timeout=30) as client:
            workers = client.scheduler_info()["workers"].values()
            declared = float(sum(w.get("resources", {}).get("GPU", 0) for w in workers))
            if not declared and any(client.run(visible_gpus).values()):
                # without the resource no shard claims a GPU, and a worker's threads would score
                # several shards on one GPU at once
                raise ConfigError(f"the Dask workers at {cfg.address} see GPUs but declare no GPU resource: start "
                                  "each with --resources GPU=1 (one per GPU), or set distribute.gpus_per_shard: 0 "
                                  "to score on their CPUs")
        return declared
    ray = _require("ray", "ray", "ray")
    ray.init(address=cfg.address, ignore_reinit_error=True, include_dashboard=False)
    try:
        return float(ray.cluster_resources().get("GPU", 0))
    finally:
        ray.shutdown()  # the task runner connects on its own


def prefect_api_of_this_process() -> str | None:
    """The Prefect API this process reports to: PREFECT_API_URL, or the temporary server Prefect
    started here when none is set (None before it has started)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the one per process, not a new one
        url = server.api_url if server.running else None
    return url or None


def worker_environment() -> dict[str, str]:
    """Environment variables of a local cluster's workers: this process's Prefect API. Each shard's
    task run reports to it; a worker without it starts a temporary Prefect server of its own (seconds
    at start-up, and a process that outlives the cluster's close until it is killed)."""
    url = prefect_api_of_this_process()
    return {"PREFECT_API_URL": url} if url else {}


def local_dask_cluster(cfg: DistributeConfig) -> dict:
    """Arguments of the local Dask cluster: on GPUs one worker per visible GPU (or as many as
    asked, never more), each offering one GPU resource; numbered workers pick their own GPU (see
    ``paser.devices.scoring_device``)."""
    from paser.devices import local_workers, visible_gpus

    gpus = gpus_per_shard(cfg)
    kwargs = {"n_workers": local_workers(cfg.workers, visible_gpus(), bool(gpus)), "threads_per_worker": 1,
              "processes": True, "dashboard_address": None, "env": worker_environment()}
    if gpus:
        kwargs["resources"] = {"GPU": 1}
    return kwargs


def scoring_dtype_here(device: str | None) -> str:
    """The dtype ``auto`` means on this process's scoring device (run on a worker by ``worker_dtype``)."""
    from paser.devices import resolve_dtype, scoring_device

    return resolve_dtype("auto", scoring_device(device))


def worker_dtype(cfg: DistributeConfig, device: str | None) -> str:
    """What ``score.dtype: auto`` means on the workers of the remote cluster at ``cfg.address``,
    asked of one of them (claiming a GPU as a shard would): the launcher's devices do not decide."""
    gpus = gpus_per_shard(cfg)
    if cfg.engine == "dask":
        distributed = _require("distributed", "dask", "dask")
        with distributed.Client(cfg.address, timeout=30) as client:
            return client.submit(scoring_dtype_here, device, resources={"GPU": gpus} if gpus else None,
                                 pure=False).result()
    ray = _require("ray", "ray", "ray")
    ray.init(address=cfg.address, ignore_reinit_error=True, include_dashboard=False)
    try:
        return ray.get(ray.remote(num_gpus=gpus)(scoring_dtype_here).remote(device))
    finally:
        ray.shutdown()


def local_ray_cluster(cfg: DistributeConfig) -> dict:
    """``ray.init`` arguments of a local Ray cluster: on GPUs every visible GPU and a CPU for each
    (or as many workers as asked, never fewer CPUs than GPUs), else ``workers`` CPUs (2)."""
    from paser.devices import local_workers, visible_gpus

    gpus = gpus_per_shard(cfg)
    kwargs = {"num_cpus": local_workers(cfg.workers, visible_gpus(), bool(gpus)), "include_dashboard": False,
              "runtime_env": {"env_vars": worker_environment()}}
    if gpus:
        kwargs |= {"num_gpus": visible_gpus(), "num_cpus": max(kwargs["num_cpus"], visible_gpus())}
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
        return prefect_ray.RayTaskRunner(init_kwargs=local_ray_cluster(cfg))
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

    # a GPU task's worker process exits after one call by default (max_calls=1), and with it the two
    # models it loaded: 0 keeps the process, so each worker loads the pair once for all its shards
    return remote_options(num_gpus=gpus, max_calls=0)


def release_workers(cfg: DistributeConfig) -> None:
    """After scoring on a remote Dask cluster: every worker drops the models it kept for its shards
    (and its CUDA cache), so the cluster's GPUs are free for the next job. A local cluster ends with
    the run; a Ray worker belongs to the run's Ray job and ends with it."""
    if cfg.engine != "dask" or not cfg.address:
        return
    distributed = _require("distributed", "dask", "dask")
    from paser.selection.scoring import release_models

    with distributed.Client(cfg.address, timeout=30) as client:
        client.run(release_models)
