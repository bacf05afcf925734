"""Selection over a score table: order, concept filter, shortfall re-allocation, determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from paser.selection.selector import Selector
from tests.conftest import score_table as table


def test_budget_reached_and_split_by_cds():
    r = Selector(budget=6).fit(table()).result_
    assert len(r.selected) == 6
    assert list(r.allocation) == [3, 2, 1]
    assert list(r.selected_per_cluster) == [3, 2, 1]


def test_ies_order_inside_cluster():
    t = table(n_per=(5,), jsd=(0.2,))
    t["jsd"] = [0.1, 0.5, 0.3, 0.4, 0.2]
    t["n_prompt"] = 30
    r = Selector(budget=2, use_concepts=False).fit(t).result_
    assert list(r.selected["id"]) == ["c0-1", "c0-3"]
    assert list(r.selected["rank"]) == [1, 2]


def test_no_cost_ablation_orders_by_jsd_alone():
    t = table(n_per=(4,), jsd=(0.2,))
    t["jsd"] = [0.30, 0.31, 0.29, 0.10]
    t["n_prompt"] = [10, 400, 12, 10]  # the most degraded record is also the longest
    ies = Selector(budget=2, use_concepts=False).fit(t).result_
    jsd = Selector(budget=2, use_concepts=False, order="signal").fit(t).result_
    assert list(ies.selected["id"]) == ["c0-0", "c0-2"]  # the cost term pushes the long record back
    assert list(jsd.selected["id"]) == ["c0-1", "c0-0"]


def test_rejections_recorded_and_shortfall_reallocated():
    t = table()
    c0 = t.index[t["cluster"] == 0]
    t.loc[c0, "jsd"] = 0.3  # equal JSD, growing length: visited in index order
    # "a" and "b" arrive in different records; later records that join them conflict
    t.loc[c0, "concepts"] = pd.Series([["a", "p"], ["b", "q"]] + [["a", "b", f"z{i}"] for i in range(4)],
                                      index=c0)
    r = Selector(budget=9).fit(t).result_
    assert r.allocation[0] == 4 and r.allocation.sum() == 9
    assert r.selected_per_cluster[0] == 2 and r.rejected_per_cluster[0] == 4
    assert len(r.selected) == 9  # the shortfall of 2 went to clusters 1 and 2
    rejected = r.table[r.table["status"] == "rejected"]
    assert list(zip(rejected["conflict_a"], rejected["conflict_b"])) == [("a", "b")] * 4


def test_budget_unreachable_stops_when_candidates_run_out():
    t = table(n_per=(3, 3), jsd=(0.3, 0.2))
    t["concepts"] = [["x", "p"], ["y", "q"], ["x", "y"], ["x", "y", "r"], ["y", "x"], ["p", "q"]]
    r = Selector(budget=6).fit(t).result_
    assert len(r.selected) == 2
    assert set(r.table["status"]) == {"selected", "rejected"}


def test_unscored_records_are_never_selected():
    t = table()
    t.loc[0, "jsd"] = np.nan
    t.loc[7, "jsd"] = np.inf  # an fp16 overflow
    r = Selector(budget=18, use_concepts=False).fit(t).result_
    assert len(r.selected) == 16
    assert r.table.loc[0, "status"] == r.table.loc[7, "status"] == "unscored"
    t["n_scored"] = 5
    t.loc[0, "n_scored"] = 0
    reasons = Selector(budget=18, use_concepts=False).fit(t).result_.table["reason"]
    assert reasons[0] == "no scored tokens within the cutoff" and "jsd is not finite" in reasons[7]


def test_floor_allocation_is_not_topped_up_by_cds():
    t = table(n_per=(6, 6, 6), jsd=(0.5, 0.2, 0.1))
    t["jsd"] = t["cluster"].map({0: 0.5, 1: 0.2, 2: 0.1})
    r = Selector(budget=9, allocation="floor", use_concepts=False).fit(t).result_
    assert list(r.allocation) == [5, 2, 1]  # the paper's floor ends below the budget ...
    assert len(r.selected) == 8  # ... and no shortfall goes back by CDS


def test_deterministic_and_random_order_ablation():
    t = table(n_per=(20, 20), jsd=(0.3, 0.1))
    a = Selector(budget=10).fit(t).result_.selected["id"].tolist()
    b = Selector(budget=10).fit(t).result_.selected["id"].tolist()
    assert a == b
    r1 = Selector(budget=10, order="random", random_state=1).fit(t).result_.selected["id"].tolist()
    r2 = Selector(budget=10, order="random", random_state=2).fit(t).result_.selected["id"].tolist()
    assert r1 != r2


def _gap_guarantee(r, budget_tokens):
    """Selected tokens never exceed the budget; when short, every cluster with candidates left is
    blocked by a next record longer than what is left."""
    t = r.table
    spent = int(t.loc[t["status"] == "selected", "n_tokens"].sum())
    assert spent <= budget_tokens
    left = budget_tokens - spent
    for c, rows in t[t["status"] == "unvisited"].groupby("cluster"):
        # the next candidate of the cluster is its unvisited record with the best IES
        nxt = rows.sort_values("ies", ascending=False, kind="stable").iloc[0]
        assert nxt["n_tokens"] > left, (c, left, nxt["n_tokens"])
    return spent


def token_table(seed, n_per=(15, 10, 20), concepts=True):
    rng = np.random.default_rng(seed)
    t = table(n_per=n_per, jsd=(0.3, 0.2, 0.1), seed=seed)
    t["n_prompt"] = rng.integers(5, 40, len(t))
    t["n_response"] = rng.integers(1, 120, len(t))
    if concepts:  # a small vocabulary, so the filter rejects some records
        t["concepts"] = [list(rng.choice(list("abcdefgh"), size=3, replace=False)) for _ in range(len(t))]
    return t


@pytest.mark.parametrize("seed", range(12))
def test_token_budget_never_exceeded_and_within_one_record(seed):
    t = token_table(seed)
    total = int((t["n_prompt"] + t["n_response"]).sum())
    for fraction in (0.05, 0.2, 0.5):
        budget = int(fraction * total)
        r = Selector(budget=f"{budget}tok", use_concepts=seed % 2 == 0).fit(t).result_
        assert r.unit == "tokens" and r.budget == budget
        spent = _gap_guarantee(r, budget)
        assert spent == int(r.selected_tokens_per_cluster.sum())
        if seed % 2:  # no concept filter: nothing runs out, so the gap is below the longest record
            assert budget - spent < t["n_prompt"].add(t["n_response"]).max()


def test_token_budget_split_by_cds_in_tokens():
    t = table(n_per=(10, 10, 10))
    t["n_prompt"], t["n_response"] = 10, 10  # every record costs 20 tokens
    t["jsd"] = t["cluster"].map({0: 0.3, 1: 0.2, 2: 0.1})
    r = Selector(budget="120tok", use_concepts=False).fit(t).result_
    assert list(r.allocation) == [60, 40, 20]  # tokens, proportional to CDS 0.3 : 0.2 : 0.1
    assert list(r.selected_per_cluster) == [3, 2, 1]
    assert list(r.selected_tokens_per_cluster) == [60, 40, 20]


def test_token_budget_fills_each_cluster_in_order_while_the_next_fits():
    t = table(n_per=(4,), jsd=(0.2,))
    t["jsd"] = [0.4, 0.3, 0.2, 0.1]
    t["n_prompt"], t["n_response"] = [20, 20, 20, 20], [0, 30, 0, 0]  # the second in IES order costs 50
    r = Selector(budget="60tok", use_concepts=False, order="signal").fit(t).result_
    # 20 spent; the next (50) does not fit 60 and blocks its cluster: order is kept, not skipped
    assert list(r.selected["id"]) == ["c0-0"]


def test_token_budget_concept_rejections_reallocated():
    t = table()
    t["n_prompt"], t["n_response"] = 15, 5
    c0 = t.index[t["cluster"] == 0]
    t.loc[c0, "jsd"] = 0.3
    t.loc[c0, "concepts"] = pd.Series([["a", "p"], ["b", "q"]] + [["a", "b", f"z{i}"] for i in range(4)], index=c0)
    r = Selector(budget="180tok").fit(t).result_  # 9 records of 20 tokens
    assert 80 <= r.allocation[0] < 100 and r.allocation.sum() == 180  # room for 4 records of 20 tokens
    assert r.selected_per_cluster[0] == 2 and r.rejected_per_cluster[0] == 4
    assert len(r.selected) == 9 and r.selected_tokens_per_cluster.sum() == 180


def test_token_budget_below_the_shortest_record_is_an_error():
    t = table()
    with pytest.raises(ValueError, match="smaller than the shortest scored record"):
        Selector(budget="25tok").fit(t)


def test_loss_gap_signal_drives_allocation_and_order():
    t = table(n_per=(6, 6), jsd=(0.3, 0.1))
    t["loss_gap"] = np.where(t["cluster"] == 0, -0.2, 1.0) + np.arange(len(t)) * 1e-3
    by_jsd = Selector(budget=4, use_concepts=False).fit(t).result_
    by_gap = Selector(budget=4, use_concepts=False, signal="loss_gap").fit(t).result_
    assert list(by_jsd.selected_per_cluster) == [3, 1]
    # cluster 0 got better on average after pruning: no share of the budget
    assert list(by_gap.allocation) == [0, 4] and by_gap.signal == "loss_gap"
    assert by_gap.cds[0] < 0
    with pytest.raises(ValueError, match="no 'nll' column"):
        Selector(budget=4, signal="nll").fit(t)


def test_uniform_allocation_tops_up_uniformly():
    t = table(n_per=(6, 6, 6), jsd=(0.5, 0.2, 0.1))
    c0 = t.index[t["cluster"] == 0]
    t.loc[c0, "concepts"] = pd.Series([["a", "p"], ["b", "q"]] + [["a", "b", f"z{i}"] for i in range(4)], index=c0)
    r = Selector(budget=9, allocation="uniform").fit(t).result_
    assert list(r.allocation) == [3, 3, 3]
    # cluster 0 gives 1 back; by CDS it would go to cluster 1, uniformly the tie goes to the lower index
    assert list(r.selected_per_cluster) == [2, 4, 3]
