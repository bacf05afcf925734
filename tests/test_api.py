"""``paser.api``: every verb takes ``(config=None, **overrides)`` alike and returns a small result."""

from __future__ import annotations

import json

import pytest

from paser.api import SELECT_SECTIONS, split_overrides
from paser.errors import ConfigError
from tests.conftest import copy_run


def test_a_flat_key_goes_to_the_main_section_first_else_to_the_one_section_that_has_it():
    args, found = split_overrides("select", {"method": "strat", "n_clusters": 4, "engine": "dask", "seed": 3},
                                  SELECT_SECTIONS, "select", {})
    assert args == {}
    # method and seed are keys of other sections too: the main section's win
    assert found["select"] == {"method": "strat", "seed": 3}
    assert found["cluster"] == {"n_clusters": 4} and found["distribute"] == {"engine": "dask"}


def test_a_section_is_given_whole_and_none_keeps_the_files_value():
    _, found = split_overrides("select", {"embed": {"batch_size": 8, "model": None}, "budget": None, "cutoff": 256},
                               SELECT_SECTIONS, "select", {})
    assert found["embed"] == {"batch_size": 8} and found["select"] == {} and found["prompt"] == {"cutoff": 256}


def test_a_shared_or_unknown_key_and_a_missing_argument_fail_in_one_line():
    with pytest.raises(ConfigError, match=r"'batch_size' is a key of embed and score: give it inside its section, "
                                          r"e.g. embed="):
        split_overrides("select", {"batch_size": 8}, SELECT_SECTIONS, "select", {})
    with pytest.raises(ConfigError, match=r"paser.select: 'batch' is neither an argument"):
        split_overrides("select", {"batch": 8}, SELECT_SECTIONS, "select", {})
    with pytest.raises(ConfigError, match=r"embed= takes a section's keys as a dict"):
        split_overrides("select", {"embed": 8}, SELECT_SECTIONS, "select", {})
    with pytest.raises(ConfigError, match=r"paser.recover: model, data must be given"):
        import paser

        paser.recover(epochs=1)


def test_select_returns_its_run_and_figures(finished_run, tmp_path):
    import paser

    run = copy_run(finished_run, tmp_path / "run")
    settings = json.loads((run / "manifest.json").read_text())["settings"]
    settings["select"]["out"] = str(run)
    result = paser.select(**settings)  # every stage reused from the folder, by fingerprint
    summary = json.loads((run / "clusters.json").read_text())
    assert result.out == run and (result.records, result.tokens) == (summary["selected"], summary["selected_tokens"])
    assert result.clusters == summary["K"] and result.method == "paser"
    assert result.compute == json.loads((run / "manifest.json").read_text())["compute"]
