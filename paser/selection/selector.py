"""Stages 5-7 put together: allocate the budget, rank by IES inside clusters, filter by the
Concept Consistency Graph, and re-allocate shortfalls until the budget is reached.

Input is the per-record score table (cluster, JSD or loss_gap, token counts, concepts); no model
is needed, so re-selecting at another budget takes seconds. The budget is in records or tokens
(``paser.selection.budget``). Clusters are visited most degraded first; inside a cluster records go by
IES = degradation / ln(L^2). A cluster left short by rejections gives its
shortfall to clusters that still have candidates (by CDS), until the budget is met or no
candidate is left. Every rejection keeps its conflicting concept pair. ``StratifiedSelector``
(``--method strat``, paser.selection.stratified) runs the same budget loop with tempered size shares,
tempered random draws and near-duplicate removal instead.

    python -c "from paser.selection.selector import importance_efficiency; print(importance_efficiency([0.2], [100]))"
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from paser.selection.allocation import allocate_budget, cluster_degradation
from paser.selection.budget import parse_budget, record_costs, record_tokens
from paser.selection.concepts import ConceptGraph
from paser.selection.configs import SampleConfig
from paser.selection.stratified import NearDuplicates, cluster_weights, draw_keys


def importance_efficiency(degradation, n_tokens) -> np.ndarray:
    """IES = degradation (JSD or loss_gap) / ln(cost), cost = L^2 with L = prompt + response tokens
    floored at 2."""
    length = np.maximum(np.asarray(n_tokens, dtype=float), 2.0)
    return np.asarray(degradation, dtype=float) / (2.0 * np.log(length))


@dataclass
class SelectionResult:
    """The outcome of selection over a score table (scikit-learn-like learned attributes).

    Per-cluster arrays are indexed by cluster; ``allocation`` and ``budget`` are in the budget's
    ``unit`` (records or tokens), the selected counts in both."""

    table: pd.DataFrame  # the input table plus n_tokens, ies, status, reason, conflict_a/b, rank
    cds: np.ndarray
    sizes: np.ndarray
    allocation: np.ndarray  # the first, CDS-proportional allocation
    selected_per_cluster: np.ndarray
    rejected_per_cluster: np.ndarray
    budget: int
    unit: str = "records"
    selected_tokens_per_cluster: np.ndarray | None = None
    signal: str = "jsd"

    @property
    def selected(self) -> pd.DataFrame:
        return self.table[self.table["status"] == "selected"].sort_values("rank")


ORDERS = ("ies", "signal", "random")


class Selector:
    """Budgeted, degradation-aware selection with the concept filter (scikit-learn style).

    ``fit(table)`` needs columns ``cluster``, the signal column (``jsd`` by default, or
    ``loss_gap``), ``n_prompt``, ``n_response`` and, with the filter on, ``concepts`` (list of
    strings). ``budget`` is a ``Budget``, a count or fraction of records, or a token amount
    (``"40000tok"``, ``"0.2tok"``). Learned: ``cds_``, ``allocation_``, ``result_``.

    In tokens, the budget is split over clusters by CDS (largest remainder on tokens, capped at a
    cluster's tokens and water-filled), each cluster is filled in its order while its next record
    fits its share, shortfalls are re-allocated as with records, and a last pass over the clusters
    (most degraded first) adds each one's next records while they fit the whole budget. So the
    selected tokens never exceed the budget, and when they fall short of it every cluster that
    still has candidates is blocked by a next record longer than what is left: the gap is below
    that record's length, hence below the cutoff.
    """

    def __init__(self, budget, allocation: str = "largest_remainder", use_concepts: bool = True,
                 order: str = "ies", random_state: int = 0, signal: str = "jsd"):
        self.budget = budget
        self.allocation = allocation
        self.use_concepts = use_concepts
        self.order = order  # "ies", or the ablations "signal" (no cost term) and "random"
        self.random_state = random_state
        self.signal = signal

    def fit(self, table: pd.DataFrame, embeddings: np.ndarray | None = None) -> Selector:
        """Select from ``table``; ``embeddings`` (one row per record, unit norm) are used by
        selectors that skip near-duplicates."""
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.signal not in table:
            raise ValueError(f"the score table has no {self.signal!r} column (the selection signal)")
        t = table.reset_index(drop=True).copy()
        budget = parse_budget(self.budget)
        t["n_tokens"] = record_tokens(t)
        cost = record_costs(budget, t)
        amount = budget.resolve(len(t), int(t["n_tokens"].sum()))
        labels = t["cluster"].to_numpy()
        k = int(labels.max()) + 1 if len(t) else 0
        degradation = t[self.signal].to_numpy(dtype=float, copy=True)
        degradation[~np.isfinite(degradation)] = np.nan  # fp16 overflow gives inf: never selectable
        t["ies"] = importance_efficiency(degradation, t["n_tokens"])
        eligible = self._eligible(degradation)
        if budget.tokens and eligible.any() and amount < cost[eligible].min():
            raise ValueError(f"budget of {amount} tokens is smaller than the shortest scored record "
                             f"({int(cost[eligible].min())} tokens)")
        sizes = np.bincount(labels[eligible], minlength=k)
        room_of = lambda mask: np.bincount(labels[mask], weights=cost[mask], minlength=k).astype(np.int64)  # noqa: E731
        cds = cluster_degradation(labels, degradation, k)
        weights = self._cluster_weights(cds, room_of(eligible))
        target = min(amount, int(room_of(eligible).sum()))
        quota = allocate_budget(weights, room_of(eligible), target, self.allocation)
        queues = self._queues(t, labels, eligible, degradation, k)
        cursor = [0] * k
        status = np.array(["unvisited"] * len(t), dtype=object)
        status[~eligible] = "unscored"
        reason = np.array([""] * len(t), dtype=object)
        no_tokens = t["n_scored"].to_numpy() == 0 if "n_scored" in t else np.zeros(len(t), dtype=bool)
        reason[~eligible] = np.where(no_tokens[~eligible], "no scored tokens within the cutoff",
                                     f"{self.signal} is not finite (an overflow: score in float32 or bfloat16, "
                                     "not float16)")
        conflict_a = np.array([""] * len(t), dtype=object)
        conflict_b = np.array([""] * len(t), dtype=object)
        offer = self._filter(t, embeddings)
        chosen: list[int] = []
        taken = np.zeros(k, dtype=np.int64)
        spent = np.zeros(k, dtype=np.int64)  # in the budget's unit
        rejected = np.zeros(k, dtype=np.int64)

        def visit(c: int) -> None:
            i = queues[c][cursor[c]]
            cursor[c] += 1
            ok, why, pair = offer(i)
            if ok:
                status[i] = "selected"
                chosen.append(i)
                taken[c] += 1
                spent[c] += cost[i]
            else:
                status[i], reason[i] = "rejected", why
                conflict_a[i], conflict_b[i] = pair
                rejected[c] += 1

        def fits(c: int, limit: int) -> bool:
            return cursor[c] < len(queues[c]) and spent[c] + cost[queues[c][cursor[c]]] <= limit

        want = quota.copy()
        cluster_order = sorted(range(k), key=lambda c: (-cds[c], c))
        topup_weights = np.ones_like(weights) if self.allocation == "uniform" else weights
        while True:
            progress = False
            for c in cluster_order:
                while fits(c, want[c]):
                    visit(c)
                    progress = True
            short = target - int(spent.sum())
            left = np.zeros(len(t), dtype=bool)
            for c in range(k):
                left[queues[c][cursor[c]:]] = True
            room = room_of(left)
            if short <= 0 or room.sum() == 0 or not progress:
                break
            # the shortfall goes to clusters that still have candidates, split as the first
            # allocation was (CDS, uniform or floor), capped at what is left
            want = spent + allocate_budget(topup_weights, room, short, self.allocation)
        if budget.tokens and self.allocation != "floor":
            # no cluster's next record fits its share any more: fill what is left of the budget
            for c in cluster_order:
                while fits(c, spent[c] + target - int(spent.sum())):
                    visit(c)
        rank = np.zeros(len(t), dtype=np.int64)
        rank[chosen] = np.arange(1, len(chosen) + 1)
        t["status"], t["reason"], t["rank"] = status, reason, rank
        t["conflict_a"], t["conflict_b"] = conflict_a, conflict_b
        tokens_per_cluster = np.bincount(labels[chosen], weights=t["n_tokens"].to_numpy()[chosen],
                                         minlength=k).astype(np.int64)
        self.cds_ = cds
        self.allocation_ = quota
        self.result_ = SelectionResult(table=t, cds=cds, sizes=sizes, allocation=quota,
                                       selected_per_cluster=taken, rejected_per_cluster=rejected,
                                       budget=amount, unit=budget.unit,
                                       selected_tokens_per_cluster=tokens_per_cluster, signal=self.signal)
        return self

    # ---- the parts a variant changes (see StratifiedSelector)

    def _eligible(self, degradation: np.ndarray) -> np.ndarray:
        """Records that may be selected: those with a finite score (IES needs one)."""
        return ~np.isnan(degradation)

    def _cluster_weights(self, cds: np.ndarray, room: np.ndarray) -> np.ndarray:
        """Each cluster's share of the budget before capping: its CDS (a cluster that pruning did
        not hurt on average, loss_gap being negative, gets no share); ``allocation`` may then
        ignore it (uniform)."""
        return np.clip(cds, 0.0, None)

    def _queues(self, t: pd.DataFrame, labels, eligible, degradation, k: int) -> list[list[int]]:
        """Each cluster's candidates in visiting order: IES (or the signal alone, or a seeded
        random order) descending, ties to the earlier record."""
        rng = np.random.default_rng(self.random_state)
        queues = []
        for c in range(k):
            members = np.flatnonzero((labels == c) & eligible)
            if self.order == "random":
                members = rng.permutation(members)
            else:
                key = (degradation if self.order == "signal" else t["ies"].to_numpy())[members]
                members = members[np.lexsort((members, -key))]
            queues.append(members.tolist())
        return queues

    def _filter(self, t: pd.DataFrame, embeddings):
        """``offer(i) -> (accepted, reason, (a, b))``: the concept consistency graph, or none."""
        if not self.use_concepts:
            return lambda i: (True, "", ("", ""))
        graph, concepts = ConceptGraph(), t["concepts"].tolist()

        def offer(i: int):
            ok, pair = graph.offer(list(concepts[i]))
            return (True, "", ("", "")) if ok else (False, "concept conflict", pair)

        return offer


class StratifiedSelector(Selector):
    """``Selector`` with tempered stratified shares, tempered random draws inside clusters and
    near-duplicate removal instead of CDS shares, IES order and the concept filter (see the module
    docstring). ``fit(table, embeddings)``: ``table`` as for ``Selector`` (the signal may be missing
    on records that were not scored when ``ies_temperature`` is 0); ``embeddings`` only with
    ``dedup``; ``shares``: the clusters' weights, given (adaptive rounds). Learned as ``Selector``,
    plus ``weights_`` (the clusters' shares before capping)."""

    def __init__(self, budget, config: SampleConfig | None = None, random_state: int = 0, signal: str = "jsd",
                 shares=None):
        super().__init__(budget, use_concepts=False, random_state=random_state, signal=signal)
        self.config = config or SampleConfig()
        self.shares = shares  # given cluster shares instead of the tempered sizes (adaptive rounds)

    def fit(self, table: pd.DataFrame, embeddings: np.ndarray | None = None) -> StratifiedSelector:
        if self.config.dedup is not None and embeddings is None:
            raise ValueError("dedup compares instruction embeddings: pass embeddings to fit")
        return super().fit(table, embeddings)

    def _eligible(self, degradation: np.ndarray) -> np.ndarray:
        if self.config.needs_every_score:
            return ~np.isnan(degradation)
        return np.ones(len(degradation), dtype=bool)  # drawn without a score

    def _cluster_weights(self, cds: np.ndarray, room: np.ndarray) -> np.ndarray:
        if self.shares is not None:  # clusters past the table's last label have no candidate left
            self.weights_ = np.asarray(self.shares, dtype=float)[:len(room)]
        else:
            self.weights_ = cluster_weights(room, cds, self.config.cds_temperature)
        return self.weights_

    def _queues(self, t: pd.DataFrame, labels, eligible, degradation, k: int) -> list[list[int]]:
        tau = self.config.ies_temperature
        weights = np.ones(len(t))
        if tau > 0:
            ies = np.clip(t["ies"].to_numpy(dtype=float), 0.0, None)
            for c in range(k):
                members = (labels == c) & eligible
                mean = ies[members].mean() if members.any() else 0.0
                weights[members] = (ies[members] / mean) ** tau if mean > 0 else 1.0
        keys = draw_keys(weights, np.random.default_rng(self.random_state))
        queues = []
        for c in range(k):
            members = np.flatnonzero((labels == c) & eligible)
            queues.append(members[np.lexsort((members, -keys[members]))].tolist())
        return queues

    def _filter(self, t: pd.DataFrame, embeddings):
        if self.config.dedup is None:
            return lambda i: (True, "", ("", ""))
        return NearDuplicates(embeddings, t["id"], self.config.dedup).offer
