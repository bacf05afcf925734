"""Adaptive allocation over rounds of recovery: the share update, the plan, the first round in the
selection run, and recovery in rounds on tiny models (static when no gap moves, resumable)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from paser.errors import ConfigError
from paser.selection.adaptive import make_plan, remaining_gap, round_amounts, round_steps, update_shares
from paser.selection.configs import AdaptiveConfig


def test_shares_move_towards_the_clusters_whose_gap_remains():
    shares = base = np.array([0.5, 0.3, 0.2])
    moved = update_shares(shares, base, np.array([0.9, 0.5, 0.1]), 1.0, 0.25)
    assert moved.sum() == pytest.approx(1.0) and moved[0] > shares[0] and moved[2] < shares[2]
    # equal remaining gaps, or step 0: the shares stay
    assert np.allclose(update_shares(shares, base, np.array([0.7, 0.7, 0.7]), 1.0, 0.25), shares)
    assert np.allclose(update_shares(shares, base, np.array([0.9, 0.5, 0.1]), 0.0, 0.25), shares)
    # the floor: a cluster keeps at least floor x its size share
    far = update_shares(shares, base, np.array([5.0, 0.0, 0.0]), 3.0, 0.25)
    assert far.sum() == pytest.approx(1.0) and (far >= 0.25 * base - 1e-12).all()


def test_remaining_gap():
    rho = remaining_gap(np.array([2.5, 3.0, 2.0, 1.5, 9.0]), np.array([2.0] * 5), np.array([3.0, 3.0, 2.0, 3.0, 3.0]))
    # the third cluster was not hurt: nothing remains to close; below the dense model: nothing; far worse: 2
    assert np.allclose(rho, [0.5, 1.0, 0.0, 0.0, 2.0])


def test_rounds_split_the_budget_and_the_steps_exactly():
    assert round_amounts(10, 4) == [3, 3, 2, 2] and sum(round_amounts(1001, 4)) == 1001
    assert sum(round_steps([3, 3, 2, 2], 25)) == 25


def test_the_plan_keeps_a_probe_per_cluster_out_of_the_draws(tmp_path):
    table = pd.DataFrame({"id": [f"r{i}" for i in range(40)], "cluster": [i % 4 for i in range(40)],
                          "n_prompt": 10, "n_response": 5})
    plan = make_plan(tmp_path, table, 200, "tokens", AdaptiveConfig(rounds=3, probe_per_cluster=2), seed=0)
    assert len(plan["probe"]) == 8 and sum(plan["amounts"]) == 200 and len(plan["amounts"]) == 3
    assert np.isclose(sum(plan["base_shares"]), 1.0)
    again = make_plan(tmp_path, table, 200, "tokens", AdaptiveConfig(rounds=3, probe_per_cluster=2), seed=0)
    assert again["probe"] == plan["probe"]  # seeded
    with pytest.raises(ValueError, match="above"):
        make_plan(tmp_path, table, 10_000, "tokens", AdaptiveConfig(), 0)


@pytest.fixture(scope="module")
def models(tiny_pair):
    return tiny_pair


def _select(models, out, step=1.0):
    from paser.selection.pipeline import run_selection
    from paser.selection.settings import Settings

    dense, pruned = models
    return run_selection(Settings.load(None, {
        "select": {"dense": dense, "pruned": pruned, "suite_size": 96, "budget": "0.4tok", "out": str(out),
                   "progress": False, "pictures": False, "method": "adaptive"},
        "adaptive": {"rounds": 3, "probe_per_cluster": 2, "step": step}, "cluster": {"k_max": 6}}))


RUN = dict(epochs=1, batch_size=4, micro_batch_size=4, batch_tokens=400, learning_rate=5e-3, val_size=0,
           save_every=2, progress=False)


def test_selection_plans_the_rounds_and_draws_the_first(models, tmp_path):
    run = _select(models, tmp_path / "sel")
    plan = json.loads((run / "rounds.json").read_text())
    scores = pd.read_parquet(run / "scores.parquet")
    assert (scores["status"] == "probe").sum() == len(plan["probe"]) > 0
    selected = set(scores.loc[scores["status"] == "selected", "id"])
    assert selected.isdisjoint(plan["probe"])
    summary = json.loads((run / "clusters.json").read_text())
    assert summary["rounds"]["rounds"] == 3 and summary["selected_tokens"] <= plan["amounts"][0]
    assert not (run / "degradation.parquet").exists()  # no model ran at selection
    # a later selection of another method in the same folder drops the plan: it trains without rounds
    from paser.selection.adaptive import read_plan
    from paser.selection.pipeline import run_selection
    from paser.selection.settings import Settings

    for method in ("random", "strat"):
        again = run_selection(Settings.load(None, {"select": {"dense": models[0], "pruned": models[1],
                                                              "suite_size": 96, "budget": "0.4tok",
                                                              "out": str(run), "progress": False, "method": method},
                                                   "cluster": {"k_max": 6}}))
        assert not (again / "rounds.json").exists() and read_plan(again / "selected.jsonl") is None


def test_rounds_train_the_budget_and_follow_the_gaps(models, tmp_path):
    from paser.recovery import recover

    _, pruned = models
    run = _select(models, tmp_path / "sel")
    plan = json.loads((run / "rounds.json").read_text())
    with pytest.raises(ConfigError, match="adaptive selection.*trains on a fixed file"):  # self-data distillation
        recover(pruned, str(run / "selected.jsonl"), tmp_path / "rec", **RUN, responses="dense")
    result = recover(pruned, str(run / "selected.jsonl"), tmp_path / "rec", **RUN)
    done = json.loads((tmp_path / "rec" / "recovery.json").read_text())
    rounds = done["adaptive"]["rounds"]
    assert len(rounds) == 3 and all(r["tokens"] <= a for r, a in zip(rounds, plan["amounts"]))
    ids = [set(h["ids"]) for h in json.loads((tmp_path / "rec" / "rounds.json").read_text())["rounds"]]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (set().union(*ids) & set(plan["probe"]))
    # the same optimizer steps as a static subset of the budget: round(budget / batch_tokens) per epoch
    assert result.steps == done["planned_steps"] == round(plan["budget"] / RUN["batch_tokens"])
    assert rounds[0]["rho"] is not None and rounds[2]["rho"] is None
    assert {"probe", "recovery"} <= {e["stage"] for e in done["compute"]["entries"]}


def test_an_adaptive_run_whose_gaps_never_change_draws_the_static_schedule(models, tmp_path, monkeypatch):
    import paser.recovery.rounds as rounds
    from paser.recovery import recover

    _, pruned = models
    adaptive = _select(models, tmp_path / "a", step=1.0)
    static = _select(models, tmp_path / "s", step=0.0)
    recover(pruned, str(static / "selected.jsonl"), tmp_path / "static", **RUN)
    first = {}
    original = rounds.validation_rows

    def frozen(model, examples, *args):  # every measurement returns the pruned model's: no gap moves
        found = original(model, examples, *args)
        return first.setdefault(len(examples), found)

    monkeypatch.setattr(rounds, "validation_rows", frozen)
    recover(pruned, str(adaptive / "selected.jsonl"), tmp_path / "adaptive", **RUN)
    drawn = [[h["ids"] for h in json.loads((tmp_path / f / "rounds.json").read_text())["rounds"]]
             for f in ("static", "adaptive")]
    assert drawn[0] == drawn[1]


def test_a_killed_adaptive_run_resumes_to_the_same_adapter(models, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import paser.recovery.job as rec
    from paser.recovery import recover

    _, pruned = models
    run = _select(models, tmp_path / "sel")
    data = str(run / "selected.jsonl")
    recover(pruned, data, tmp_path / "whole", **RUN)
    calls = {"n": 0}
    original = rec.objective_loss_sum

    def dies_late(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # in the second or third round, after a checkpoint
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(rec, "objective_loss_sum", dies_late)
    with pytest.raises(KeyboardInterrupt):
        recover(pruned, data, tmp_path / "killed", **RUN)
    monkeypatch.setattr(rec, "objective_loss_sum", original)
    recover(pruned, data, tmp_path / "killed", **RUN)
    a, b = (load_file(tmp_path / f / "adapter" / "adapter_model.safetensors") for f in ("whole", "killed"))
    for key in a:
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), atol=1e-6)
    rounds = [json.loads((tmp_path / f / "rounds.json").read_text())["rounds"] for f in ("whole", "killed")]
    assert [r["ids"] for r in rounds[0]] == [r["ids"] for r in rounds[1]]
