"""Budget allocation: exact totals (property-tested), caps, water-filling, the floor variant."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paser.selection.allocation import allocate_budget, cluster_degradation
from paser.selection.selector import importance_efficiency


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1, allow_nan=False), st.integers(0, 200)), min_size=1, max_size=30),
       st.integers(0, 5000))
def test_total_is_exactly_min_budget_n(clusters, budget):
    cds = [c for c, _ in clusters]
    sizes = [s for _, s in clusters]
    alloc = allocate_budget(cds, sizes, budget)
    assert alloc.sum() == min(budget, sum(sizes))
    assert np.all(alloc <= np.array(sizes)) and np.all(alloc >= 0)


def test_proportional_to_cds():
    alloc = allocate_budget([0.3, 0.2, 0.1], [100, 100, 100], 60)
    assert list(alloc) == [30, 20, 10]


def test_largest_remainder():
    # quotas 3.33, 3.33, 3.33 -> one extra goes to the first (ties: larger CDS, then lower index)
    assert list(allocate_budget([1, 1, 1], [10, 10, 10], 10)) == [4, 3, 3]
    assert list(allocate_budget([0.5, 0.3, 0.2], [10, 10, 10], 7)) == [4, 2, 1]


def test_cap_and_water_filling():
    # the most degraded cluster holds only 2; its surplus goes to the others by CDS
    alloc = allocate_budget([0.9, 0.3, 0.1], [2, 100, 100], 40)
    assert alloc[0] == 2 and alloc.sum() == 40 and alloc[1] > alloc[2]


def test_zero_cds_falls_back_to_sizes():
    assert list(allocate_budget([0, 0], [30, 10], 8)) == [6, 2]


def test_floor_variant_may_fall_short():
    alloc = allocate_budget([1, 1, 1], [10, 10, 10], 10, method="floor")
    assert list(alloc) == [3, 3, 3]


def test_uniform_ablation_ignores_cds():
    assert list(allocate_budget([0.9, 0.1], [50, 50], 10, method="uniform")) == [5, 5]


def test_cluster_degradation_ignores_nan():
    labels = np.array([0, 0, 1, 1])
    assert list(cluster_degradation(labels, np.array([0.2, 0.4, np.nan, 0.1]), 2)) == pytest.approx([0.3, 0.1])


def test_ies():
    assert importance_efficiency([0.4], [100])[0] == pytest.approx(0.4 / (2 * np.log(100)))
    assert importance_efficiency([0.4], [1])[0] == pytest.approx(0.4 / (2 * np.log(2)))
