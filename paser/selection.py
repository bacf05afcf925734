"""Stages 5-7 put together: allocate the budget, rank by IES inside clusters, filter by the
Concept Consistency Graph, and re-allocate shortfalls until the budget is reached.

Input is the per-record score table (cluster, JSD, token counts, concepts); no model is needed,
so re-selecting at another budget takes seconds. Clusters are visited most degraded first;
inside a cluster records go by IES = JSD / ln(L^2). A cluster left short by rejections gives its
shortfall to clusters that still have candidates (by CDS), until the budget is met or no
candidate is left. Every rejection keeps its conflicting concept pair.

    python -c "from paser.selection import importance_efficiency; print(importance_efficiency([0.2], [100]))"
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from paser.allocation import allocate_budget, cluster_degradation
from paser.concepts import ConceptGraph


def importance_efficiency(jsd, n_tokens) -> np.ndarray:
    """IES = JSD / ln(cost), cost = L^2 with L = prompt + response tokens floored at 2."""
    length = np.maximum(np.asarray(n_tokens, dtype=float), 2.0)
    return np.asarray(jsd, dtype=float) / (2.0 * np.log(length))


def resolve_budget(budget: float | int, n: int) -> int:
    """A count (``100``) or a fraction of the pool (``0.2``) as a record count in [1, n]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ValueError(f"budget must be a count or a fraction, got {budget!r}")
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    if isinstance(budget, float) and budget < 1:
        count = int(math.floor(budget * n + 0.5))
        if count < 1:
            raise ValueError(f"budget {budget} of {n} records selects nothing")
        return count
    if budget != int(budget):
        raise ValueError(f"budget {budget} is neither a fraction below 1 nor a whole count")
    if budget > n:
        raise ValueError(f"budget {int(budget)} is above the pool size {n}")
    return int(budget)


@dataclass
class SelectionResult:
    """The outcome of selection over a score table (scikit-learn-like learned attributes)."""

    table: pd.DataFrame  # the input table plus ies, status, reason, conflict_a/b, rank
    cds: np.ndarray
    sizes: np.ndarray
    allocation: np.ndarray  # the first, CDS-proportional allocation
    selected_per_cluster: np.ndarray
    rejected_per_cluster: np.ndarray
    budget: int

    @property
    def selected(self) -> pd.DataFrame:
        return self.table[self.table["status"] == "selected"].sort_values("rank")


class Selector:
    """Budgeted, degradation-aware selection with the concept filter (scikit-learn style).

    ``fit(table)`` needs columns ``cluster``, ``jsd``, ``n_prompt``, ``n_response`` and, with the
    filter on, ``concepts`` (list of strings). Learned: ``cds_``, ``allocation_``, ``result_``.
    """

    def __init__(self, budget: float | int, allocation: str = "largest_remainder", use_concepts: bool = True,
                 order: str = "ies", random_state: int = 0):
        self.budget = budget
        self.allocation = allocation
        self.use_concepts = use_concepts
        self.order = order  # "ies", or the ablations "jsd" (no cost term) and "random"
        self.random_state = random_state

    def fit(self, table: pd.DataFrame) -> Selector:
        if self.order not in ("ies", "jsd", "random"):
            raise ValueError(f"order must be ies, jsd or random, got {self.order!r}")
        t = table.reset_index(drop=True).copy()
        budget = resolve_budget(self.budget, len(t))
        labels = t["cluster"].to_numpy()
        k = int(labels.max()) + 1 if len(t) else 0
        jsd = t["jsd"].to_numpy(dtype=float)
        t["ies"] = importance_efficiency(jsd, t["n_prompt"] + t["n_response"])
        eligible = ~np.isnan(jsd)
        sizes = np.bincount(labels[eligible], minlength=k)
        cds = cluster_degradation(labels, jsd, k)
        target = min(budget, int(sizes.sum()))
        quota = allocate_budget(cds, sizes, target, self.allocation)

        # candidates per cluster in visiting order
        rng = np.random.default_rng(self.random_state)
        queues: list[list[int]] = []
        for c in range(k):
            members = np.flatnonzero((labels == c) & eligible)
            if self.order == "random":
                members = rng.permutation(members)
            else:
                key = t["jsd" if self.order == "jsd" else "ies"].to_numpy()[members]
                members = members[np.lexsort((members, -key))]
            queues.append(members.tolist())
        cursor = [0] * k
        status = np.array(["unvisited"] * len(t), dtype=object)
        status[~eligible] = "unscored"
        reason = np.array([""] * len(t), dtype=object)
        reason[~eligible] = "no scored tokens within the cutoff"
        conflict_a = np.array([""] * len(t), dtype=object)
        conflict_b = np.array([""] * len(t), dtype=object)
        graph = ConceptGraph()
        concepts = t["concepts"].tolist() if self.use_concepts else None
        chosen: list[int] = []
        taken = np.zeros(k, dtype=np.int64)
        rejected = np.zeros(k, dtype=np.int64)
        want = quota.copy()
        cluster_order = sorted(range(k), key=lambda c: (-cds[c], c))
        while True:
            for c in cluster_order:
                while taken[c] < want[c] and cursor[c] < len(queues[c]):
                    i = queues[c][cursor[c]]
                    cursor[c] += 1
                    ok, pair = (True, None) if concepts is None else graph.offer(list(concepts[i]))
                    if ok:
                        status[i] = "selected"
                        chosen.append(i)
                        taken[c] += 1
                    else:
                        status[i], reason[i] = "rejected", "concept conflict"
                        conflict_a[i], conflict_b[i] = pair
                        rejected[c] += 1
            short = target - len(chosen)
            room = np.array([len(queues[c]) - cursor[c] for c in range(k)])
            if short <= 0 or room.sum() == 0:
                break
            # shortfall goes to clusters that still have candidates, by CDS, capped at what is left
            want = taken + allocate_budget(cds, room, short, "largest_remainder")
        rank = np.zeros(len(t), dtype=np.int64)
        rank[chosen] = np.arange(1, len(chosen) + 1)
        t["status"], t["reason"], t["rank"] = status, reason, rank
        t["conflict_a"], t["conflict_b"] = conflict_a, conflict_b
        self.cds_ = cds
        self.allocation_ = quota
        self.result_ = SelectionResult(table=t, cds=cds, sizes=sizes, allocation=quota,
                                       selected_per_cluster=taken, rejected_per_cluster=rejected,
                                       budget=budget)
        return self
