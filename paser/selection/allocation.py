"""Stage 5: split the budget across clusters in proportion to their degradation (CDS).

CDS(c_k) = mean JSD of c_k's members. n_k is proportional to CDS, made integer by largest
remainder so that sum n_k = min(B, N) exactly; no cluster gets more than it has, the surplus
being water-filled into the others by CDS. The paper-exact variant floors each share (and may
end below B).

    python -c "from paser.selection.allocation import allocate_budget; \
print(allocate_budget([.3, .1, .2], [5, 50, 50], 30))"
"""

from __future__ import annotations

import numpy as np


def cluster_degradation(labels: np.ndarray, scores: np.ndarray, n_clusters: int) -> np.ndarray:
    """CDS per cluster: mean score of its members (NaN scores ignored; 0 for a cluster with none)."""
    cds = np.zeros(n_clusters)
    for k in range(n_clusters):
        vals = scores[(labels == k) & ~np.isnan(scores)]
        cds[k] = float(vals.mean()) if vals.size else 0.0
    return cds


def allocate_budget(cds, sizes, budget: int, method: str = "largest_remainder") -> np.ndarray:
    """Integers n_k, one per cluster. See the module docstring."""
    cds = np.asarray(cds, dtype=float)
    sizes = np.asarray(sizes, dtype=np.int64)
    if cds.shape != sizes.shape:
        raise ValueError(f"{cds.size} CDS values for {sizes.size} clusters")
    if budget < 0 or np.any(sizes < 0) or np.any(cds < 0) or not np.all(np.isfinite(cds)):
        raise ValueError("budget, sizes and CDS must be non-negative and finite")
    weights = np.ones_like(cds) if method == "uniform" else cds.copy()
    if method == "floor":
        total = weights.sum()
        return np.floor(budget * weights / total).astype(np.int64) if total > 0 else np.zeros_like(sizes)
    if method not in ("largest_remainder", "uniform"):
        raise ValueError(f"unknown allocation method {method!r}")
    target = int(min(budget, sizes.sum()))
    # clusters with nothing to give get no share; all-zero weights fall back to cluster sizes
    weights[sizes == 0] = 0.0
    if weights.sum() <= 0:
        weights = sizes.astype(float)
    alloc = np.zeros_like(sizes)
    capped = np.zeros(sizes.size, dtype=bool)
    remaining = target
    # water-filling: clusters whose share exceeds their size are filled and set aside
    while True:
        active = ~capped & (weights > 0)
        if remaining <= 0 or not active.any():
            break
        quota = np.zeros(sizes.size)
        quota[active] = remaining * weights[active] / weights[active].sum()
        over = active & (quota >= sizes)
        if not over.any():
            base = np.floor(quota).astype(np.int64)
            left = remaining - int(base[active].sum())
            frac = quota - base
            # largest fractional parts first; ties go to the larger CDS, then the lower index
            order = sorted(np.flatnonzero(active), key=lambda k: (-frac[k], -weights[k], k))
            for k in order[:left]:
                base[k] += 1
            alloc[active] = base[active]
            remaining = 0
            break
        alloc[over] = sizes[over]
        capped |= over
        remaining = target - int(alloc.sum())
    if remaining > 0:
        # zero-weight clusters absorb what the weighted ones could not hold, in index order
        for k in np.flatnonzero(alloc < sizes):
            take = min(remaining, int(sizes[k] - alloc[k]))
            alloc[k] += take
            remaining -= take
    return alloc
