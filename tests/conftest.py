"""What the whole suite shares: each test process's set-up (its own Prefect home, its share of the
cores, Prefect and the heavy libraries loaded once and frozen out of garbage collection); tiny
local models and tokenizers, so the suite needs no network and no bundled weights; one Prefect
test server and one finished selection per process; the helpers several test modules use.

``tiny_tokenizer`` is a byte-level BPE trained here on paser's generated suite; ``tiny_model_dir``
builds a 4-layer Llama from a config (MHA or GQA) and saves it as a Hugging Face folder.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (a
    container's limit, which neither the affinity nor psutil's core count shows)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


# ``make test`` runs the suite in one process per core (pytest-xdist). Each process gets its own
# Prefect home (flows modules read it when first imported, before any fixture runs; two processes
# on one SQLite database would lock each other) and an equal share of the cores for torch, here and
# in the subprocesses it starts: two processes of two threads each on two cores spin against each
# other and run small models several times slower.
_PREFECT_HOME = tempfile.mkdtemp(prefix="paser-tests-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, usable_cores() // _WORKERS))


from paser.data.suite import suite_tokenizer as build_tokenizer  # noqa: E402,F401  (tests import it from here)
from paser.flows import configure_prefect  # noqa: E402

# Prefect's console logging writes to the sys.stderr of the moment Prefect is first imported. Here,
# that is the stream pytest captures the whole session on; imported first inside a test, it would be
# that test's own captured stream, closed when the test ends, and every later Prefect log line
# would print a "Logging error" traceback into whatever a later test captures.
#
# HF's Trainer (through accelerate) and paser's recovery each run a full garbage collection per
# training run; with torch, transformers, lm-eval and Prefect loaded, each one walks half a million
# objects, a large part of a short recovery test. The libraries
# nearly every test process loads are imported here, and what exists then is frozen out of the
# collections (gc.freeze), which afterwards look only at what the tests make.
configure_prefect()
import lm_eval  # noqa: E402,F401
import prefect  # noqa: E402,F401
import sentence_transformers  # noqa: E402,F401

import paser.evaluation.harness  # noqa: E402,F401
import paser.recovery.entry  # noqa: E402,F401
import paser.selection.pipeline  # noqa: E402,F401

gc.collect()
gc.freeze()


_SHARED_API = "PASER_TESTS_PREFECT_API"  # where a pytest-xdist run's one Prefect test server writes its URL


def pytest_configure(config):
    """Under pytest-xdist the controller starts one temporary Prefect API server, in a thread while
    the workers start, and they all use it (``prefect_api``): one server's start-up for the suite,
    not one per worker. Its URL is written to a file named by ``PASER_TESTS_PREFECT_API`` once it
    answers."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        import threading

        url_file = Path(_PREFECT_HOME) / "test-api-url"
        os.environ[_SHARED_API] = str(url_file)
        stop = threading.Event()

        def serve():  # the harness's settings live in this thread's context: entered and left here
            from prefect.settings import PREFECT_API_URL
            from prefect.testing.utilities import prefect_test_harness

            with prefect_test_harness(server_startup_timeout=120):
                url_file.with_suffix(".tmp").write_text(PREFECT_API_URL.value())
                url_file.with_suffix(".tmp").replace(url_file)
                stop.wait()

        config.paser_prefect = (threading.Thread(target=serve, daemon=True), stop)
        config.paser_prefect[0].start()


def pytest_unconfigure(config):
    server = getattr(config, "paser_prefect", None)
    if server is not None:
        server[1].set()
        server[0].join(timeout=60)
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (make test): one test process per usable core, not pytest-xdist's count of the
    machine's physical cores."""
    return usable_cores()


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist the tests marked slow are handed out first, so that the suite does not end
    waiting for one long test that started last while the other processes sit idle."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API server (its own database) for the test run: the flow tests run
    against it, and the subprocesses they start reach it through its URL (returned) instead of each
    starting a server of its own. Under pytest-xdist the controller's, else this process's."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    url_file = os.environ.get(_SHARED_API)
    if url_file:  # the controller's server (pytest_configure), once it answers
        waited = 0.0
        while not Path(url_file).is_file():
            if waited > 180:
                raise RuntimeError(f"the suite's Prefect test server did not start ({url_file} never written)")
            time.sleep(0.2)
            waited += 0.2
        shared = Path(url_file).read_text()
        with temporary_settings({PREFECT_API_URL: shared}):
            yield shared
        return
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


def build_model(tokenizer, num_kv_heads: int = 8, seed: int = 0, tie: bool = False, layers: int = 4):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=num_kv_heads, head_dim=8,
        max_position_embeddings=256, tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


@pytest.fixture(autouse=True)
def _paser_cache(tmp_path_factory, monkeypatch):
    # converted GGUF files go to a per-session folder, never the user's cache
    monkeypatch.setenv("PASER_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "paser-cache"))


@pytest.fixture(scope="session", params=["mha", "gqa"])
def tiny_model_dir(request, tmp_path_factory, tiny_tokenizer):
    """A saved tiny Llama folder: 8 query heads with 8 (MHA) or 2 (GQA) key/value heads."""
    kv = 8 if request.param == "mha" else 2
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    build_model(tiny_tokenizer, num_kv_heads=kv).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def batch(tiny_tokenizer):
    """A fixed batch of prompt+response texts for loss comparisons."""
    from paser.data.prompts import format_example
    from paser.data.suite import suite_pool

    texts = ["".join(format_example(r)) for r in suite_pool(8, seed=3).records]
    enc = tiny_tokenizer(texts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def make_pair(tmp_path_factory, tiny_tokenizer) -> tuple[str, str]:
    """A tiny dense GQA Llama and its paser-pruned twin, saved as folders."""
    from paser.models.config import PruneConfig
    from paser.models.pruning import prune

    root = tmp_path_factory.mktemp("pair")
    build_model(tiny_tokenizer, num_kv_heads=2).save_pretrained(root / "dense")
    tiny_tokenizer.save_pretrained(root / "dense")
    prune(str(root / "dense"), root / "pruned", PruneConfig(importance="l2", attn_layers=(0, 4)))
    return str(root / "dense"), str(root / "pruned")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, tiny_tokenizer):
    """(dense, pruned) folders of a tiny model pair, shared by the pipeline, flow and notebook tests."""
    return make_pair(tmp_path_factory, tiny_tokenizer)


# ---------------------------------------------------------------- shared by several test modules


def selection_settings(models, out, **select):
    """Settings of a selection on the tiny pair ``models`` (dense, pruned) into ``out``: 96 generated
    records, a 25% budget, small shards and K at most 8, no progress bars and no pictures; ``select``
    overrides keys of the select section."""
    from paser.selection.settings import Settings

    dense, pruned = models
    return Settings.load(None, {
        "select": {"dense": dense, "pruned": pruned, "suite_size": 96, "budget": 0.25, "out": str(out),
                   "progress": False, "pictures": False} | select,
        "score": {"batch_size": 8, "shard_size": 40},
        "cluster": {"k_max": 8},
    })


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_pair) -> Path:
    """A finished selection on the tiny pair with ``selection_settings``, made once per test process.
    Tests copy it (``copy_run``) and select again on the copy: stages whose inputs did not change are
    reused, as a user's reselection reuses them."""
    from paser.selection.pipeline import run_selection

    return run_selection(selection_settings(tiny_pair, tmp_path_factory.mktemp("finished") / "run"))


def copy_run(run: Path, to: Path) -> Path:
    """A copy of the run folder ``run`` at ``to`` (run folders name no absolute path inside)."""
    return Path(shutil.copytree(run, to))


FAST = dict(batch_size=8, micro_batch_size=4, learning_rate=5e-3, val_size=8, eval_every=2, save_every=2,
            progress=False, pictures=False)
"""Recovery settings for tiny models: small batches, a validation set, frequent checkpoints, no
progress bar and no training curve."""


@pytest.fixture()
def train_file(tmp_path):
    """48 generated records as a JSONL training file."""
    from paser.data.pools import write_jsonl
    from paser.data.suite import generate_suite

    path = tmp_path / "train.jsonl"
    write_jsonl(path, generate_suite(48, seed=7))
    return str(path)


def score_table(n_per=(6, 6, 6), jsd=(0.3, 0.2, 0.1), concepts=None, seed=0):
    """A selector's input: clusters of ``n_per`` records around the ``jsd`` levels, each record with
    its token counts and two concepts (one shared by its cluster)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for c, (n, base) in enumerate(zip(n_per, jsd)):
        for i in range(n):
            rows.append({"id": f"c{c}-{i}", "cluster": c, "jsd": base + rng.uniform(0, 0.01),
                         "n_prompt": 20 + i, "n_response": 10, "concepts": [f"c{c}", f"r{c}-{i}"]})
    t = pd.DataFrame(rows)
    if concepts is not None:
        t["concepts"] = concepts
    return t


SCORING_SECTIONS = {"score": {"shard_size": 32, "batch_size": 8}, "cluster": {"k_max": 6}}
"""Two shards of 32 and 28 records for a 60-record pool."""


def record_progress(monkeypatch) -> tuple[list, list]:
    """Every batch and finished shard reported to the scoring display: (shard, records, tokens)
    and (shard, records, computed)."""
    from paser.progress import ScoringProgress

    batches, shards = [], []
    monkeypatch.setattr(ScoringProgress, "batch", lambda self, shard, n, tokens: batches.append((shard, n, tokens)))
    original = ScoringProgress.shard_done

    def shard_done(self, shard, n, computed=True):
        shards.append((shard, n, computed))
        original(self, shard, n, computed)

    monkeypatch.setattr(ScoringProgress, "shard_done", shard_done)
    return batches, shards
