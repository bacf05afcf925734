"""Clustering quality on the embedded default: adjusted Rand index of the clusters against the
capability suite's 12 task families, for the kNN size and the clustering method.

    python bench/cluster_quality.py --records 1000

Embeddings come from the packaged all-MiniLM-L6-v2, as in `paser select`.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sklearn.metrics import adjusted_rand_score  # noqa: E402

from paser.data.suite import suite_pool  # noqa: E402
from paser.selection.clustering import SpectralClusterer  # noqa: E402
from paser.selection.configs import EmbedConfig  # noqa: E402
from paser.selection.embedding import embed_texts, instruction_texts  # noqa: E402
from paser.selection.manifold import DiffusionMap  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1000)
    args = ap.parse_args()
    pool = suite_pool(args.records)
    families = [r.fields["family"] for r in pool.records]
    x = embed_texts(instruction_texts(pool.records), EmbedConfig())
    print(f"{args.records} suite records, 12 families")
    print("n_neighbors  method   K (knee)  eigengap K  ARI    seconds")
    for k in (15, 30):
        dm = DiffusionMap(n_neighbors=k, n_components=20).fit(x)
        for method in ("nmf", "kmeans"):
            start = time.perf_counter()
            c = SpectralClusterer(method=method).fit(dm.embedding_, dm.eigenvalues_)
            ari = adjusted_rand_score(families, c.labels_)
            seconds = time.perf_counter() - start
            print(f"{k:>11}  {method:<7}  {c.k_:>8}  {c.eigengap_k_:>10}  {ari:.3f}  {seconds:6.1f}")


if __name__ == "__main__":
    main()
