"""Embedding rows shaped like a real instruction pool, at any size, with known families.

    python bench/realistic_pool.py                      # calibrate on the real 5,000 and compare
    python bench/realistic_pool.py --sizes 50000        # also the figures of 50,000 generated rows
    python bench/realistic_pool.py --probes 8 16 32 64 --search-sizes 50000 200000
                                                        # the IVF's recall by probes; search order

The isotropic noise of ``bench/scale.py --synthetic`` has no local structure: in 384 dimensions
every row of a blob is about as far from its nearest neighbour as from any other row of the blob,
which no embedded instruction pool looks like (instructions lie near a few others that say almost
the same thing) and which makes any approximate neighbour search look worse than it is.

Here the rows come from the real embeddings of ``../shared/data/alpaca_5000.json`` (the bundled
all-MiniLM-L6-v2, paser's embedding stage), a hierarchical mixture:
- families: paser's clusters of the real 5,000 (diffusion map + spectral clustering, defaults);
- centres: the real rows; each generated row picks a real parent uniformly and takes its family;
- spread: the row is the parent moved along random combinations of the directions to the parent's
  8 nearest real neighbours (the local shape of the real pool: few directions, not all 384), plus a
  small isotropic part, scaled by the parent's own nearest-neighbour distance, then made unit
  length. The scale is calibrated once: 5,000 generated rows have the median nearest-neighbour
  distance of the real 5,000.
A larger pool is then the same distribution sampled more densely, as a larger real pool of the
same kinds of instructions would be. Printed: the calibration, and for the real rows and the
generated ones the nearest-neighbour distance quantiles, the recall of paser's approximate search,
K and the ARI of paser's clustering against the families. With --probes: at each of
--search-sizes generated rows, the recall@30 of paser's IVF search (about 4 sqrt(N) lists) for
each probe count, on a seeded sample of 1,000 rows against their exact neighbours, and the time of
paser's search (rows in the order of their own list) against the same index searched in the
pool's order (the baseline, same process).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PASER_CACHE", Path.home() / ".cache" / "paser")) / "bench"
NEIGHBOURS = 8  # real neighbours whose directions shape a parent's spread
ISOTROPIC = 0.15  # share of the spread in random directions of all 384


def real_rows(alpaca: str) -> tuple[np.ndarray, np.ndarray]:
    """The real pool's unit embeddings [N, 384] and paser's cluster of each (its family), cached
    under PASER_CACHE/bench (recomputed when the file changes)."""
    from paser.data.pools import load_pool
    from paser.selection.configs import EmbedConfig
    from paser.selection.embedding import embed_texts, instruction_texts

    stat = Path(alpaca).stat()
    cached = CACHE / f"realistic-{Path(alpaca).stem}-{stat.st_size}-{int(stat.st_mtime)}.npz"
    if cached.is_file():
        found = np.load(cached)
        return found["x"], found["families"]
    cfg = EmbedConfig()
    x = np.asarray(embed_texts(instruction_texts(load_pool(alpaca).records, cfg.include_input), cfg), np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    families = cluster(x)[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(cached, x=x, families=families)
    return x, families


def cluster(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, int, str]:
    """paser's clustering stages with their defaults: (labels, K, the neighbour search used)."""
    from paser.selection.clustering import SpectralClusterer
    from paser.selection.configs import ClusterConfig, ManifoldConfig
    from paser.selection.manifold import learn_manifold, neighbour_search

    config = ManifoldConfig()
    coords, eigenvalues = learn_manifold(x, config, seed)
    c = SpectralClusterer.from_config(ClusterConfig(), seed, False).fit(coords, eigenvalues)
    return c.labels_, int(c.k_), neighbour_search(len(x), config)


class RealisticPool:
    """Rows around the real ones (see the module's text); ``scale`` multiplies each parent's
    nearest-neighbour distance to give its spread."""

    def __init__(self, real: np.ndarray, families: np.ndarray, scale: float = 1.0):
        from paser.selection.neighbours import knn_graph

        self.real, self.families, self.scale = real, families, scale
        self.nbr, dist = knn_graph(real, NEIGHBOURS)
        self.nn = dist[:, 0].astype(np.float32)

    def rows(self, n: int, seed: int = 0, chunk: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
        """``n`` unit rows [n, d] float32 and their families; the same ``seed`` gives the same rows."""
        x, parents = self.draw(n, seed, chunk)
        return x, self.families[parents]

    def draw(self, n: int, seed: int = 0, chunk: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
        """``n`` unit rows [n, d] float32 and the real row each was drawn around."""
        rng = np.random.default_rng(seed)
        parents = rng.integers(0, len(self.real), n)
        d = self.real.shape[1]
        x = np.empty((n, d), dtype=np.float32)
        for lo in range(0, n, chunk):
            p = parents[lo:lo + chunk]
            centre = self.real[p]
            toward = self.real[self.nbr[p]] - centre[:, None, :]  # [c, m, d]
            toward /= np.maximum(np.linalg.norm(toward, axis=2, keepdims=True), 1e-12)
            local = np.einsum("cm,cmd->cd", rng.standard_normal((len(p), NEIGHBOURS)).astype(np.float32),
                              toward) / np.sqrt(NEIGHBOURS)
            noise = rng.standard_normal((len(p), d)).astype(np.float32) / np.sqrt(d)
            step = (1 - ISOTROPIC) * local + ISOTROPIC * noise
            part = centre + (self.scale * self.nn[p])[:, None] * step
            x[lo:lo + chunk] = part / np.linalg.norm(part, axis=1, keepdims=True)
        return x, parents


def nn_distances(x: np.ndarray) -> np.ndarray:
    from paser.selection.neighbours import knn_graph

    return knn_graph(x, 1)[1][:, 0]


def calibrate(real: np.ndarray, families: np.ndarray, seed: int = 0) -> RealisticPool:
    """The pool whose 5,000 (the real count) generated rows have the real median nearest-neighbour
    distance (bisection on the scale)."""
    pool = RealisticPool(real, families)
    target = float(np.median(nn_distances(real)))
    lo, hi = 0.05, 4.0
    for _ in range(14):
        pool.scale = (lo + hi) / 2
        got = float(np.median(nn_distances(pool.rows(len(real), seed)[0])))
        lo, hi = (pool.scale, hi) if got < target else (lo, pool.scale)
    pool.scale = (lo + hi) / 2
    return pool


def describe(name: str, x: np.ndarray, labels: np.ndarray | None) -> None:
    from sklearn.metrics import adjusted_rand_score

    from paser.selection.configs import ManifoldConfig
    from paser.selection.neighbours import knn_graph, knn_graph_ivf, neighbour_recall

    q = np.quantile(nn_distances(x), [0.1, 0.5, 0.9])
    k = ManifoldConfig().n_neighbors
    start = time.perf_counter()
    found, k_, search = cluster(x)
    seconds = time.perf_counter() - start
    exact = knn_graph(x, k)[0]
    approx = knn_graph_ivf(x, k, ManifoldConfig().ivf_probe, recall=ManifoldConfig().ivf_recall)[0]
    recall = neighbour_recall(approx, exact)
    line = (f"  {name:<30} NN distance p10/p50/p90 {q[0]:.3f}/{q[1]:.3f}/{q[2]:.3f}; ivf recall@{k} {recall:.3f}; "
            f"K {k_} ({search} search, {seconds:.0f} s)")
    if labels is not None:
        line += f"; ARI against the families {adjusted_rand_score(labels, found):.3f}"
    print(line, flush=True)


def search_figures(x: np.ndarray, probes: list[int], k: int = 30) -> None:
    """Recall of the IVF search by probe count, and its time in list order against pool order."""
    from paser.selection.neighbours import ivf_index, knn_graph, knn_graph_ivf, neighbour_recall, unit_rows

    n = len(x)
    sample = np.sort(np.random.default_rng(1).choice(n, size=min(n, 1000), replace=False))
    exact = knn_graph(x, k, 256, rows=sample)[0]
    for probe in probes:
        start = time.perf_counter()
        found = knn_graph_ivf(x, k, probe)[0][sample]
        seconds = time.perf_counter() - start
        recall = neighbour_recall(found, exact)
        print(f"  N={n:,}: {probe:>3} of {int(round(4 * np.sqrt(n)))} lists probed: recall@{k} {recall:.3f} "
              f"({seconds:.0f} s, index built and searched)", flush=True)
    unit = unit_rows(x, k)[0]
    index = ivf_index(unit, int(round(4 * np.sqrt(n))))
    index.nprobe = probes[-1]
    own = np.argsort(index.quantizer.search(unit, 1)[1][:, 0], kind="stable")
    times = {}
    for name, order in (("pool order (baseline)", np.arange(n)), ("own-list order (paser)", own)):
        start = time.perf_counter()
        for lo in range(0, n, 65_536):
            index.search(unit[order[lo:lo + 65_536]], k + 1)
        times[name] = time.perf_counter() - start
        print(f"  N={n:,}, {probes[-1]} probed: search in {name}: {times[name]:.1f} s", flush=True)
    print(f"  speed of own-list order / pool order: {times['pool order (baseline)'] / times[name]:.2f}x")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alpaca", default=str(ROOT.parent / "shared" / "data" / "alpaca_5000.json"))
    ap.add_argument("--sizes", type=int, nargs="*", default=[])
    ap.add_argument("--probes", type=int, nargs="*", default=[], help="probe counts whose recall to measure")
    ap.add_argument("--search-sizes", type=int, nargs="*", default=[50_000])
    ap.add_argument("--no-compare", action="store_true", help="skip the real-against-generated comparison")
    args = ap.parse_args(argv)
    real, families = real_rows(args.alpaca)
    pool = calibrate(real, families)
    print(f"real pool: {args.alpaca}, {len(real):,} rows; {families.max() + 1} families (paser's clusters); "
          f"calibrated scale {pool.scale:.3f} x each parent's nearest-neighbour distance", flush=True)
    if not args.no_compare:
        describe("real rows", real, None)
        describe(f"generated, {len(real):,} rows", *pool.rows(len(real), seed=1))
    for n in args.sizes:
        describe(f"generated, {n:,} rows", *pool.rows(n, seed=1))
    for n in args.search_sizes if args.probes else []:
        search_figures(pool.rows(n, seed=1)[0], sorted(args.probes))


if __name__ == "__main__":
    sys.exit(main())
