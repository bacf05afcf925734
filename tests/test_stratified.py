"""Tempered stratified selection (``--method strat``): shares, draws, near-duplicates, and the
per-cluster scoring sample through the pipeline on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from paser.selection.allocation import allocate_budget
from paser.selection.configs import SampleConfig
from paser.selection.selector import StratifiedSelector
from paser.selection.stratified import NearDuplicates, cluster_weights, draw_keys
from tests.conftest import copy_run
from tests.conftest import score_table as table

pytestmark = pytest.mark.usefixtures("prefect_api")  # flows here run against the test process's one Prefect server


def test_temperature_zero_gives_exactly_the_size_proportional_shares():
    room = np.array([120, 40, 240])
    cds = np.array([0.9, 0.1, 0.3])  # ignored at temperature 0
    assert np.array_equal(cluster_weights(room, cds, 0.0), room.astype(float))
    assert list(allocate_budget(cluster_weights(room, cds, 0.0), room, 100)) == [30, 10, 60]
    t = table(n_per=(12, 4, 24), jsd=(0.9, 0.1, 0.3))
    r = StratifiedSelector(budget=10, config=SampleConfig.uniform()).fit(t).result_
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
    r = StratifiedSelector(budget=100, config=SampleConfig.uniform()).fit(t).result_
    assert len(r.selected) == 100 and r.selected["jsd"].isna().sum() > 30


def test_ies_temperature_prefers_high_ies_and_the_draw_is_seeded():
    t = table(n_per=(400,), jsd=(0.2,))
    t["jsd"] = np.linspace(0.01, 1.0, 400)
    t["n_prompt"] = 40
    hot = StratifiedSelector(budget=50, config=SampleConfig(0.0, 3.0, None), random_state=1).fit(t).result_
    flat = StratifiedSelector(budget=50, config=SampleConfig.uniform(), random_state=1).fit(t).result_
    assert hot.selected["jsd"].mean() > flat.selected["jsd"].mean() + 0.2
    again = StratifiedSelector(budget=50, config=SampleConfig(0.0, 3.0, None), random_state=1).fit(t).result_
    assert list(again.selected["id"]) == list(hot.selected["id"])
    # a larger budget takes a longer prefix of the same draw
    more = StratifiedSelector(budget=80, config=SampleConfig(0.0, 3.0, None), random_state=1).fit(t).result_
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
    r = StratifiedSelector(budget=3, config=SampleConfig(0.0, 0.0, 0.95)).fit(t, x).result_
    assert len(r.selected) == 3 and "c0-1" not in set(r.selected["id"])
    assert (r.table["status"] == "rejected").sum() == 1


@pytest.fixture(scope="module")
def models(tiny_pair):
    return tiny_pair


UNIFORM = {"cds_temperature": 0.0, "ies_temperature": 0.0, "dedup": "off"}  # stratified random: no model
CDS_ONLY = {"cds_temperature": 1.0, "ies_temperature": 0.0}


def _settings(models, out, method="strat", sample=None, per_cluster=None):
    from paser.selection.settings import Settings

    dense, pruned = models
    return Settings.load(None, {
        "select": {"dense": dense, "pruned": pruned, "suite_size": 96, "budget": "0.25tok", "out": str(out),
                   "progress": False, "pictures": False, "method": method},
        "score": {"batch_size": 8, "shard_size": 40, "per_cluster": per_cluster},
        "sample": sample or {}, "cluster": {"k_max": 8}})


def test_strat_at_temperature_zero_needs_no_model(models, tmp_path):
    from paser.selection.pipeline import run_selection

    dense, _ = models
    settings = _settings((dense, str(tmp_path / "no-such-model")), tmp_path / "run", sample=UNIFORM | {"dedup": 0.98})
    run = run_selection(settings)
    summary = json.loads((run / "clusters.json").read_text())
    assert summary["method"] == "strat" and not (run / "degradation.parquet").exists()
    assert summary["selected_tokens"] <= summary["budget"]
    scores = pd.read_parquet(run / "scores.parquet")
    assert scores["jsd"].isna().all() and (scores["status"] == "selected").sum() == summary["selected"]


def test_a_per_cluster_sample_of_every_record_gives_the_full_cds(models, tmp_path, finished_run):
    from paser.selection.pipeline import run_selection

    # on copies of a finished run: the pool, its embeddings and clusters are reused, the scores redone per sample
    full = run_selection(_settings(models, copy_run(finished_run, tmp_path / "full"), method="paser"))
    every = run_selection(_settings(models, copy_run(finished_run, tmp_path / "every"), sample=CDS_ONLY,
                                    per_cluster=96))
    few = run_selection(_settings(models, copy_run(finished_run, tmp_path / "few"), sample=CDS_ONLY, per_cluster=3))
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
    with pytest.raises(ConfigError, match="per_cluster"):  # the frozen defaults draw by IES
        _settings(models, tmp_path / "x", per_cluster=8)


def test_the_frozen_defaults_and_dedup_off():
    """strat's defaults are the sweep's choice (tau_c 1, tau_i 1, near-duplicates at 0.95); off
    (the CLI's word) or YAML null keep every record; a wrong value names the field."""
    from paser.errors import ConfigError
    from paser.selection.settings import Settings

    assert SampleConfig() == SampleConfig(1.0, 1.0, 0.95)
    assert SampleConfig(dedup="off").dedup is None
    assert Settings.load(None, {"sample": {"dedup": "off"}}).sample.dedup is None
    with pytest.raises(ConfigError, match=r"sample\.dedup: 'of' is not a number, 'off' or null"):
        Settings.load(None, {"sample": {"dedup": "of"}})


def test_precomputed_embeddings_give_the_run_of_the_embedding_stage(models, tmp_path):
    """Embeddings made elsewhere, given by id in another order with extra ids, make the same clusters
    and selection as the stage's own; a changed file re-runs the stage."""
    from paser.selection.pipeline import run_selection

    dense, _ = models
    no_model = (dense, str(tmp_path / "no-such-model"))
    own = run_selection(_settings(no_model, tmp_path / "own", sample=UNIFORM))
    ids = np.asarray(pd.read_parquet(own / "pool.parquet", columns=["id"])["id"].tolist(), dtype=str)
    x = np.load(own / "embeddings.npy")
    order = np.random.default_rng(0).permutation(len(ids))
    given = tmp_path / "given.npz"
    np.savez(given, ids=np.append(ids[order], "not-in-the-pool"),
             embeddings=np.vstack([3.0 * x[order], np.ones((1, x.shape[1]), np.float32)]))  # unit rows made again
    settings = _settings(no_model, tmp_path / "given", sample=UNIFORM)
    settings.embed.precomputed = str(given)
    run = run_selection(settings)
    np.testing.assert_allclose(np.load(run / "embeddings.npy"), x, atol=1e-6)
    assert (run / "selected.jsonl").read_text() == (own / "selected.jsonl").read_text()
    assert not (run / "embed_cost.json").exists()
    compute = json.loads((run / "manifest.json").read_text())["compute"]
    assert compute["not_counted"] == ["the embeddings, made elsewhere (given.npz)"]
    assert "not counted: the embeddings, made elsewhere (given.npz)" in (run / "report.md").read_text()
    assert not json.loads((own / "manifest.json").read_text())["compute"]["not_counted"]
    np.savez(given, ids=ids[::-1], embeddings=x[::-1] + 0.5)
    run_selection(settings)
    assert not json.loads((run / "timings.json").read_text())["embed"]["reused"]
    np.testing.assert_allclose(np.linalg.norm(np.load(run / "embeddings.npy"), axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("case, message", [
    ("missing", r"2 of the pool's 5 ids are missing, the first 'd'"),
    ("twice", r"record 2, field 'id': 'a' appears twice"),
    ("dimension", r"vectors of 3 dimensions; the encoder \(embed.model\) makes 4"),
    ("rows", r"4 rows for a pool of 5 records"),
    ("zero", r"record 1 \(pool id 'b'\), field 'embedding': all zeros"),
    ("ragged", r"record 1 \(id 'b'\), field 'embedding': 3 values where the first record has 4"),
    ("columns", r"no column 'embedding'"),
    ("suffix", r"expected a .npy, .npz or .parquet file"),
    ("objects", r"saved as Python objects"),
])
def test_precomputed_embeddings_that_do_not_fit_are_refused_by_file_record_and_field(tmp_path, case, message):
    from paser.errors import DataError
    from paser.selection.embedding import load_precomputed

    ids = ["a", "b", "c", "d", "e"]
    x = np.arange(20, dtype=np.float32).reshape(5, 4) + 1
    path = tmp_path / "given.npz"
    if case == "missing":
        np.savez(path, ids=np.array(ids[:3]), embeddings=x[:3])
    elif case == "twice":
        np.savez(path, ids=np.array(["a", "b", "a", "c", "d", "e"]), embeddings=np.vstack([x, x[:1]]))
    elif case == "dimension":
        np.savez(path, ids=np.array(ids), embeddings=x[:, :3])
    elif case == "rows":
        path = tmp_path / "given.npy"
        np.save(path, x[:4])
    elif case == "zero":
        x[1] = 0
        np.savez(path, ids=np.array(ids), embeddings=x)
    elif case in ("ragged", "columns"):
        path = tmp_path / "given.parquet"
        vectors = [list(v) for v in x]
        vectors[1] = vectors[1][:3]
        pd.DataFrame({"id": ids, ("embedding" if case == "ragged" else "vector"): vectors}).to_parquet(path)
    elif case == "objects":
        np.savez(path, ids=np.array(ids, dtype=object), embeddings=x)
    else:
        path = tmp_path / "given.csv"
        path.write_text("a,1\n")
    with pytest.raises(DataError, match=message) as err:
        load_precomputed(path, ids, 4)
    assert str(path) in str(err.value)


def test_a_missing_embeddings_file_is_refused_before_any_stage(models, tmp_path):
    from paser.errors import DataError
    from paser.selection.pipeline import preflight

    settings = _settings(models, tmp_path / "run")
    settings.embed.precomputed = str(tmp_path / "nowhere.npz")
    with pytest.raises(DataError, match=r"nowhere.npz \(embed.precomputed\): no such file"):
        preflight(settings)
    assert not (tmp_path / "run").exists()


def test_cli_dedup_off_and_a_wrong_value(models, tmp_path):
    from typer.testing import CliRunner

    from paser.cli import app

    dense, _ = models
    base = ["select", "--dense", dense, "--pruned", str(tmp_path / "no-such-model"), "--suite-size", "96",
            "--budget", "0.25tok", "--no-flow", "--method", "strat", "--cds-temperature", "0", "--ies-temperature", "0"]
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "run"), "--dedup", "off"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "settings.json").read_text())["sample"]["dedup"] is None
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "bad"), "--dedup", "most"])
    assert result.exit_code == 2 and "cosine similarity in (0, 1] or off, got 'most'" in result.output


def test_strat_with_its_defaults_scores_every_record_and_skips_near_duplicates(models, tmp_path):
    from paser.selection.pipeline import run_selection

    run = run_selection(_settings(models, tmp_path / "run"))
    scores = pd.read_parquet(run / "scores.parquet")
    assert scores["jsd"].notna().all()  # tau_i 1 draws by every record's IES
    report = (run / "report.md").read_text()
    assert "size x (CDS / mean)^1" in report and "(IES / cluster mean)^1" in report and "cosine >= 0.95" in report


def test_near_duplicates_keep_every_accepted_row_as_the_matrix_grows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[2500] = x[10]  # offered after the accepted rows outgrew the first 1024
    dup = NearDuplicates(x, [str(i) for i in range(len(x))], 0.999)
    taken = [dup.offer(i) for i in range(len(x))]
    assert not taken[2500][0] and taken[2500][2][0] == "10"
    assert sum(ok for ok, _, _ in taken) == len(x) - 1 and len(dup.matrix) < 2 * len(x)
