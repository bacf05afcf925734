"""Devices and precision, decided in one place: which device a model runs on, in which dtype, and
how many local scoring workers share the visible GPUs.

``auto`` (the default dtype of scoring, recovery and evaluation) means bfloat16 on a CUDA device
that supports it and float32 everywhere else: on CPUs without bf16 instructions bf16 is much
slower than fp32, and fp16 is never chosen (NaN losses on Llama-2 for LLM-Pruner's users).
"""

from __future__ import annotations

import torch

from paser.errors import ConfigError


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_of(model) -> torch.device:
    """The device a model's weights are on (where its inputs must go)."""
    return next(model.parameters()).device


def default_device() -> str:
    return "cuda" if visible_gpus() else "cpu"


def auto_dtype(device: str | torch.device) -> str:
    """bfloat16 on a CUDA device with native bf16 (compute capability 8.0 and up: Ampere, Hopper,
    ...), else float32. The device asked for is the one checked, not the current one, and
    emulated bf16 (V100, T4: torch's ``is_bf16_supported`` says yes by default) does not count:
    there it is slower than float32."""
    if not str(device).startswith("cuda") or not visible_gpus():
        return "float32"
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if getattr(torch.version, "hip", None):  # ROCm: its capability numbers are not NVIDIA's
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        native = torch.cuda.get_device_capability(index) >= (8, 0)
    return "bfloat16" if native else "float32"


def resolve_dtype(dtype: str | None, device: str | torch.device) -> str:
    """``dtype`` itself, or for ``auto`` (and None) the one ``auto_dtype`` picks for ``device``."""
    return auto_dtype(device) if dtype in (None, "auto") else dtype


def worker_device(requested: str | None, worker: int | None = None, n_gpus: int | None = None) -> str:
    """The device one scoring process uses. ``cpu`` and an indexed ``cuda:K`` are taken as given.
    ``cuda`` or None: on the numbered worker ``worker`` of a local cluster, GPU ``worker`` modulo
    the GPUs visible (each worker its own GPU), else ``cuda`` when any GPU is visible, else CPU."""
    n_gpus = visible_gpus() if n_gpus is None else n_gpus
    if requested not in (None, "cuda"):
        return requested
    if n_gpus == 0:
        if requested == "cuda":
            raise ConfigError("score.device is 'cuda' but no CUDA device is visible")
        return "cpu"
    return f"cuda:{worker % n_gpus}" if isinstance(worker, int) else "cuda"


def scoring_device(requested: str | None) -> str:
    """The device of this scoring process for ``score.device`` = ``requested``: ``cpu`` or
    ``cuda:K`` as given; otherwise, inside a Dask worker that sees several GPUs, its own one: worker
    i of a local cluster (numbered) takes GPU i, a worker of a remote cluster (named by its address)
    the GPU of its rank among the workers on its host, both modulo the GPUs it sees (a worker whose
    CUDA_VISIBLE_DEVICES holds one GPU, as dask-cuda and Ray arrange, takes that one); else CUDA
    when available, else CPU."""
    index = None
    if requested in (None, "cuda") and visible_gpus() > 1:
        index = dask_worker_index()
    return worker_device(requested, index)


def dask_worker_index() -> int | None:
    """This process's index among the Dask workers that share its GPUs: its number on a local
    cluster, else its rank by address among the workers on its host; None outside a Dask worker."""
    try:
        from distributed import get_client, get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    if isinstance(worker.name, int):
        return worker.name
    workers = get_client().scheduler_info()["workers"]
    host = workers[worker.address]["host"]
    return sorted(a for a, w in workers.items() if w["host"] == host).index(worker.address)


def local_workers(asked: int | None, n_gpus: int, on_gpus: bool) -> int:
    """Worker processes of a local cluster: on GPUs one per visible GPU, or the number asked but
    never more than the GPUs there are (two workers on one GPU would each load both models); on
    CPUs the number asked, else 2."""
    if not on_gpus:
        return asked or 2
    if n_gpus == 0:
        raise ConfigError("shards claim GPUs (distribute.gpus_per_shard) but no CUDA device is visible; "
                          "set distribute.gpus_per_shard: 0 to score on CPUs")
    return min(asked or n_gpus, n_gpus)
