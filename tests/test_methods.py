"""Selection methods as registered objects: a method added from outside paser (this module) runs
end to end through the pipeline, report and comparison grammar, and asks for only what it declares."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from paser.errors import ConfigError
from paser.selection import methods
from paser.selection.configs import SampleConfig
from paser.selection.methods import ClusteredMethod, OrderedMethod, register
from paser.selection.pipeline import run_selection
from paser.selection.selector import StratifiedSelector
from tests.conftest import copy_run


class HighestGap(OrderedMethod):
    """Records with the largest pruned-minus-dense response NLL first: needs every score, no cluster."""

    name = "toy_gap"
    how = "the largest loss gaps first (a method registered by the tests)"

    def scores(self, settings) -> str:
        return "all"

    def order(self, settings, table):
        gap = table["loss_gap"].to_numpy(dtype=float)
        scored = np.flatnonzero(np.isfinite(gap))
        return scored[np.lexsort((scored, -gap[scored]))]


class BySize(ClusteredMethod):
    """Cluster shares by size, records drawn uniformly inside each: needs clusters, no model."""

    name = "toy_size"

    def scores(self, settings) -> str:
        return "none"

    def pick(self, settings, table, budget, embeddings=None, run=None):
        return StratifiedSelector(budget, SampleConfig.uniform(), random_state=settings.select.seed).fit(table).result_


@pytest.fixture()
def registered(monkeypatch):
    """The registry with the two toy methods, for this test only."""
    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))
    register(HighestGap())
    register(BySize())


def test_a_registered_ordered_method_runs_end_to_end(registered, finished_run, tmp_path):
    run = run_selection(_settings(finished_run, tmp_path, "toy_gap"))
    scores = pd.read_parquet(run / "degradation.parquet")
    selected = [json.loads(line) for line in (run / "selected.jsonl").read_text().splitlines()]
    expected = scores.sort_values(["loss_gap"], ascending=False, kind="stable")["id"].head(len(selected)).tolist()
    assert [r["paser_id"] for r in selected] == expected
    assert len(selected) == 24  # 25% of 96 records
    summary = json.loads((run / "clusters.json").read_text())
    assert summary["method"] == "toy_gap" and summary["clusters"] == []
    timings, before = (json.loads((r / "timings.json").read_text()) for r in (run, finished_run))
    assert timings["score"]["reused"]  # its scores, reused
    assert timings["embed"] == before["embed"] and timings["cluster"] == before["cluster"]  # never asked for
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["selection"]["method"] == "toy_gap" and "models" in manifest


def test_a_registered_clustered_method_runs_without_a_model(registered, finished_run, tmp_path):
    run = run_selection(_settings(finished_run, tmp_path, "toy_size"))
    timings, before = (json.loads((r / "timings.json").read_text()) for r in (run, finished_run))
    assert timings["score"] == before["score"] and timings["cluster"]["reused"]
    # the same draw as strat configured alike: the toy is that configuration, registered as a method
    strat = run_selection(_settings(finished_run, tmp_path / "strat", "strat",
                                    sample={"cds_temperature": 0.0, "ies_temperature": 0.0, "dedup": None}))
    ids = [(r / "selected.jsonl").read_text() for r in (run, strat)]
    assert ids[0] == ids[1] and ids[0]
    assert json.loads((run / "clusters.json").read_text())["method"] == "toy_size"


def test_a_registered_method_is_an_arm_of_a_comparison(registered):
    from paser.comparison.arms import parse_arm

    assert parse_arm("b:toy_gap", {"b": 0.25}).selection()["select"]["method"] == "toy_gap"
    with pytest.raises(ConfigError, match="unknown method 'adaptive'"):
        parse_arm("b:adaptive", {"b": 0.25})


def test_names_are_checked_and_taken_names_refused(registered):
    from paser.selection.settings import Settings

    with pytest.raises(ConfigError, match="select.method: unknown selection method 'toy_nothing'; known: .*toy_gap"):
        Settings.from_dict({"select": {"method": "toy_nothing"}})
    with pytest.raises(ValueError, match="not yet registered"):
        register(HighestGap())


def _settings(finished_run, tmp_path, method: str, **sections):
    """Settings of ``finished_run``'s selection with another method, into a copy of it."""
    from paser.selection.settings import Settings

    base = json.loads((finished_run / "settings.json").read_text())
    out = copy_run(finished_run, tmp_path / "run")
    base["select"] |= {"method": method, "out": str(out)}
    for section, values in sections.items():
        base[section] = base.get(section, {}) | values
    return Settings.from_dict(base)
