"""Progress: the scoring display's accounting (batches, finished and resumed shards), stage names
as they start, log lines instead of bars off a terminal, and --quiet; both selection paths report
every scored batch."""

from __future__ import annotations

import pytest

from paser import progress
from paser.progress import ScoringProgress
from tests.conftest import SCORING_SECTIONS as SECTIONS
from tests.conftest import record_progress

pytestmark = pytest.mark.usefixtures("prefect_api")  # flows here run against the test process's one Prefect server


@pytest.fixture(autouse=True)
def _loud():
    progress.set_quiet(False)
    yield
    progress.set_quiet(False)


def test_batches_and_shards_add_up_once(capsys):
    shown = ScoringProgress(600, "degradation")
    shown.batch(0, 100, 5000)
    shown.batch(0, 100, 5000)
    shown.shard_done(0, 256)  # its last 56 records were not reported by a batch
    shown.shard_done(1, 256, computed=False)  # read back from a finished shard
    assert shown.done == 512 and shown.computed_records == 256 and shown.tokens == 10_000
    shown.batch(2, 88, 4400)
    shown.shard_done(2, 88)
    assert shown.done == 600
    err = capsys.readouterr().err  # off a terminal: log lines on stderr, no bar
    assert "paser: degradation: 600/600 records" in err and "tok/s" in err and "ETA 0:00" in err
    shown.shard_done(2, 88)  # nothing new: the last line is not repeated
    assert capsys.readouterr().err == ""


def test_stage_names_are_logged_off_a_terminal_and_quiet_silences_everything(capsys):
    progress.announce("embedding the instructions ...")
    assert "paser: embedding the instructions ..." in capsys.readouterr().err
    progress.set_quiet(True)
    progress.announce("embedding ...")
    shown = ScoringProgress(10)
    shown.shard_done(0, 10)
    assert capsys.readouterr().err == "" and not progress.bar_enabled(True)


def test_every_scored_batch_is_reported_and_a_resumed_run_counts_its_finished_shards(tiny_pair, tmp_path,
                                                                                      monkeypatch, capsys):
    import os

    from paser.selection.pipeline import run_selection
    from paser.selection.scoring import plan_scoring
    from paser.selection.settings import Settings

    batches, shards = record_progress(monkeypatch)
    dense, pruned = tiny_pair
    settings = Settings.load(None, SECTIONS | {"select": {"dense": dense, "pruned": pruned, "suite_size": 60,
                                                          "budget": 12, "out": str(tmp_path / "run")}})
    run = run_selection(settings)
    assert sum(n for _, n, _ in batches) == 60 and {s for s, _, _ in batches} == {0, 1}
    assert all(tokens > 0 for *_, tokens in batches)
    assert sorted(shards) == [(0, 32, True), (1, 28, True)]
    err = capsys.readouterr().err
    assert "scoring degradation of 60 records (2 shards" in err and "finding capability clusters ..." in err
    batches.clear(), shards.clear()
    (run / "degradation.parquet").unlink()
    os.remove(plan_scoring(settings, run, pruned).shard_dir / "shard-00001.parquet")
    run_selection(settings)
    assert sum(n for _, n, _ in batches) == 28 and sorted(shards) == [(0, 32, False), (1, 28, True)]


def test_quiet_on_the_command_line(tiny_pair, tmp_path, capsys):
    from typer.testing import CliRunner

    from paser.cli import app

    dense, pruned = tiny_pair
    args = ["select", "--dense", dense, "--pruned", pruned, "--suite-size", "40", "--budget", "8", "--clusters", "4",
            "--no-flow"]
    loud = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert loud.exit_code == 0, loud.output
    assert "paser: scoring degradation of 40 records" in loud.output + capsys.readouterr().err
    quiet = CliRunner().invoke(app, ["--quiet", *args, "--out", str(tmp_path / "b")])
    assert quiet.exit_code == 0, quiet.output
    assert "paser:" not in quiet.output + capsys.readouterr().err and "selected 8 records" in quiet.output
