"""Clustering at scale: diffusion map on a sparse kNN graph + NMF spectral clustering.

    python bench/clustering.py --n 50000 --baseline-n 4000

Synthetic data: N unit vectors in 384-d around 20 centres (like sentence embeddings). paser's path
never builds an N x N matrix; the baseline (in this process, at a size it can afford) builds the
dense Gaussian affinity and takes its eigenvectors, as the authors' code does, then runs the same
clustering. Prints wall time and peak RSS of each, and what a dense matrix would need at N.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from memory import PeakRSS  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from paser.selection.clustering import SpectralClusterer  # noqa: E402
from paser.selection.manifold import DiffusionMap  # noqa: E402


def synthetic(n: int, d: int = 384, k: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    labels = rng.integers(0, k, n)
    x = centres[labels] + rng.normal(scale=1.2, size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def paser_path(x):
    dm = DiffusionMap(n_neighbors=30, n_components=20).fit(x)
    return SpectralClusterer().fit(dm.embedding_, dm.eigenvalues_)


def dense_path(x, n_components: int = 20):
    """The authors' approach: dense N x N affinity, dense eigendecomposition."""
    from scipy.linalg import eigh

    sq = np.clip(2.0 - 2.0 * (x @ x.T), 0, None).astype(np.float64)  # N x N
    sigma = np.median(np.sqrt(sq))
    a = np.exp(-sq / (2 * sigma**2))
    d = a.sum(1)
    s = a / np.sqrt(np.outer(d, d))
    n = len(x)
    vals, vecs = eigh(s, subset_by_index=[n - n_components - 1, n - 1])
    order = np.argsort(-vals)
    return SpectralClusterer().fit((vecs[:, order] / np.sqrt(d)[:, None])[:, 1:], vals[order])


def run(name, fn, x, labels):
    with PeakRSS() as mem:
        start = time.perf_counter()
        c = fn(x)
        seconds = time.perf_counter() - start
    ari = adjusted_rand_score(labels, c.labels_)
    print(f"{name:>28}: N={len(x):>6}  {seconds:7.1f} s  peak RSS {mem.peak_mb:7.0f} MB "
          f"(+{mem.peak_mb - mem.start_mb:.0f} MB)  K={c.k_}  ARI={ari:.3f}")
    return seconds, mem.peak_mb - mem.start_mb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--baseline-n", type=int, default=4000)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    xb, lb = synthetic(args.baseline_n, seed=1)
    t_dense, m_dense = run("dense affinity (baseline)", dense_path, xb, lb)
    t_small, m_small = run("paser sparse diffusion map", paser_path, xb, lb)
    print(f"at N={args.baseline_n}: paser / dense time {t_small / t_dense:.2f}, extra memory "
          f"{m_small:.0f} MB vs {m_dense:.0f} MB")
    x, labels = synthetic(args.n)
    run("paser sparse diffusion map", paser_path, x, labels)
    print(f"a dense float64 N x N matrix at N={args.n} would take {args.n**2 * 8 / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
