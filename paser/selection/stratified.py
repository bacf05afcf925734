"""Tempered stratified selection (``--method strat``): the budget split over the capability
clusters by their size, tilted towards degraded clusters by a temperature; records drawn at random
inside each cluster, tilted towards high IES by another; near-duplicates skipped.

    share of cluster k      ~ room_k x (CDS_k / mean CDS) ^ tau_c      room_k: its tokens (or records)
    next record of cluster k: drawn with probability ~ (IES_i / mean IES of cluster k) ^ tau_i

At tau_c = tau_i = 0 this is stratified random sampling, every cluster in proportion to its size
and records uniformly inside it, and needs no model: coverage of every capability rather than the
hardest records first, which is what wins at small budgets in coreset selection (CCS, ICLR 2023;
Sorscher et al., NeurIPS 2022). At tau_c = 1 the shares follow size x CDS; at tau_i = 1 records are
drawn in proportion to their IES, a soft version of PASER's ranking. CDS needs only a sample of
each cluster's records scored (``score.per_cluster``); IES needs every record scored.

Drawing without replacement in proportion to weights w uses one key per record, u^(1/w) with u
uniform (Efraimidis and Spirakis' reservoir keys), taken in descending order: seeded, and the same
draw whatever the budget (a larger budget takes a longer prefix of the same order). The selector
itself, which shares the budget loop of PASER's, is ``paser.selection.selector.StratifiedSelector``.

    python -c "from paser.selection.stratified import cluster_weights; \
print(cluster_weights([10, 30], [0.2, 0.4], 1.0))"
"""

from __future__ import annotations

import numpy as np


def cluster_weights(room, cds, temperature: float) -> np.ndarray:
    """room_k x (CDS_k / mean CDS)^temperature, the mean over clusters with room; at temperature 0
    exactly ``room`` (CDS unused). Clusters with a CDS of 0 or less get no weight at a positive
    temperature."""
    room = np.asarray(room, dtype=float)
    if temperature == 0:
        return room
    cds = np.clip(np.asarray(cds, dtype=float), 0.0, None)
    present = room > 0
    mean = cds[present].mean() if present.any() else 0.0
    if mean <= 0:
        return room  # no cluster was measured as degraded: nothing to tilt towards
    return room * (cds / mean) ** temperature


def draw_keys(weights, rng: np.random.Generator) -> np.ndarray:
    """One key per record, u^(1/w): taking records by descending key draws them without replacement
    with probability in proportion to ``weights`` (a weight of 0 comes last)."""
    w = np.asarray(weights, dtype=float)
    u = rng.random(len(w))
    keys = np.full(len(w), -np.inf)
    positive = w > 0
    keys[positive] = np.log(u[positive]) / w[positive]  # log of u^(1/w): the same order, no underflow
    return keys


class NearDuplicates:
    """Accepts a record unless its embedding's cosine with an accepted one reaches ``threshold``."""

    def __init__(self, embeddings: np.ndarray, ids, threshold: float):
        self.x, self.ids, self.threshold = np.asarray(embeddings, dtype=np.float32), list(ids), threshold
        self.kept: list[int] = []
        # the accepted rows, in its first len(kept) rows; grown by doubling, never the pool's size at once
        self.matrix = np.empty((min(len(self.x), 1024), self.x.shape[1]), dtype=np.float32)

    def offer(self, i: int):
        """(accepted, why not, (the record it duplicates, "")): each offer compares the record with
        every one accepted so far, so a selection of n records costs about n^2 / 2 dot products."""
        n = len(self.kept)
        if n:
            sims = self.matrix[:n] @ self.x[i]  # [kept]
            j = int(np.argmax(sims))
            if sims[j] >= self.threshold:
                return False, f"near-duplicate (cosine {sims[j]:.3f})", (str(self.ids[self.kept[j]]), "")
        if n == len(self.matrix):
            self.matrix = np.concatenate([self.matrix, np.empty_like(self.matrix)])
        self.matrix[n] = self.x[i]
        self.kept.append(i)
        return True, "", ("", "")
