"""Devices and precision without a GPU: the auto dtype, worker-to-GPU mapping and local cluster
sizes under faked device counts, and forward passes that build no KV cache."""

from __future__ import annotations

import types

import pytest
import torch

import paser.devices as devices
from paser.errors import ConfigError

pytestmark = pytest.mark.usefixtures("prefect_api")  # flows here run against the test process's one Prefect server


@pytest.fixture()
def gpus(monkeypatch):
    """Pretend this machine has ``n`` CUDA devices, device i of compute capability
    ``capabilities[i]`` (default 8.0, Ampere); torch's own bf16 check answers as it does on such
    a machine: yes with emulation (every device from Volta on), about the current device (0)."""

    def fake(n: int, capabilities: list[tuple[int, int]] | None = None):
        caps = capabilities or [(8, 0)] * n
        monkeypatch.setattr(devices, "visible_gpus", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: caps[0 if i is None else i])
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: including_emulation or caps[0] >= (8, 0))

    return fake


def test_auto_dtype_is_bf16_only_on_a_gpu_that_has_it(gpus):
    assert devices.resolve_dtype("auto", "cpu") == "float32"  # this machine: no GPU
    assert devices.resolve_dtype("bfloat16", "cpu") == "bfloat16"  # an explicit dtype is kept
    gpus(2)
    assert devices.resolve_dtype("auto", "cuda:1") == "bfloat16"
    assert devices.resolve_dtype(None, "cuda") == "bfloat16"
    assert devices.resolve_dtype("auto", "cpu") == "float32"


def test_auto_dtype_refuses_emulated_bf16_and_checks_the_device_asked_for(gpus):
    gpus(2, [(7, 0), (7, 5)])  # V100, T4: bf16 only emulated, slower than float32
    assert devices.resolve_dtype("auto", "cuda") == "float32"
    assert devices.resolve_dtype("auto", "cuda:1") == "float32"
    gpus(2, [(7, 0), (9, 0)])  # a V100 beside an H100: the device asked for decides, not the current one
    assert devices.resolve_dtype("auto", "cuda:1") == "bfloat16"
    assert devices.resolve_dtype("auto", "cuda:0") == "float32"


def test_each_local_worker_takes_its_own_gpu(gpus):
    assert devices.worker_device(None, worker=3, n_gpus=4) == "cuda:3"
    assert devices.worker_device("cuda", worker=5, n_gpus=4) == "cuda:1"  # an unindexed cuda keeps the mapping
    assert devices.worker_device("cuda:2", worker=0, n_gpus=4) == "cuda:2"  # an indexed one is the user's choice
    assert devices.worker_device("cpu", worker=1, n_gpus=4) == "cpu"
    assert devices.worker_device(None, worker=None, n_gpus=4) == "cuda"
    assert devices.worker_device(None, worker=2, n_gpus=0) == "cpu"
    with pytest.raises(ConfigError, match="no CUDA device"):
        devices.worker_device("cuda", worker=0, n_gpus=0)


def test_scoring_device_inside_a_numbered_dask_worker(gpus, monkeypatch):
    import distributed

    from paser.devices import scoring_device

    gpus(4)
    monkeypatch.setattr(distributed, "get_worker", lambda: types.SimpleNamespace(name=2))
    assert scoring_device(None) == "cuda:2"
    assert scoring_device("cuda") == "cuda:2"  # score.device: cuda no longer lands on cuda:0
    assert scoring_device("cuda:0") == "cuda:0"
    assert scoring_device("cpu") == "cpu"

    def outside():
        raise ValueError("No worker found")

    monkeypatch.setattr(distributed, "get_worker", outside)
    assert scoring_device(None) == "cuda"


def test_each_worker_of_a_remote_cluster_takes_its_own_gpu(gpus, monkeypatch):
    """Workers of a remote cluster are named by their address, not numbered: each takes the GPU of
    its rank among the workers of its host; a worker narrowed to one GPU (CUDA_VISIBLE_DEVICES per
    worker) takes that one."""
    import distributed

    from paser.devices import scoring_device

    workers = {f"tcp://10.0.0.{h}:{port}": {"host": f"10.0.0.{h}"} for h in (1, 2) for port in (4001, 4002, 4003)}
    monkeypatch.setattr(distributed, "get_client",
                        lambda: types.SimpleNamespace(scheduler_info=lambda: {"workers": workers}))
    gpus(4)
    found = {}
    for address in workers:
        monkeypatch.setattr(distributed, "get_worker", lambda a=address: types.SimpleNamespace(name=a, address=a))
        found[address] = scoring_device(None)
    assert [found[f"tcp://10.0.0.{h}:{p}"] for h in (1, 2) for p in (4001, 4002, 4003)] == [
        "cuda:0", "cuda:1", "cuda:2"] * 2
    gpus(1)  # CUDA_VISIBLE_DEVICES holds this worker's GPU alone
    assert scoring_device(None) == "cuda"


def test_local_dask_cluster_has_one_worker_per_gpu_and_never_more(gpus, prefect_api):
    from paser.flows.runners import local_dask_cluster
    from paser.selection.configs import DistributeConfig

    cpu = local_dask_cluster(DistributeConfig(engine="dask"))
    assert cpu["n_workers"] == 2 and "resources" not in cpu
    assert cpu["env"] == {"PREFECT_API_URL": prefect_api}  # the workers report to this process's Prefect API
    assert local_dask_cluster(DistributeConfig(engine="dask", workers=3))["n_workers"] == 3
    gpus(4)
    assert local_dask_cluster(DistributeConfig(engine="dask")) | {} == {
        "n_workers": 4, "threads_per_worker": 1, "processes": True, "dashboard_address": None,
        "resources": {"GPU": 1}, "env": {"PREFECT_API_URL": prefect_api}}
    assert local_dask_cluster(DistributeConfig(engine="dask", workers=8))["n_workers"] == 4
    assert local_dask_cluster(DistributeConfig(engine="dask", workers=2))["n_workers"] == 2
    gpus(0)
    with pytest.raises(ConfigError, match="gpus_per_shard"):
        local_dask_cluster(DistributeConfig(engine="dask", gpus_per_shard=1))


def test_settings_record_the_dtype_scoring_uses(gpus):
    from paser.selection.scoring import twin_device
    from paser.selection.settings import Settings

    settings = Settings.load(None, {})
    assert settings.score.dtype == "float32" and twin_device(settings) == "cpu"
    assert Settings.load(None, {"score": {"dtype": "float16"}}).score.dtype == "float16"
    gpus(2)
    settings = Settings.load(None, {})
    assert settings.score.dtype == "bfloat16" and twin_device(settings) == "cuda"
    assert twin_device(Settings.load(None, {"score": {"device": "cuda:1"}})) == "cuda:1"


def test_twin_folder_of_a_gpu_prune_is_its_own(gpus):
    from paser.selection.scoring import twin_folder
    from paser.selection.settings import Settings

    cpu = twin_folder(Settings.load(None, {}))
    gpus(1)
    gpu = twin_folder(Settings.load(None, {}))
    assert gpu.name == cpu.name + "-cuda"


def test_forward_passes_build_no_kv_cache(tiny_pair, tiny_tokenizer, monkeypatch):
    from transformers.cache_utils import DynamicCache

    from paser.data.suite import suite_pool
    from paser.evaluation.metrics import perplexity, response_nll
    from paser.models.load import load_model
    from paser.selection.configs import ScoreConfig
    from paser.selection.passes import score_shard

    built = []
    original = DynamicCache.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(DynamicCache, "__init__", counting)
    dense, pruned = (load_model(m).model for m in tiny_pair)
    records = suite_pool(6, seed=3).records
    score_shard(dense, pruned, tiny_tokenizer, records, ScoreConfig(share_prefix=False))
    response_nll(pruned, tiny_tokenizer, records)
    perplexity(dense, tiny_tokenizer, " ".join(r.instruction for r in records), window=16)
    assert built == []
    # the shared-prefix states are the one cache scoring builds on purpose
    score_shard(dense, pruned, tiny_tokenizer, records, ScoreConfig(share_prefix=True))
    assert built


def test_the_shared_prefix_cache_keeps_nothing_of_the_batch(tiny_pair, tiny_tokenizer, monkeypatch):
    """The template's preamble is computed once and shared; each layer gets preamble + batch states
    but the cache keeps only the preamble, so no batch's keys and values outlive their layer."""
    from paser.data.suite import suite_pool
    from paser.models.load import load_model
    from paser.selection.configs import ScoreConfig
    from paser.selection.passes import SharedPrefix, score_shard

    caches = []
    original = SharedPrefix.for_batch

    def kept(self, size):
        cache = original(self, size)
        caches.append((self.length, cache))
        return cache

    monkeypatch.setattr(SharedPrefix, "for_batch", kept)
    dense, pruned = (load_model(m).model for m in tiny_pair)
    score_shard(dense, pruned, tiny_tokenizer, suite_pool(6, seed=3).records, ScoreConfig(share_prefix=True))
    assert caches and all(length > 0 for length, _ in caches)
    for length, cache in caches:
        assert all(layer.keys.shape[-2] == length and layer.values.shape[-2] == length for layer in cache.layers)


def test_recovery_and_evaluation_record_the_resolved_dtype(tiny_model_dir, tmp_path):
    import json

    from paser.data.pools import write_jsonl
    from paser.data.suite import generate_suite
    from paser.evaluation import evaluate
    from paser.recovery import recover

    write_jsonl(tmp_path / "train.jsonl", generate_suite(8, seed=3))
    result = recover(str(tiny_model_dir), str(tmp_path / "train.jsonl"), tmp_path / "r", max_steps=1, batch_size=4,
                     val_size=0, progress=False)
    assert json.loads((result.out / "recovery.json").read_text())["settings"]["dtype"] == "float32"
    assert evaluate(str(tiny_model_dir), suite_size=12, suite_accuracy_per_family=0)["settings"]["dtype"] == "float32"


def test_a_local_ray_cluster_offers_every_gpu(gpus, prefect_api):
    from paser.flows.runners import local_ray_cluster
    from paser.selection.configs import DistributeConfig

    assert local_ray_cluster(DistributeConfig(engine="ray")) == {
        "num_cpus": 2, "include_dashboard": False, "runtime_env": {"env_vars": {"PREFECT_API_URL": prefect_api}}}
    gpus(8)
    found = local_ray_cluster(DistributeConfig(engine="ray"))
    assert found["num_gpus"] == 8 and found["num_cpus"] >= 8  # 8 shards at once, one per GPU


def test_ray_gpu_shards_keep_their_worker_and_its_models(gpus):
    """A Ray GPU task runs in a fresh process per call by default (max_calls=1), reloading both
    models for every shard; paser's shards ask to keep the process."""
    from prefect_ray.context import RemoteOptionsContext

    from paser.flows.runners import shard_resources
    from paser.selection.configs import DistributeConfig

    gpus(2)
    with shard_resources(DistributeConfig(engine="ray")):
        options = RemoteOptionsContext.get().current_remote_options
    assert options == {"num_gpus": 1.0, "max_calls": 0}


@pytest.mark.slow
def test_shards_claim_gpus_when_the_remote_workers_have_them():
    """Launched from this CPU machine against a cluster whose workers offer GPUs, every shard claims
    one (the launcher's own devices do not decide)."""
    from distributed import LocalCluster

    from paser.flows.runners import gpus_per_shard
    from paser.selection.configs import DistributeConfig

    with LocalCluster(n_workers=1, processes=False, resources={"GPU": 1}, dashboard_address=None) as cluster:
        assert gpus_per_shard(DistributeConfig(engine="dask", address=cluster.scheduler_address)) == 1.0
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        assert gpus_per_shard(DistributeConfig(engine="dask", address=cluster.scheduler_address)) == 0.0


@pytest.mark.slow
def test_gpu_workers_that_declare_no_gpu_resource_are_refused(tmp_path):
    """A worker that sees GPUs but offers no GPU resource would run several shards on one GPU at
    once (its threads); the launcher says how to start it instead."""
    from distributed import LocalCluster

    from paser.flows.runners import gpus_per_shard
    from paser.selection.configs import DistributeConfig

    fake = tmp_path / "two_gpus.py"
    fake.write_text("import paser.devices as d\nd.visible_gpus = lambda: 2\n")
    with LocalCluster(n_workers=1, processes=True, threads_per_worker=2, dashboard_address=None,
                      preload=[str(fake)]) as cluster:
        with pytest.raises(ConfigError, match="--resources GPU=1"):
            gpus_per_shard(DistributeConfig(engine="dask", address=cluster.scheduler_address))


@pytest.mark.slow
def test_auto_dtype_is_decided_on_the_remote_workers_not_the_launcher(tmp_path):
    """This CPU launcher would pick float32; the cluster's worker (a process that, by its preload,
    sees one Hopper GPU) is asked instead, and the settings every shard gets carry its answer."""
    from distributed import LocalCluster

    from paser.devices import resolve_dtype
    from paser.flows.runners import worker_dtype
    from paser.selection.configs import DistributeConfig
    from paser.selection.settings import Settings

    fake = tmp_path / "one_hopper_gpu.py"
    fake.write_text("import torch\nimport paser.devices as d\nd.visible_gpus = lambda: 1\n"
                    "torch.cuda.current_device = lambda: 0\ntorch.cuda.get_device_capability = lambda i=None: (9, 0)\n")
    with LocalCluster(n_workers=1, processes=True, threads_per_worker=1, resources={"GPU": 1},
                      dashboard_address=None, preload=[str(fake)]) as cluster:
        remote = DistributeConfig(engine="dask", address=cluster.scheduler_address)
        assert resolve_dtype("auto", "cpu") == "float32"
        assert worker_dtype(remote, None) == "bfloat16"
    # settings for a remote cluster keep "auto" until the flow has asked
    held = Settings.load(None, {"distribute": {"engine": "dask", "address": "tcp://sched:8786"}})
    assert held.score.dtype == "auto" and Settings.load(None, {}).score.dtype == "float32"


@pytest.mark.slow
def test_remote_dask_workers_drop_their_models_after_the_run():
    from distributed import LocalCluster

    from paser.flows.runners import release_workers
    from paser.selection.configs import DistributeConfig

    def keep():  # what a worker holds after scoring shards: its loaded pair
        import paser.selection.scoring

        paser.selection.scoring._LOADED["pair"] = object()

    def held():
        import paser.selection.scoring

        return len(paser.selection.scoring._LOADED)

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
        from distributed import Client

        with Client(cluster) as client:
            client.run(keep)
            assert set(client.run(held).values()) == {1}
            release_workers(DistributeConfig(engine="dask", address=cluster.scheduler_address))
            assert set(client.run(held).values()) == {0}
