"""The Prefect flows on tiny models: cache hits, invalidation, shard failure and resume,
the cluster artifact, and scoring spread over local Dask and Ray clusters."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import paser
from paser.errors import ShardError
from paser.selection import pipeline, runfolder, shards
from tests.conftest import selection_settings as settings

pytestmark = pytest.mark.usefixtures("prefect_api")  # flows here run against the test process's one Prefect server


@pytest.fixture(scope="module")
def models(tiny_pair):
    return tiny_pair


class Calls:
    """Counts calls of a library function while still running it."""

    def __init__(self, monkeypatch, module, name, fail_on=None, error=RuntimeError):
        current = getattr(module, name)
        self.n, self.fail_on, self.original = 0, fail_on, getattr(current, "original", current)
        self.error = error
        monkeypatch.setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        if self.fail_on is not None and self.fail_on(*args):
            raise self.error("injected failure")
        self.n += 1
        return self.original(*args, **kwargs)


def _flow(s: pipeline.Settings, **kwargs):
    from paser.flows.selection import selection_flow

    return selection_flow(overrides=s.to_dict(), **kwargs)


def _calls(monkeypatch):
    return {"embed": Calls(monkeypatch, pipeline, "embed_texts"),
            "manifold": Calls(monkeypatch, pipeline, "learn_manifold"),
            "score": Calls(monkeypatch, shards, "score_shard")}


def test_second_run_is_served_from_the_cache(models, tmp_path, monkeypatch):
    s = settings(models, tmp_path / "run")
    calls = _calls(monkeypatch)
    hashed = Calls(monkeypatch, runfolder, "data_fingerprint")
    _flow(s)
    assert calls["embed"].n == 1 and calls["manifold"].n == 1 and calls["score"].n == 3
    assert hashed.n == 1  # the pool is hashed once on a miss: Prefect's key and the stage share it
    first = (tmp_path / "run" / "selected.jsonl").read_text()
    calls = _calls(monkeypatch)
    _flow(s, budget="10")
    assert (calls["embed"].n, calls["manifold"].n, calls["score"].n) == (0, 0, 0)
    assert sum(1 for _ in (tmp_path / "run" / "selected.jsonl").open()) == 10
    timings = json.loads((tmp_path / "run" / "timings.json").read_text())
    assert all(timings[stage]["reused"] for stage in ("data", "embed", "cluster", "score"))
    _flow(s)
    assert (tmp_path / "run" / "selected.jsonl").read_text() == first


def test_cluster_change_reruns_only_clustering_and_after(models, tmp_path, monkeypatch):
    s = settings(models, tmp_path / "run")
    _flow(s)
    calls = _calls(monkeypatch)
    s.cluster.n_clusters = 3
    _flow(s)
    assert (calls["embed"].n, calls["manifold"].n, calls["score"].n) == (0, 1, 0)
    assert json.loads((tmp_path / "run" / "clusters.json").read_text())["K"] == 3


def test_deleted_output_is_recomputed_not_trusted(models, tmp_path, monkeypatch):
    s = settings(models, tmp_path / "run")
    _flow(s)
    (tmp_path / "run" / "embeddings.npy").unlink()
    calls = _calls(monkeypatch)
    _flow(s)
    assert calls["embed"].n == 1 and calls["score"].n == 0


def test_failed_shard_names_its_records_and_a_rerun_resumes(models, tmp_path, monkeypatch):
    s = settings(models, tmp_path / "run")
    pool = pipeline.read_input_pool(s.select)
    bad = pool.records[45].id  # in shard 1: records 40..79

    Calls(monkeypatch, shards, "score_shard", fail_on=lambda d, p, t, records, *a: bad in {r.id for r in records})
    with pytest.raises(ShardError, match=r"shard 1 \(records 40\.\.79.*injected failure"):
        _flow(s)
    calls = _calls(monkeypatch)
    _flow(s)
    assert calls["score"].n == 1  # shards 0 and 2 were kept
    direct = pipeline.run_selection(settings(models, tmp_path / "direct"))
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "run" / "degradation.parquet"),
                                  pd.read_parquet(direct / "degradation.parquet"))


def test_cluster_table_artifact(models, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _flow(settings(models, tmp_path / "run"))
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["paser-selection"])))
    latest = max(found, key=lambda a: a.created)
    assert ("| cluster | top concepts | size | CDS (jsd) | CDS 95% (records scored) | allocation (records) | "
            "selected | selected tokens | rejected |" in latest.data)
    assert "- budget: 24 records; selected 24 records," in latest.data
    assert (tmp_path / "run" / "selected.jsonl").resolve().as_uri() in latest.data


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["dask", "ray"])
def test_distributed_scoring_equals_the_single_process_run(engine, models, tmp_path):
    s = settings(models, tmp_path / engine)
    s.score.shard_size = 16  # 6 shards over 2 workers
    # Dask's and Ray's workers run torch on one thread; a matrix product summed over two threads rounds
    # differently in the last bit, so the single-process reference runs on one thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        direct = pipeline.run_selection(pipeline.Settings.from_dict(
            s.to_dict() | {"select": s.to_dict()["select"] | {"out": str(tmp_path / "direct")}}))
    finally:
        torch.set_num_threads(threads)
    direct_scores = pd.read_parquet(direct / "degradation.parquet")
    s.select.out, s.distribute.engine, s.distribute.workers = str(tmp_path / engine), engine, 2
    run = paser.select(**s.to_dict()).out  # another engine than local: through the flow
    pd.testing.assert_frame_equal(pd.read_parquet(run / "degradation.parquet"), direct_scores, check_exact=True)
    assert (run / "selected.jsonl").read_text() == (direct / "selected.jsonl").read_text()
    shards = json.loads((run / "scoring.json").read_text())["shards"]
    assert len(shards) == 6 and all(r["computed"] for r in shards)
    assert len({r["worker"] for r in shards}) == 2


def test_whole_pipeline_flow_prunes_selects_recovers_and_evaluates(models, tmp_path):
    import paser

    dense, _ = models
    s = settings(models, tmp_path / "unused").to_dict()
    s["select"] = {k: v for k, v in s["select"].items() if k not in ("dense", "pruned", "out")}
    overrides = s | {"prune": {"importance": "l2", "attn_layers": [0, 4]},
                     "recover": {"max_steps": 2, "batch_size": 8, "micro_batch_size": 4, "val_size": 4,
                                 "progress": False, "objective": "mix"},
                     "evaluate": {"suite_size": 12, "max_new_tokens": 4}}
    overrides["select"] |= {"dense": dense}
    result = paser.run(out=str(tmp_path / "run"), flow=True, **overrides)  # paser run --flow: one paser-run flow
    root = tmp_path / "run"
    assert result.out == root
    assert (root / "pruned" / "paser_pruned.json").is_file()
    assert sum(1 for _ in (root / "select" / "selected.jsonl").open()) == 24
    assert (root / "recover" / "adapter" / "adapter_config.json").is_file()
    # distillation's teacher defaults to the run's dense model
    assert json.loads((root / "recover" / "recovery.json").read_text())["objective"]["teacher"] == dense
    evals = {n: json.loads((root / "eval" / n / "eval.json").read_text()) for n in ("dense", "pruned", "recovered")}
    assert evals["recovered"]["adapter"] and evals["pruned"]["adapter"] is None
    # the held-out suite leaves out the run's own pool (96 suite records of seed 0)
    suites = [e["suite"] for e in evals.values()]
    assert all(s["generated"] == 12 and s["excluded_from"] == [str(root / "select")] for s in suites)
    assert len({s["records"] for s in suites}) == 1
    gap = evals["recovered"]["suite"]["answer_nll_gap_closed"]
    assert set(gap["per_family"]) == set(evals["recovered"]["suite"]["answer_nll"]["per_family"])
    table = (root / "run.md").read_text()
    assert "gap recovered" in table and "capability-suite answer NLL, macro average" in table
    assert "mean token JSD to the dense model, capability-suite answers | 0.0000 |" in table
    assert evals["pruned"]["jsd_to_reference"]["suite"]["mean"] > 0
    # what every part computed, by the ledger's rule, and the sum
    assert "## Compute" in table and "| selection |" in table and "| recovery |" in table and "| all |" in table


def test_the_deployed_pipeline_flow_hands_its_parameters_to_the_recipe(monkeypatch):
    """The paser-run deployment's parameters: the named ones win over ``overrides``, None keeps them."""
    from paser.flows import pipeline

    seen = {}

    def recipe(config, overrides, flow):
        seen.update(config=config, overrides=overrides, flow=flow)
        return type("Done", (), {"out": "runs/x"})

    monkeypatch.setattr(pipeline, "run_recipe", recipe)
    assert pipeline.pipeline_flow.fn(dense="d", budget="0.1", config="c.yaml",
                                     overrides={"select": {"method": "strat"}, "budget": "9"}) == "runs/x"
    assert seen == {"config": "c.yaml", "flow": True, "overrides": {
        "select": {"method": "strat"}, "budget": "0.1", "dense": "d", "out": "runs/run", "trust_pickle": False}}


@pytest.mark.slow
def test_the_pipeline_recovers_in_adaptive_rounds_in_this_process(models, tmp_path):
    import paser

    dense, pruned = models
    s = settings(models, tmp_path / "unused").to_dict()
    s["select"] = {k: v for k, v in s["select"].items() if k not in ("dense", "pruned", "out")} | {
        "method": "adaptive"}
    overrides = s | {"adaptive": {"rounds": 2, "probe_per_cluster": 2},
                     "recover": {"batch_size": 8, "micro_batch_size": 4, "epochs": 1, "progress": False},
                     "evaluate": {"suite_size": 12, "max_new_tokens": 4}}
    s["select"] |= {"dense": dense, "pruned": pruned}
    result = paser.run(out=tmp_path / "run", **overrides)  # paser run's recipe, without Prefect
    assert result.out == tmp_path / "run" and set(result.evaluations) == {"dense", "pruned", "recovered"}
    assert (tmp_path / "run" / "run.md").is_file() and result.selection.out == tmp_path / "run" / "select"
    done = json.loads((tmp_path / "run" / "recover" / "recovery.json").read_text())
    assert [r["round"] for r in done["adaptive"]["rounds"]] == [1, 2]
    assert sum(r["records"] for r in done["adaptive"]["rounds"]) == 24  # the budget, in records


def test_random_baseline_through_the_flow_needs_no_model(models, tmp_path, monkeypatch):
    calls = _calls(monkeypatch)
    run = _flow(settings((models[0], "no-pruned"), tmp_path / "run", method="random"))
    assert sum(1 for _ in (tmp_path / "run" / "selected.jsonl").open()) == 24
    assert (calls["embed"].n, calls["score"].n) == (0, 0) and run == str(tmp_path / "run")


def test_pruned_loss_with_a_token_budget_through_the_flow(models, tmp_path, monkeypatch):
    calls = _calls(monkeypatch)
    run = _flow(settings(models, tmp_path / "run", method="pruned_loss", budget="0.1tok"))
    summary = json.loads((tmp_path / "run" / "clusters.json").read_text())
    tokens = pd.read_parquet(tmp_path / "run" / "tokens.parquet")["n_tokens"]
    assert summary["budget_unit"] == "tokens" and summary["selected_tokens"] <= summary["budget"]
    assert summary["budget"] - summary["selected_tokens"] < tokens.max()
    assert calls["embed"].n == 0 and calls["score"].n > 0 and run == str(tmp_path / "run")


def test_transient_shard_failure_is_retried(models, tmp_path, monkeypatch):
    s = settings(models, tmp_path / "run")
    second_shard = pipeline.read_input_pool(s.select).records[40].id
    failures = []

    def once(d, p, t, records, *a):
        if not failures and records[0].id == second_shard:
            failures.append(1)
            return True
        return False

    from paser.flows.selection import score_shard

    monkeypatch.setattr(score_shard, "retry_delay_seconds", 0)  # the 5 s a cluster waits before a retry
    calls = Calls(monkeypatch, shards, "score_shard", fail_on=once, error=OSError)
    _flow(s)  # shard 1 fails once with an I/O error, is retried, and the run completes
    assert failures == [1] and calls.n == 3
    assert sum(1 for _ in (tmp_path / "run" / "selected.jsonl").open()) == 24


def test_the_flow_reports_every_scored_batch_to_one_display(models, tmp_path, monkeypatch):
    from paser.flows.selection import selection_flow
    from tests.conftest import SCORING_SECTIONS as SECTIONS
    from tests.conftest import record_progress

    batches, shards = record_progress(monkeypatch)
    dense, pruned = models
    selection_flow(dense=dense, pruned=pruned, budget="12", out=str(tmp_path / "run"),
                   overrides=SECTIONS | {"select": {"suite_size": 60}})
    assert sum(n for _, n, _ in batches) == 60 and sorted(shards) == [(0, 32, True), (1, 28, True)]
