"""The clustering stages at scale: neighbours, diffusion map and spectral clustering, stage by stage.

    python bench/scale.py --sizes 50000 200000 1000000          # synthetic 384-d rows
    python bench/scale.py --realistic --sizes 50000 200000 1000000   # rows shaped like real ones
    python bench/scale.py --alpaca ../shared/data/alpaca_5000.json   # real records, embedding included
    python bench/scale.py --compare-libraries 20000               # the candidate searches (pip install pynndescent)

Synthetic rows: unit vectors around 20 centres (``bench/clustering.py``'s generator, made in
chunks); with --realistic, ``bench/realistic_pool.py``'s rows around the real embeddings of
``../shared/data/alpaca_5000.json`` (the labels: the families of their real parents). Each size
runs paser's defaults (``manifold.neighbors: auto``: exact search up to 50,000 rows, faiss IVF
above) and prints per stage the wall time and the process's peak RSS, the K found and the ARI
against the centres; the recall@k of the approximate graph against the exact neighbours of a
seeded sample of rows; and the scaling exponent of each stage's time over the sizes run. Baseline,
in the same process: the exact search on the sizes up to --exact-up-to, timed beside the
approximate one (ratio printed); above exact_max with --baseline-probe P, the IVF search with a
fixed P lists probed (paser's default before the recall target), its recall and time ratio.

With --alpaca: the real records' instructions embedded by the bundled all-MiniLM-L6-v2 (texts/s),
then the same stages; the embedding throughput extrapolates the embedding time to Alpaca's 52,002
and LaMini's 2,585,615 records (printed as an extrapolation, not a measurement).
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
from paser.selection.configs import (
    ClusterConfig,  # noqa: E402
    ManifoldConfig,  # noqa: E402
)
from paser.selection.manifold import DiffusionMap  # noqa: E402
from paser.selection.neighbours import knn_graph, knn_graph_ivf, neighbour_recall  # noqa: E402

LARGER_POOLS = {"Alpaca (52,002)": 52_002, "LaMini-instruction (2,585,615)": 2_585_615}


def synthetic(n: int, d: int = 384, k: int = 20, seed: int = 0, chunk: int = 100_000):
    """``bench/clustering.py``'s rows, made chunk by chunk in float32 (1M x 384 is 1.5 GB)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    labels = rng.integers(0, k, n)
    x = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        part = centres[labels[lo:hi]] + rng.normal(scale=1.2, size=(hi - lo, d))
        x[lo:hi] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return x, labels


def timed(name: str, fn, rows: list):
    with PeakRSS() as mem:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    rows.append((name, seconds, mem.peak_mb))
    print(f"  {name:<22} {seconds:8.1f} s   peak RSS {mem.peak_mb:8.0f} MB", flush=True)
    return result


def clustering_stages(x: np.ndarray, labels: np.ndarray | None, args) -> dict:
    """Neighbours, diffusion map and clustering of ``x`` with paser's defaults; their figures."""
    mcfg, ccfg = ManifoldConfig(), ClusterConfig()
    dm = DiffusionMap(mcfg.n_neighbors, mcfg.n_components, mcfg.diffusion_time, mcfg.block_size, 0,
                      mcfg.neighbors, mcfg.exact_max, mcfg.ivf_probe, mcfg.ivf_recall)
    rows: list = []
    start = time.perf_counter()
    idx, dist = timed(f"neighbours ({'exact' if len(x) <= mcfg.exact_max else 'ivf'})", lambda: dm.neighbours(x), rows)
    timed("diffusion map", lambda: dm.fit_graph(idx, dist), rows)
    c = timed("clustering + K", lambda: SpectralClusterer.from_config(ccfg, 0, False).fit(dm.embedding_,
                                                                                          dm.eigenvalues_), rows)
    total = time.perf_counter() - start
    found = {"stages": rows, "total": total, "peak": max(r[2] for r in rows), "k": int(c.k_),
             "search": dm.neighbors_, "ivf": dm.ivf_}
    sample = np.sort(np.random.default_rng(1).choice(len(x), size=min(args.recall_sample, len(x)), replace=False))
    truth, _ = knn_graph(x, mcfg.n_neighbors, 256, rows=sample)
    found["recall"] = neighbour_recall(idx[sample], truth)
    search = dm.neighbors_ if dm.ivf_ is None else f"ivf ({dm.ivf_['probed']} of {dm.ivf_['lists']} lists probed)"
    line = f"  total {total:.1f} s, peak RSS {found['peak']:.0f} MB, K = {c.k_}, search {search}, " \
           f"recall@{mcfg.n_neighbors} {found['recall']:.4f} ({len(sample)} rows against exact)"
    if labels is not None:
        found["ari"] = adjusted_rand_score(labels, c.labels_)
        line += f", ARI {found['ari']:.3f}"
    print(line, flush=True)
    if len(x) <= args.exact_up_to and dm.neighbors_ == "exact":
        approx = timed("baseline check: ivf", lambda: knn_graph_ivf(x, mcfg.n_neighbors, mcfg.ivf_probe,
                                                                   recall=mcfg.ivf_recall), [])
        same = neighbour_recall(approx[0], idx)
        print(f"  ivf at N={len(x)}: recall@{mcfg.n_neighbors} {same:.4f} against the exact graph (all rows)")
    elif len(x) <= args.exact_up_to:
        timed("baseline: exact search", lambda: knn_graph(x, mcfg.n_neighbors, mcfg.block_size), rows)
        print(f"  exact / ivf search time: {rows[-1][1] / rows[0][1]:.2f}")
    if args.baseline_probe and dm.neighbors_ == "ivf":
        timing: list = []
        fixed = timed(f"baseline: ivf, {args.baseline_probe} probed", lambda: knn_graph_ivf(
            x, mcfg.n_neighbors, args.baseline_probe), timing)
        recall = neighbour_recall(fixed[0][sample], truth)
        print(f"  baseline {args.baseline_probe} probed: recall@{mcfg.n_neighbors} {recall:.4f}; its time / the "
              f"default search's: {timing[0][1] / rows[0][1]:.2f}")
    return found


def compare_libraries(n: int) -> None:
    """The candidates for the approximate search at ``n`` synthetic rows, against the exact graph:
    faiss HNSW, faiss IVF-Flat and pynndescent (seeded, as paser needs it, and unseeded)."""
    import faiss

    x, _ = synthetic(n)
    k = ManifoldConfig().n_neighbors
    print(f"neighbour search candidates at N={n:,} (k={k}; recall@{k} against the exact graph, every row)")
    start = time.perf_counter()
    exact, _ = knn_graph(x, k)
    print(f"  {'exact (blocked torch)':<34} {time.perf_counter() - start:7.1f} s", flush=True)

    def report(name, fn):
        start = time.perf_counter()
        found = fn()
        seconds = time.perf_counter() - start
        found = np.array([[j for j in row if j != i][:k] for i, row in enumerate(found)])
        recall = neighbour_recall(found, exact)
        print(f"  {name:<34} {seconds:7.1f} s   recall {recall:.4f}", flush=True)

    for ef in (64, 128):
        def hnsw(ef=ef):
            index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction, index.hnsw.efSearch = 80, ef
            index.add(x)
            return index.search(x, k + 1)[1]
        report(f"faiss HNSW (M 32, efSearch {ef})", hnsw)
    for probe in (16, 32):
        report(f"faiss IVF-Flat (paser's, {probe} probed)", lambda probe=probe: knn_graph_ivf(x, k, probe)[0])
    try:
        from pynndescent import NNDescent
    except ImportError:
        print("  pynndescent: not installed")
        return
    for seed in (0, None):
        report(f"pynndescent (random_state={seed})",
               lambda seed=seed: NNDescent(x, metric="cosine", n_neighbors=k + 1, random_state=seed).neighbor_graph[0])


def synthetic_runs(args) -> None:
    figures = {}
    if args.realistic:
        from realistic_pool import calibrate, real_rows

        pool = calibrate(*real_rows(args.realistic_from))
    for n in args.sizes:
        print(f"{'realistic' if args.realistic else 'synthetic'} N={n:,} x 384", flush=True)
        x, labels = pool.rows(n, seed=1) if args.realistic else synthetic(n)
        figures[n] = clustering_stages(x, labels, args)
        del x
    if len(figures) > 1:
        sizes = np.log(np.array(list(figures)))
        print("scaling exponent of time over N (log-log slope across the sizes run):")
        names = [r[0] for r in next(iter(figures.values()))["stages"][:3]]
        for i, _ in enumerate(names):
            times = np.log([f["stages"][i][1] for f in figures.values()])
            label = "neighbours" if i == 0 else names[i]
            print(f"  {label:<22} {np.polyfit(sizes, times, 1)[0]:.2f}   (search changes at N > 50,000)")
        print(f"  {'total':<22} {np.polyfit(sizes, np.log([f['total'] for f in figures.values()]), 1)[0]:.2f}")


def alpaca_run(args) -> None:
    from paser.data.pools import load_pool
    from paser.selection.configs import EmbedConfig
    from paser.selection.embedding import SentenceEmbedder, embed_texts, instruction_texts

    pool = load_pool(args.alpaca)
    texts = instruction_texts(pool.records, EmbedConfig().include_input)
    print(f"real records: {args.alpaca} ({len(texts):,} records)", flush=True)
    cfg = EmbedConfig()
    embedder = SentenceEmbedder(cfg.model, cfg.batch_size, cfg.device, progress=False)
    rows: list = []
    x = timed("embedding", lambda: embed_texts(texts, cfg, None, embedder=embedder), rows)
    rate = len(texts) / rows[0][1]
    print(f"  embedding throughput {rate:.0f} texts/s (batch {cfg.batch_size}, {cfg.device or 'auto'} device)")
    for name, n in LARGER_POOLS.items():
        print(f"  extrapolated embedding time for {name}: {n / rate / 60:.0f} min at that rate")
    clustering_stages(np.asarray(x, dtype=np.float32), None, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[])
    ap.add_argument("--alpaca", default=None, help="a real pool to embed and cluster")
    ap.add_argument("--realistic", action="store_true", help="rows shaped like a real pool's (bench/realistic_pool.py)")
    ap.add_argument("--realistic-from", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"
                                                    / "alpaca_5000.json"), help="the real pool they are shaped on")
    ap.add_argument("--recall-sample", type=int, default=2000, help="rows checked against exact neighbours")
    ap.add_argument("--exact-up-to", type=int, default=50_000, help="sizes that also run the other search")
    ap.add_argument("--baseline-probe", type=int, default=0, metavar="P",
                    help="above exact_max, also time the IVF search with P lists probed, no recall target")
    ap.add_argument("--compare-libraries", type=int, default=None, metavar="N",
                    help="time and recall of the approximate-search candidates at N synthetic rows")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    if args.compare_libraries:
        compare_libraries(args.compare_libraries)
    if args.alpaca:
        alpaca_run(args)
    if args.sizes:
        synthetic_runs(args)


if __name__ == "__main__":
    main()
