"""The selection pipeline end to end on tiny models: outputs, determinism, stage reuse, flow, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from paser.cli import app
from paser.selection.pipeline import run_selection
from tests.conftest import copy_run
from tests.conftest import selection_settings as settings

pytestmark = pytest.mark.usefixtures("prefect_api")  # flows here run against the test process's one Prefect server


@pytest.fixture(scope="module")
def models(tiny_pair):
    return tiny_pair


def test_outputs_of_a_run(models, tmp_path):
    run = run_selection(settings(models, tmp_path / "run", pictures=True))
    selected = [json.loads(line) for line in (run / "selected.jsonl").read_text().splitlines()]
    assert len(selected) == 24
    assert {"instruction", "input", "output", "family", "paser_cluster", "paser_jsd", "paser_ies",
            "paser_rank"} <= set(selected[0])
    assert [r["paser_rank"] for r in selected] == list(range(1, 25))
    scores = pd.read_parquet(run / "scores.parquet")
    assert len(scores) == 96 and {"cluster", "jsd", "ies", "status", "reason", "concepts"} <= set(scores)
    assert (scores["status"] == "selected").sum() == 24
    clusters = json.loads((run / "clusters.json").read_text())
    assert clusters["K"] >= 2 and sum(c["selected"] for c in clusters["clusters"]) == 24
    assert sum(c["allocation"] for c in clusters["clusters"]) == 24
    assert clusters["k_curve"] and {"cds", "size", "rejected"} <= set(clusters["clusters"][0])
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["packages"]["torch"] and set(manifest["stages"]) >= {"data", "embed", "cluster", "score"}
    assert manifest["models"]["dense"]["fingerprint"] != manifest["models"]["pruned"]["fingerprint"]
    assert manifest["adjusted_rand_index_vs_family"] is not None
    report = (run / "report.md").read_text()
    assert "adjusted Rand index" in report and "cluster_map.png" in report
    assert all((run / p).is_file() for p in ("cluster_map.png", "allocation.png", "rejections.png"))
    # every cluster is named by its concepts, in clusters.json and in the report's table
    names = [c["name"] for c in clusters["clusters"]]
    assert all(names) and all(f"| {n} |" in report for n in names)


def test_same_seed_same_selection(models, tmp_path):
    a = run_selection(settings(models, tmp_path / "a"))
    b = run_selection(settings(models, tmp_path / "b"))
    assert (a / "selected.jsonl").read_text() == (b / "selected.jsonl").read_text()
    # without pictures (select.pictures off): no PNG, and the report links none
    assert not list(a.glob("*.png")) and "![" not in (a / "report.md").read_text()


def test_reselect_reuses_every_stage_and_cluster_change_reruns_only_clusters(models, tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path / "run")
    run_selection(settings(models, out, budget=10))
    timings = json.loads((out / "timings.json").read_text())
    assert all(timings[s]["reused"] for s in ("data", "embed", "cluster", "score"))
    assert sum(1 for _ in (out / "selected.jsonl").open()) == 10
    changed = settings(models, out, budget=10)
    changed.cluster.n_clusters = 3
    run_selection(changed)
    timings = json.loads((out / "timings.json").read_text())
    assert timings["embed"]["reused"] and timings["score"]["reused"] and not timings["cluster"]["reused"]
    assert json.loads((out / "clusters.json").read_text())["K"] == 3


def test_input_layout_written_back(models, tmp_path):
    rows = [{"instruction": f"Summarise item {i}.", "context": f"Item {i} is a thing number {i}.",
             "response": f"Thing {i}.", "category": "summarization"} for i in range(40)]
    path = tmp_path / "dolly.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    run = run_selection(settings(models, tmp_path / "run", data=str(path), budget=5))
    selected = [json.loads(line) for line in (run / "selected.jsonl").read_text().splitlines()]
    assert len(selected) == 5 and {"context", "category", "response", "paser_jsd"} <= set(selected[0])
    assert json.loads((run / "manifest.json").read_text())["adjusted_rand_index_vs_family"] is None


def test_flow_gives_the_same_selection(models, tmp_path, prefect_api, finished_run):
    """The flow walks the recipe run_selection walks: the same stages as tasks, the same run folder."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from paser.flows.selection import selection_flow
    from paser.selection.pipeline import stages

    direct = finished_run  # run_selection of the same settings, shared by the test process
    s = settings(models, tmp_path / "flow")
    state = selection_flow(out=str(tmp_path / "flow"), overrides=s.to_dict(), return_state=True)
    run = Path(state.result())
    for name in ("selected.jsonl", "clusters.json"):
        assert (run / name).read_text() == (direct / name).read_text()
    pd.testing.assert_frame_equal(pd.read_parquet(run / "scores.parquet"), pd.read_parquet(direct / "scores.parquet"))
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[
            state.state_details.flow_run_id])))
    ran = [t.name.rsplit("-", 1)[0] for t in sorted(tasks, key=lambda t: t.expected_start_time)]
    # scoring runs as a subflow of shards (mapped over the engine), every other stage as a task
    assert ran == ["check inputs", *("paser-score-shards" if step.name == "score degradation" else step.name
                                     for step in stages(s))]


runner = CliRunner()


def _cli(models, tmp_path, *extra):
    dense, pruned = models
    return runner.invoke(app, ["select", "--dense", dense, "--pruned", pruned, "--suite-size", "96",
                               "--out", str(tmp_path / "run"), "--no-flow", *extra])


def test_cli_select(models, tmp_path):
    result = _cli(models, tmp_path, "--budget", "12", "--batch-size", "8")
    assert result.exit_code == 0, result.output
    assert "selected 12 records" in result.output and "budget 12 records" in result.output
    assert sum(1 for _ in (tmp_path / "run" / "selected.jsonl").open()) == 12


def test_cli_select_token_budget_and_signal(models, tmp_path):
    result = _cli(models, tmp_path, "--budget", "1500tok", "--signal", "loss_gap", "--method", "no_cost")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "clusters.json").read_text())
    assert summary["signal"] == "loss_gap" and summary["budget"] == 1500 and summary["selected_tokens"] <= 1500
    assert (f"selected {summary['selected']} records, {summary['selected_tokens']} tokens" in result.output
            and "budget 1500 tokens" in result.output)


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "budget must be positive"),
    (["--budget", "-5"], "budget must be positive"),
    (["--budget", "500"], "budget 500 records is above the pool's 96 records"),
    (["--budget", "lots"], "neither a count (100), a fraction (0.2), nor a token amount"),
    (["--budget", "3tok"], "budget of 3 tokens is smaller than the shortest record"),
    (["--budget", "9999999tok"], "budget 9999999 tokens is above the pool's"),
])
def test_cli_bad_budget(models, tmp_path, args, message):
    result = _cli(models, tmp_path, *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_cli_bad_data(models, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    result = _cli(models, tmp_path, "--data", str(bad))
    assert result.exit_code == 2 and "bad.jsonl: line 2: malformed JSON" in result.output
    result = _cli(models, tmp_path, "--data", str(tmp_path / "none.json"))
    assert result.exit_code == 2 and "none.json: no such file" in result.output


def test_cli_unknown_config_key(models, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("score:\n  batchsize: 3\n")
    result = _cli(models, tmp_path, "--config", str(cfg))
    assert result.exit_code == 2 and "unknown key(s) ['batchsize']" in result.output


def test_cli_mismatched_tokenizers(models, tmp_path):
    from tests.conftest import build_model, build_tokenizer

    other = build_tokenizer(vocab_size=300)
    build_model(other).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    dense, _ = models
    result = runner.invoke(app, ["select", "--dense", dense, "--pruned", str(tmp_path / "other"),
                                 "--suite-size", "96", "--out", str(tmp_path / "run"), "--no-flow"])
    assert result.exit_code == 2 and "tokenizers of" in result.output


def test_cli_errors_through_the_flow_are_one_line(models, tmp_path):
    """Bad input is caught before the flow starts: no Prefect server, no task traceback."""
    dense, pruned = models
    result = runner.invoke(app, ["select", "--dense", dense, "--pruned", pruned, "--suite-size", "96",
                                 "--out", str(tmp_path / "run"), "--budget", "0"])
    assert result.exit_code == 2 and "budget must be positive" in result.output
    assert "Traceback" not in result.output and "Task run" not in result.output


def test_two_pass_pipeline(models, tmp_path):
    s = settings(models, tmp_path / "run")
    s.score.two_pass = True
    s.score.top_k = 400  # the tiny vocabulary: exact
    run = run_selection(s)
    one = run_selection(settings(models, tmp_path / "one"))
    a = pd.read_parquet(run / "degradation.parquet")["jsd"]
    b = pd.read_parquet(one / "degradation.parquet")["jsd"]
    assert (a - b).abs().max() < 1e-5


def test_load_run_refuses_an_unfinished_folder(models, tmp_path):
    from paser.errors import DataError
    from paser.selection.report import load_run

    with pytest.raises(DataError, match="not a finished paser selection run"):
        load_run(tmp_path)
    run = run_selection(settings(models, tmp_path / "run"))
    view = load_run(run)
    assert len(view.records) == 96 and view.clusters["allocation"].sum() == 24
    # the map's positions come from the report's saved layout, one per record
    saved = np.load(run / "cluster_map.npz")
    assert np.array_equal(view.records[["x", "y"]].to_numpy(), saved["xy"]) and view.map_figure() is not None
    again = view.reselect(24)
    assert list(again.selected["id"]) == list(view.records.sort_values("rank").query("status == 'selected'")["id"])


@pytest.mark.parametrize("method", ["random", "full"])
def test_baselines_write_the_same_outputs_without_models(models, tmp_path, method):
    dense = models[0]  # the tokenizer counts tokens; no model is loaded, the pruned one need not exist
    s = settings((dense, "missing-pruned"), tmp_path / "a", method=method)
    run = run_selection(s)
    selected = [json.loads(line) for line in (run / "selected.jsonl").read_text().splitlines()]
    assert len(selected) == (24 if method == "random" else 96)
    assert {"instruction", "output", "family", "paser_id", "paser_rank"} <= set(selected[0])
    assert not (run / "embeddings.npy").exists() and not (run / "degradation.parquet").exists()
    assert json.loads((run / "manifest.json").read_text())["settings"]["select"]["method"] == method
    again = run_selection(settings((dense, "missing-pruned"), tmp_path / "b", method=method))
    assert (again / "selected.jsonl").read_text() == (run / "selected.jsonl").read_text()
    if method == "random":
        other = run_selection(settings((dense, "y"), tmp_path / "c", method=method, seed=1))
        assert (other / "selected.jsonl").read_text() != (run / "selected.jsonl").read_text()


def test_ablations_change_what_they_name(models, tmp_path, finished_run):
    def reselect(method: str) -> Path:  # on a copy of a finished run: only what the method changes runs again
        return run_selection(settings(models, copy_run(finished_run, tmp_path / method), method=method, budget=72))

    base = reselect("paser")
    scores = pd.read_parquet(base / "scores.parquet")
    assert (scores["status"] == "rejected").any(), "the tiny run should exercise the concept filter"
    no_ccg = reselect("no_ccg")
    assert not (pd.read_parquet(no_ccg / "scores.parquet")["status"] == "rejected").any()
    uniform = json.loads((reselect("uniform")
                          / "clusters.json").read_text())
    uncapped = [c["allocation"] for c in uniform["clusters"] if c["allocation"] < c["size"]]
    assert uncapped and max(uncapped) - min(uncapped) <= 1  # equal shares, except clusters too small for one
    kmeans = reselect("kmeans")
    assert json.loads((kmeans / "cluster_fit.json").read_text())["method"] == "kmeans"
    shuffled = reselect("random_order")
    a, b = (json.loads((r / "clusters.json").read_text()) for r in (base, shuffled))
    assert [c["allocation"] for c in a["clusters"]] == [c["allocation"] for c in b["clusters"]]
    assert (shuffled / "selected.jsonl").read_text() != (base / "selected.jsonl").read_text()
    no_cost = reselect("no_cost")
    for run, key in ((base, "ies"), (no_cost, "jsd")):  # each visits a cluster in its own order
        table = pd.read_parquet(run / "scores.parquet")
        chosen = table[table["status"] == "selected"].sort_values("rank")
        assert all(g[key].is_monotonic_decreasing for _, g in chosen.groupby("cluster"))


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_token_budget_end_to_end(models, tmp_path, finished_run):
    run = run_selection(settings(models, copy_run(finished_run, tmp_path / "run"), budget="0.2tok"))
    tokens = pd.read_parquet(run / "tokens.parquet")
    summary = json.loads((run / "clusters.json").read_text())
    budget = int(0.2 * tokens["n_tokens"].sum() + 0.5)
    assert summary["budget_unit"] == "tokens" and summary["budget"] == budget
    selected = _lines(run / "selected.jsonl")
    spent = sum(r["paser_tokens"] for r in selected)
    assert spent == summary["selected_tokens"] == sum(c["selected_tokens"] for c in summary["clusters"])
    assert budget - tokens["n_tokens"].max() < spent <= budget
    assert summary["selected"] == len(selected) and summary["selected_response_tokens"] > 0
    scores = pd.read_parquet(run / "scores.parquet")
    assert (scores["n_tokens"] == scores["n_prompt"] + scores["n_response"]).all()
    report = (run / "report.md").read_text()
    assert f"budget: {budget:,} tokens; selected {len(selected)} records, {spent:,} tokens" in report
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["selection"]["selected_tokens"] == spent and manifest["selection"]["budget_unit"] == "tokens"
    # the tokens were counted at the 256-token cutoff: recovery at another is refused before any model loads
    from paser.data.prompts import PromptFormat
    from paser.errors import ConfigError
    from paser.recovery import RecoverConfig, recover
    from paser.recovery.entry import check_prompt_format

    with pytest.raises(ConfigError, match="counted in the 'alpaca' template at a 256-token cutoff.*--cutoff 256"):
        recover("no-such-model", str(run / "selected.jsonl"), tmp_path / "rec", prompt={"cutoff": 128})
    check_prompt_format(RecoverConfig(), run / "selected.jsonl")  # the selection's own format passes
    # a record budget on the same folder re-runs only the selection, and reports tokens too
    again = run_selection(settings(models, tmp_path / "run", budget=10))
    summary = json.loads((again / "clusters.json").read_text())
    assert summary["budget_unit"] == "records" and summary["selected"] == 10 and summary["selected_tokens"] > 0
    # a record budget spends no tokens
    check_prompt_format(RecoverConfig(prompt=PromptFormat(cutoff=128)), again / "selected.jsonl")


def test_loss_gap_signal_reuses_the_scores(models, tmp_path, finished_run):
    s = settings(models, copy_run(finished_run, tmp_path / "run"))
    s.score.signal = "loss_gap"
    run = run_selection(s)
    assert json.loads((run / "timings.json").read_text())["score"]["reused"]
    summary = json.loads((run / "clusters.json").read_text())
    scores = pd.read_parquet(run / "scores.parquet")
    assert summary["signal"] == "loss_gap"
    np.testing.assert_allclose(scores["loss_gap"], scores["nll_pruned"] - scores["nll_dense"], atol=1e-9)
    cds = scores.groupby("cluster")["loss_gap"].mean()
    np.testing.assert_allclose([c["cds"] for c in summary["clusters"]], cds.to_numpy(), atol=1e-9)
    assert "paser_loss_gap" in _lines(run / "selected.jsonl")[0]


@pytest.mark.parametrize("budget", [20, "1200tok"])
@pytest.mark.parametrize("method", ["random", "longest", "shortest", "pruned_loss"])
def test_baselines_take_their_order_while_the_next_fits(models, tmp_path, method, budget):
    run = run_selection(settings(models, tmp_path / "run", method=method, budget=budget))
    scores = pd.read_parquet(run / "scores.parquet")
    summary = json.loads((run / "clusters.json").read_text())
    chosen = scores[scores["status"] == "selected"].sort_values("rank")
    rest = scores[scores["status"] == "unvisited"]
    tokens = isinstance(budget, str)
    if tokens:
        assert chosen["n_tokens"].sum() <= 1200 and summary["budget_unit"] == "tokens"
    else:
        assert len(chosen) == 20 and summary["budget_unit"] == "records"
    assert summary["selected_tokens"] == chosen["n_tokens"].sum()
    if method == "random":  # the seeded permutation, cut where the next record no longer fits
        order = np.random.default_rng(0).permutation(len(scores))
        assert list(chosen.index) == list(order[:len(chosen)])
        nxt = order[len(chosen)]
    else:
        key, descending = {"longest": ("n_response", True), "shortest": ("n_tokens", False),
                           "pruned_loss": ("nll_pruned", True)}[method]
        if descending:
            assert chosen[key].min() >= rest[key].max()
            assert chosen[key].is_monotonic_decreasing
        else:
            assert chosen[key].max() <= rest[key].min()
            assert chosen[key].is_monotonic_increasing
        nxt = None
    if tokens and nxt is not None:
        assert chosen["n_tokens"].sum() + scores.loc[nxt, "n_tokens"] > 1200
    assert (run / "degradation.parquet").exists() == (method == "pruned_loss")
    assert not (run / "embeddings.npy").exists()
    report = (run / "report.md").read_text()
    assert f"selected {len(chosen)} records" in report and method in report
    if method == "pruned_loss":
        degradation = pd.read_parquet(run / "degradation.parquet")
        np.testing.assert_allclose(scores["nll_pruned"], degradation["nll_pruned"])


def test_a_scoring_process_reads_the_pool_once_and_parses_only_its_shards(models, tmp_path, monkeypatch):
    """Each shard used to re-read and re-parse the whole pool (pool size x shards: about 3,900 full
    reads at a million records): a process now reads the pool file once and builds only the records
    of the shards it scores."""
    import paser.selection.runfolder as runfolder
    from paser.selection.pipeline import stage_cluster, stage_data, stage_embed, stage_score, stage_tokens

    s = settings(models, tmp_path / "run")
    s.score.shard_size = 20  # 96 records: 5 shards
    run = tmp_path / "run"
    run.mkdir()
    for stage in (stage_data, stage_tokens, stage_embed, stage_cluster):
        stage(s, run)
    runfolder._POOL_FRAMES.clear()
    reads, built = [], []
    read = pd.read_parquet

    def counted(path, *args, **kwargs):
        if str(path).endswith("pool.parquet") and kwargs.get("columns") != ["id"]:  # the texts, not the ids alone
            reads.append(kwargs.get("columns"))
        return read(path, *args, **kwargs)

    original = runfolder.read_run_pool

    def parsed(run_folder, rows=None, **kwargs):
        records = original(run_folder, rows, **kwargs)
        built.append(len(records))
        assert all(r.fields is None for r in records)  # scoring needs the texts alone
        return records

    monkeypatch.setattr(runfolder.pd, "read_parquet", counted)
    monkeypatch.setattr("paser.selection.scoring.read_run_pool", parsed)
    stage_score(s, run)
    assert len(reads) == 1 and reads[0] is not None and "fields" not in reads[0]  # once, without the records' fields
    # five shards of 20 (16) records, then the whole pool once to collect them
    assert built == [20, 20, 20, 20, 16, 96]


def test_the_pool_read_for_its_texts_alone_has_the_same_records_without_their_fields(models, tmp_path):
    import dataclasses

    import paser.selection.runfolder as runfolder
    from paser.selection.pipeline import stage_data

    s = settings(models, tmp_path / "run")
    run = tmp_path / "run"
    run.mkdir()
    stage_data(s, run)
    runfolder._POOL_FRAMES.clear()
    texts = runfolder.read_run_pool(run, fields=False)
    assert "fields" not in next(iter(runfolder._POOL_FRAMES.values()))  # not read at all
    whole = runfolder.read_run_pool(run)  # the table held has no fields: read again, whole
    assert all(r.fields is None for r in texts) and all(isinstance(r.fields, dict) and r.fields for r in whole)
    assert texts == [dataclasses.replace(r, fields=None) for r in whole]
    assert runfolder.read_run_pool(run, [3, 1], fields=False) == [texts[3], texts[1]]  # the whole table serves


def test_the_pool_is_written_a_row_group_at_a_time(tmp_path, monkeypatch):
    """pool.parquet holds the same rows whether built in one frame or in parts (a part per row
    group, so a pool of millions is never copied whole); an empty pool still writes its columns."""
    import pyarrow.parquet as pq

    from paser.data.suite import suite_pool
    from paser.selection import pipeline
    from paser.selection.runfolder import atomic_parquet_parts, read_run_pool

    records = suite_pool(30, seed=2).records
    whole = next(pipeline.pool_frames(records))
    monkeypatch.setattr(pipeline, "POOL_ROWS_PER_GROUP", 7)
    atomic_parquet_parts(pipeline.pool_frames(records), tmp_path / "pool.parquet")
    assert pq.ParquetFile(tmp_path / "pool.parquet").num_row_groups == 5
    assert pd.read_parquet(tmp_path / "pool.parquet").equals(whole)
    (tmp_path / "pool.parquet.fp").write_text("fp")
    assert read_run_pool(tmp_path) == records
    atomic_parquet_parts(pipeline.pool_frames([]), tmp_path / "empty.parquet")
    assert list(pd.read_parquet(tmp_path / "empty.parquet").columns) == list(whole.columns)
