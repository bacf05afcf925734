"""The k-nearest-neighbour graph of the instruction embeddings (cosine), for the manifold stage.

Two searches, the same contract (indices [N, k] and distances sqrt(2 - 2 cos), self excluded,
nearest first, ties by index, memory O(N k) beside the rows):
- ``knn_graph``: exact, by blocks of rows against all rows: O(N^2 d), paser's choice up to
  ``manifold.exact_max`` rows;
- ``knn_graph_ivf``: faiss's IVF-Flat index: seeded k-means splits the rows into about 4 sqrt(N)
  lists, each row is compared exactly with the rows of its ``n_probe`` nearest lists. With a
  ``recall`` target the probe count is measured, not guessed: starting at ``n_probe`` it grows by
  half until the recall@k of a seeded sample of ``RECALL_ROWS`` rows against their exact
  neighbours reaches the target (how many lists a given recall needs depends on the rows: on
  isotropic noise it grows with N, on rows shaped like real instructions it shrinks). The rows are
  searched in the order of their own list, so consecutive searches read mostly the same lists
  while they are still in the processor's cache (the same result, each row's search being
  independent; speed: docs/benchmarks.md).
  faiss answers each row alone and its k-means is seeded, so the graph is the same on any thread
  count (tested).

    python -c "import numpy as np; from paser.selection.neighbours import knn_graph_ivf; \
x = np.random.randn(3000, 16); print(knn_graph_ivf(x, 10, n_probe=8)[0].shape)"
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

LIST_ROWS_SAMPLED = 64  # k-means is trained on a seeded sample of this many rows per list
KMEANS_ITERATIONS = 20
QUERY_BLOCK = 65_536  # rows searched per call (their candidates held at once)
UNIT_TOLERANCE = 1e-5  # rows whose norm is this close to 1 are taken as unit rows
RECALL_ROWS = 500  # sampled rows whose exact neighbours measure a probe count's recall


def unit_rows(x: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, int]:
    """``x`` as contiguous float32 unit rows, and the neighbour count it can have (k, at most
    N - 1). Rows that already are unit float32 (paser's embeddings are) are used as they are, not
    copied (at 1M x 384 a copy is 1.5 GB); others are normalised into a copy. The input is never
    changed."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1)
    if not (x.flags.writeable and np.all(np.abs(norms - 1.0) <= UNIT_TOLERANCE)):
        x = x / np.maximum(norms, 1e-12)[:, None]
    k = min(n_neighbors, x.shape[0] - 1)
    if k < 1:
        raise ValueError(f"a kNN graph needs at least 2 points, got {x.shape[0]}")
    return x, k


def nearest_first(cand: np.ndarray, sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar candidates of each row, ties by index (so the graph is the same on every
    run), as (indices, distances ||x_i - x_j|| = sqrt(2 - 2 cos))."""
    order = np.lexsort((cand, -sim), axis=1)[:, :k]
    best = np.take_along_axis(sim, order, axis=1)
    return np.take_along_axis(cand, order, axis=1), np.sqrt(np.clip(2.0 - 2.0 * best, 0.0, None))


def knn_graph(x: np.ndarray, n_neighbors: int, block_size: int = 1024,
              rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine k-nearest neighbours, by blocks of ``block_size`` rows. ``rows``: the
    neighbours of those rows only (against all of ``x``), in their order."""
    x, k = unit_rows(x, n_neighbors)
    n = x.shape[0]
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    xt = torch.from_numpy(x)
    idx = np.empty((len(rows), k), dtype=np.int64)
    dist = np.empty((len(rows), k), dtype=np.float32)
    for lo in range(0, len(rows), block_size):
        part = torch.from_numpy(rows[lo:lo + block_size])
        sim = xt[part] @ xt.T  # [block, N]
        sim[torch.arange(len(part)), part] = -float("inf")  # no self-loops
        # one candidate more than needed, so a tie at the k-th place is settled by index below
        top = torch.topk(sim, min(k + 1, n - 1), dim=1)
        idx[lo:lo + len(part)], dist[lo:lo + len(part)] = nearest_first(top.indices.numpy(), top.values.numpy(), k)
    return idx, dist


def ivf_index(x: np.ndarray, n_lists: int, seed: int = 0):
    """faiss's IVF-Flat index (inner product) over unit rows ``x``: ``n_lists`` lists from seeded
    k-means (20 iterations) on a seeded sample of ``LIST_ROWS_SAMPLED`` rows per list."""
    try:
        import faiss
    except ImportError:
        raise ValueError("approximate neighbours need faiss-cpu: pip install faiss-cpu "
                         "(or manifold.neighbors: exact)") from None
    quantizer = faiss.IndexFlatIP(x.shape[1])
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], n_lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed, index.cp.niter, index.cp.max_points_per_centroid = seed, KMEANS_ITERATIONS, LIST_ROWS_SAMPLED
    sample = np.random.default_rng(seed).choice(len(x), size=min(len(x), LIST_ROWS_SAMPLED * n_lists), replace=False)
    index.train(x[np.sort(sample)])
    index.add(x)
    return index


def neighbour_recall(found: np.ndarray, exact: np.ndarray) -> float:
    """recall@k: the share of each row's exact neighbours (``exact`` [n, k]) that ``found`` [n, k']
    holds for the same row, over all rows."""
    return float((exact[:, :, None] == found[:, None, :]).any(axis=2).mean())


def sampled_recall(index, x: np.ndarray, k: int, start: int, target: float, seed: int = 0,
                   rows: int = RECALL_ROWS) -> tuple[int, float]:
    """(probe count, its recall@k): the fewest lists of ``index`` probed, from ``start`` growing by
    half at each step, at which the rows' k nearest found agree with their exact k nearest (self
    excluded) for a share ``target`` of a seeded sample of ``rows`` rows; every list at most (an
    exhaustive search)."""
    n = x.shape[0]
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False))
    # exact neighbours of the sample, a block of rows against all N at a time (at most 2^26 floats)
    exact = knn_graph(x, k, block_size=max(1, min(1024, 2**26 // n)), rows=sample)[0]
    probe = max(1, min(start, index.nlist))
    while True:
        index.nprobe = probe
        found = index.search(x[sample], k + 1)[1]
        recall = neighbour_recall(found, exact)
        if recall >= target or probe >= index.nlist:
            return probe, recall
        probe = min(index.nlist, max(probe + 1, math.ceil(probe * 1.5)))


@dataclass
class IVFGraph:
    """A kNN graph found by the IVF search and how: ``indices``/``distances`` as ``knn_graph``'s,
    the lists made and probed, and the sampled recall that chose the probe count (None when the
    count was given)."""

    indices: np.ndarray
    distances: np.ndarray
    n_lists: int
    n_probe: int
    recall: float | None = None


def ivf_search(x: np.ndarray, n_neighbors: int, n_probe: int = 32, seed: int = 0, n_lists: int | None = None,
               recall: float | None = None) -> IVFGraph:
    """Approximate cosine k-nearest neighbours by the inverted-file index in the module's text:
    about 4 sqrt(N) lists (``n_lists``; at least 39 rows a list), each row compared with the rows of
    its ``n_probe`` nearest lists, or, with ``recall``, of as many as ``sampled_recall`` finds that
    target needs (``n_probe`` the fewest tried)."""
    x, k = unit_rows(x, n_neighbors)
    n = x.shape[0]
    n_lists = max(1, min(n_lists or int(round(4 * math.sqrt(n))), n // 39 or 1))
    index = ivf_index(x, n_lists, seed)
    measured = None
    if recall:
        n_probe, measured = sampled_recall(index, x, k, n_probe, recall, seed)
    index.nprobe = min(n_probe, n_lists)
    order = np.argsort(index.quantizer.search(x, 1)[1][:, 0], kind="stable")  # rows by their own list
    idx = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float32)
    for lo in range(0, n, QUERY_BLOCK):
        rows = order[lo:lo + QUERY_BLOCK]
        sim, cand = index.search(x[rows], k + 1)  # one more, since each row finds itself
        sim[cand == rows[:, None]] = -np.inf  # no self-loops
        sim[cand < 0] = -np.inf  # fewer than k+1 rows in the probed lists
        short = np.flatnonzero(np.isfinite(sim).sum(axis=1) < k)
        if len(short):
            raise ValueError(f"row {rows[short[0]]}: its {index.nprobe} probed lists hold fewer than {k} other "
                             "rows; raise manifold.ivf_probe")
        idx[rows], dist[rows] = nearest_first(cand, sim, k)
    return IVFGraph(idx, dist, n_lists, index.nprobe, measured)


def knn_graph_ivf(x: np.ndarray, n_neighbors: int, n_probe: int = 32, seed: int = 0, n_lists: int | None = None,
                  recall: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``ivf_search``'s graph alone: the same contract as ``knn_graph``."""
    graph = ivf_search(x, n_neighbors, n_probe, seed, n_lists, recall)
    return graph.indices, graph.distances
