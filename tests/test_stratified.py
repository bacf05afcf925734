"""Tempered stratified selection (``--method strat``): shares, draws, near-duplicates, and the
per-cluster scoring sample through the pipeline on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from paser.selection.allocation import allocate_budget
from paser.selection.selector import StratifiedSelector
from paser.selection.stratified import NearDuplicates, SampleConfig, cluster_weights, draw_keys
from tests.test_selection import table


def test_temperature_zero_gives_exactly_the_size_proportional_shares():
    room = np.array([120, 40, 240])
    cds = np.array([0.9, 0.1, 0.3])  # ignored at temperature 0
    assert np.array_equal(cluster_weights(room, cds, 0.0), room.astype(float))
    assert list(allocate_budget(cluster_weights(room, cds, 0.0), room, 100)) == [30, 10, 60]
    t = table(n_per=(12, 4, 24), jsd=(0.9, 0.1, 0.3))
    r = StratifiedSelector(budget=10, config=SampleConfig()).fit(t).result_
    assert list(r.allocation) == [3, 1, 6] and list(r.selected_per_cluster) == [3, 1, 6]


def test_cds_temperature_tilts_the_shares_towards_degraded_clusters():
    room, cds = np.array([100, 100]), np.array([0.3, 0.1])
    # mean CDS 0.2: room x (1.5, 0.5) at temperature 1, x (2.25, 0.25) at 2
    assert np.allclose(cluster_weights(room, cds, 1.0), [150, 50])
    assert np.allclose(cluster_weights(room, cds, 2.0), [225, 25])


def test_keys_draw_in_proportion_to_the_weights():
    rng = np.random.default_rng(0)
    firsts = [int(np.argmax(draw_keys([1.0, 3.0, 0.0], rng))) for _ in range(4000)]
    share = np.bincount(firsts, minlength=3) / len(firsts)
    assert share[2] == 0 and abs(share[1] - 0.75) < 0.03


def test_ies_temperature_zero_draws_uniformly_and_unscored_records_are_drawn():
    t = table(n_per=(200,), jsd=(0.2,))
    t.loc[::2, "jsd"] = np.nan  # half the records unscored: a per-cluster sample
    r = StratifiedSelector(budget=100, config=SampleConfig()).fit(t).result_
    assert len(r.selected) == 100 and r.selected["jsd"].isna().sum() > 30


def test_ies_temperature_prefers_high_ies_and_the_draw_is_seeded():
    t = table(n_per=(400,), jsd=(0.2,))
    t["jsd"] = np.linspace(0.01, 1.0, 400)
    t["n_prompt"] = 40
    hot = StratifiedSelector(budget=50, config=SampleConfig(ies_temperature=3.0), random_state=1).fit(t).result_
    flat = StratifiedSelector(budget=50, config=SampleConfig(), random_state=1).fit(t).result_
    assert hot.selected["jsd"].mean() > flat.selected["jsd"].mean() + 0.2
    again = StratifiedSelector(budget=50, config=SampleConfig(ies_temperature=3.0), random_state=1).fit(t).result_
    assert list(again.selected["id"]) == list(hot.selected["id"])
    # a larger budget takes a longer prefix of the same draw
    more = StratifiedSelector(budget=80, config=SampleConfig(ies_temperature=3.0), random_state=1).fit(t).result_
    assert set(hot.selected["id"]) <= set(more.selected["id"])


def test_near_duplicates_are_skipped_and_named():
    x = np.array([[1.0, 0.0], [0.999, 0.0447], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    offer = NearDuplicates(x, ["a", "b", "c", "d"], 0.95).offer
    assert offer(0)[0] and offer(2)[0]
    ok, why, (other, _) = offer(1)
    assert not ok and other == "a" and why.startswith("near-duplicate")
    assert offer(3)[0]  # cosine 0.8 with c, 0.6 with a
    t = table(n_per=(4,), jsd=(0.2,))
    r = StratifiedSelector(budget=3, config=SampleConfig(dedup=0.95)).fit(t, x).result_
    assert len(r.selected) == 3 and "c0-1" not in set(r.selected["id"])
    assert (r.table["status"] == "rejected").sum() == 1


@pytest.fixture(scope="module")
def models(tiny_pair):
    return tiny_pair


def _settings(models, out, method="strat", sample=None, per_cluster=None):
    from paser.selection.settings import Settings

    dense, pruned = models
    return Settings.load(None, {
        "select": {"dense": dense, "pruned": pruned, "suite_size": 96, "budget": "0.25tok", "out": str(out),
                   "progress": False, "method": method},
        "score": {"batch_size": 8, "shard_size": 40, "per_cluster": per_cluster},
        "sample": sample or {}, "cluster": {"k_max": 8}})


def test_strat_at_temperature_zero_needs_no_model(models, tmp_path):
    from paser.selection.pipeline import run_selection

    dense, _ = models
    settings = _settings((dense, str(tmp_path / "no-such-model")), tmp_path / "run", sample={"dedup": 0.98})
    run = run_selection(settings)
    summary = json.loads((run / "clusters.json").read_text())
    assert summary["method"] == "strat" and not (run / "degradation.parquet").exists()
    assert summary["selected_tokens"] <= summary["budget"]
    scores = pd.read_parquet(run / "scores.parquet")
    assert scores["jsd"].isna().all() and (scores["status"] == "selected").sum() == summary["selected"]


def test_a_per_cluster_sample_of_every_record_gives_the_full_cds(models, tmp_path):
    from paser.selection.pipeline import run_selection

    full = run_selection(_settings(models, tmp_path / "full", method="paser"))
    every = run_selection(_settings(models, tmp_path / "every", sample={"cds_temperature": 1.0}, per_cluster=96))
    few = run_selection(_settings(models, tmp_path / "few", sample={"cds_temperature": 1.0}, per_cluster=3))
    a, b, c = (json.loads((r / "clusters.json").read_text())["clusters"] for r in (full, every, few))
    assert [x["cds"] for x in a] == pytest.approx([x["cds"] for x in b], abs=1e-12)
    assert [x["cds_scored"] for x in b] == [x["size"] for x in a]
    assert all(x["cds_scored"] == min(3, y["size"]) for x, y in zip(c, a))
    scored = pd.read_parquet(few / "degradation.parquet")
    assert len(scored) == sum(min(3, y["size"]) for y in a) < 96
    for x in c:  # the sample's interval is reported where two or more were scored
        assert x["cds_ci"] is None or x["cds_ci"][0] <= x["cds"] <= x["cds_ci"][1]


def test_per_cluster_is_refused_by_methods_that_rank_every_record(models, tmp_path):
    from paser.errors import ConfigError

    with pytest.raises(ConfigError, match="per_cluster"):
        _settings(models, tmp_path / "x", method="paser", per_cluster=8)
    with pytest.raises(ConfigError, match="per_cluster"):
        _settings(models, tmp_path / "x", sample={"ies_temperature": 1.0}, per_cluster=8)
