"""Manifold learning and spectral clustering on small arrays."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from paser.selection.clustering import SpectralClusterer, eigengap_k, knee, nonnegative
from paser.selection.configs import ClusterConfig, ManifoldConfig
from paser.selection.manifold import DiffusionMap, learn_manifold, neighbour_search
from paser.selection.neighbours import (
    ivf_index,
    ivf_search,
    knn_graph,
    knn_graph_ivf,
    neighbour_recall,
    sampled_recall,
    unit_rows,
)


def blobs(n_per: int = 80, k: int = 5, d: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 3
    x = np.vstack([c + rng.normal(size=(n_per, d)) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(k), n_per)


def test_knn_graph_is_exact():
    x, _ = blobs(30, 3)
    idx, dist = knn_graph(x, 5, block_size=17)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    expected = np.sort(np.argsort(-sim, axis=1)[:, :5], axis=1)
    assert np.array_equal(np.sort(idx, axis=1), expected)
    assert np.all(np.diff(dist, axis=1) >= -1e-6)  # nearest first
    some, some_dist = knn_graph(x, 5, block_size=2, rows=np.array([7, 0, 29]))  # those rows only
    assert np.array_equal(some, idx[[7, 0, 29]])
    np.testing.assert_allclose(some_dist, dist[[7, 0, 29]], atol=1e-6)  # other blocks, other float sums


def test_unit_rows_are_used_as_they_are_and_others_normalised_into_a_copy():
    x, _ = blobs(20, 2, d=8)  # unit float32 rows
    same, k = unit_rows(x, 50)
    assert same is x and k == 39  # no copy of a 1.5 GB array at 1M rows
    raw = x * 3.0
    unit, _ = unit_rows(raw, 5)
    assert unit is not raw and np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(raw, x * 3.0)  # the caller's rows untouched
    frozen = x.copy()
    frozen.flags.writeable = False
    assert unit_rows(frozen, 5)[0] is not frozen  # torch reads the rows; it wants a writeable array


def test_ivf_neighbours_match_the_exact_graph_and_do_not_depend_on_threads():
    import faiss

    x, _ = blobs(300, 4, d=32)
    exact, exact_dist = knn_graph(x, 10)
    threads = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        one = knn_graph_ivf(x, 10, n_probe=8, seed=3)
        faiss.omp_set_num_threads(2)
        two = knn_graph_ivf(x, 10, n_probe=8, seed=3)
    finally:
        faiss.omp_set_num_threads(threads)
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])
    idx, dist = one
    assert idx.shape == (1200, 10) and not (idx == np.arange(1200)[:, None]).any()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx, exact)])
    assert recall > 0.95
    assert np.all(np.diff(dist, axis=1) >= -1e-6)
    # probing every list is an exhaustive search: the exact graph itself (up to float ties)
    full, full_dist = knn_graph_ivf(x, 10, n_probe=10_000, seed=3)
    assert np.mean(full == exact) > 0.999
    np.testing.assert_allclose(full_dist, exact_dist, atol=1e-5)


def test_ivf_finds_each_rows_nearest_among_the_rows_of_the_lists_it_probes():
    """Rows are searched in the order of their lists, not the pool's; each must still get the
    nearest rows among those of the lists it probes."""
    x, _ = blobs(150, 6, d=24, seed=4)
    n, k, probe, lists = len(x), 7, 3, 20
    idx, dist = knn_graph_ivf(x, k, n_probe=probe, seed=1, n_lists=lists)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    index = ivf_index(unit, lists, 1)  # kept: its quantizer lives as long as it does
    probes = index.quantizer.search(unit, probe)[1]
    home = probes[:, 0]
    sim = unit @ unit.T
    for i in range(0, n, 37):
        allowed = np.flatnonzero(np.isin(home, probes[i]) & (np.arange(n) != i))
        want = allowed[np.lexsort((allowed, -sim[i, allowed]))[:k]]
        assert list(idx[i]) == list(want)
        np.testing.assert_allclose(dist[i], np.sqrt(np.clip(2 - 2 * sim[i, want], 0, None)), atol=1e-5)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(idx, knn_graph(x, k)[0])])
    assert 0.5 < recall < 1.0  # 3 of 20 lists: approximate, and not by accident exact


def test_recall_target_probes_the_fewest_lists_that_reach_it():
    """From the first count tried, the probes grow by half until the sampled recall reaches the
    target: the count chosen reaches it, the one before does not; the whole graph's recall follows."""
    import faiss

    x, _ = blobs(150, 6, d=24, seed=4)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    exact = knn_graph(x, 7)[0]
    graphs = {}
    threads = faiss.omp_get_max_threads()
    try:
        for t in (1, 2):
            faiss.omp_set_num_threads(t)
            graphs[t] = ivf_search(x, 7, n_probe=1, seed=1, n_lists=20, recall=0.9)
    finally:
        faiss.omp_set_num_threads(threads)
    graph = graphs[1]
    assert np.array_equal(graph.indices, graphs[2].indices) and graph.n_probe == graphs[2].n_probe
    assert graph.n_lists == 20 and 1 < graph.n_probe < 20 and graph.recall >= 0.9
    index = ivf_index(unit, 20, 1)
    before = max(p for p in (1, 2, 3, 5, 8, 12, 18) if p < graph.n_probe)  # the ladder from 1 by halves
    assert sampled_recall(index, unit, 7, before, 2.0, seed=1, rows=500)[0] == 20  # unreachable: every list
    assert sampled_recall(index, unit, 7, before, 0.0, seed=1)[1] < 0.9  # a target of 0: the count itself
    assert sampled_recall(index, unit, 7, graph.n_probe, 0.0, seed=1) == (graph.n_probe, graph.recall)
    whole = np.mean([len(set(a) & set(b)) / 7 for a, b in zip(graph.indices, exact)])
    assert whole >= 0.85  # 500 of the 900 rows were sampled: the rest follow
    assert neighbour_recall(graph.indices, exact) == pytest.approx(whole)  # the benchmarks' measure, the same
    fixed = ivf_search(x, 7, n_probe=graph.n_probe, seed=1, n_lists=20)  # the same count given outright
    assert fixed.recall is None and np.array_equal(fixed.indices, graph.indices)


def test_ivf_says_which_setting_to_raise_when_the_probed_lists_are_too_small():
    x, _ = blobs(40, 2, d=8)
    with pytest.raises(ValueError, match="raise manifold.ivf_probe"):
        knn_graph_ivf(x, 45, n_probe=1, n_lists=2)  # two lists of about 40 rows


def test_auto_search_switches_to_ivf_above_the_threshold():
    x, _ = blobs(100, 4, d=32)
    exact = DiffusionMap(n_neighbors=10, n_components=4, exact_max=400).fit(x)
    approx = DiffusionMap(n_neighbors=10, n_components=4, exact_max=399).fit(x)
    assert (exact.neighbors_, approx.neighbors_) == ("exact", "ivf")
    assert exact.ivf_ is None and approx.ivf_["sampled_recall"] >= ManifoldConfig().ivf_recall
    assert neighbour_search(10**6, ManifoldConfig()) == "ivf" and neighbour_search(50_000, ManifoldConfig()) == "exact"
    assert neighbour_search(10**6, ManifoldConfig(neighbors="exact")) == "exact"
    got = [SpectralClusterer(n_clusters=4).fit(dm.embedding_, dm.eigenvalues_).labels_ for dm in (exact, approx)]
    assert adjusted_rand_score(got[0], got[1]) == 1.0  # the approximate graph clusters as the exact one


def test_diffusion_map_is_deterministic_and_sparse():
    x, _ = blobs()
    a = DiffusionMap(n_neighbors=10, n_components=6).fit(x)
    b = DiffusionMap(n_neighbors=10, n_components=6).fit(x)
    # separate blobs: eigenvalue 1 more than once, a degenerate eigenspace made canonical
    assert np.sum(a.eigenvalues_ > 1 - 1e-6) >= 2
    np.testing.assert_allclose(a.embedding_, b.embedding_, atol=1e-4)
    assert a.embedding_.shape == (400, 6)
    assert a.eigenvalues_[0] == pytest.approx(1.0, abs=1e-6)
    assert a.affinity_.nnz <= 2 * 400 * 10
    assert (a.affinity_ != a.affinity_.T).nnz == 0


PEAK_RSS = """
import os, resource, sys, threading, time
import numpy as np
from paser.selection.manifold import DiffusionMap
n, block = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
x = (rng.normal(size=(5, 32))[rng.integers(0, 5, n)] + rng.normal(size=(n, 32))).astype(np.float32)
DiffusionMap(n_neighbors=15, n_components=8, block_size=256).fit(x[:300])  # libraries loaded and warm
page = os.sysconf("SC_PAGE_SIZE")
def resident():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * page
peak, done = [resident()], threading.Event()
def sample():  # the kernel's own peak (ru_maxrss) can lag behind a short-lived block; sample too
    while not done.is_set():
        peak[0] = max(peak[0], resident())
        time.sleep(0.002)
before, before_max = resident(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
watcher = threading.Thread(target=sample)
watcher.start()
DiffusionMap(n_neighbors=15, n_components=8, block_size=block).fit(x)
done.set()
watcher.join()
after_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(max(peak[0] - before, after_max - before_max))
"""


def _peak_growth(n: int, block: int) -> int:
    """Bytes the fit adds to the peak resident memory of a fresh process (torch's allocations
    included, which tracemalloc does not see)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(n), str(block)], capture_output=True, text=True,
                         check=True, timeout=600)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(__import__("sys").platform != "linux", reason="reads /proc/self/statm")
def test_diffusion_map_never_allocates_n_by_n():
    n = 12_000  # a dense n x n float32 matrix: 576 MB
    dense = n * n * 4
    assert _peak_growth(n, 256) < dense / 3  # measured here: about 0.2 of it (graph, eigensolver, one block)
    assert _peak_growth(n, n) > dense * 0.9  # the same measurement sees one block of every row


@pytest.mark.parametrize("method", ["nmf", "kmeans"])
def test_clusters_recover_blobs_with_automatic_k(method):
    x, truth = blobs(k=5)
    dm = DiffusionMap(n_neighbors=15, n_components=10).fit(x)
    c = SpectralClusterer(method=method, k_min=2, k_max=10).fit(dm.embedding_, dm.eigenvalues_)
    assert c.k_ == 5 and c.knee_k_ == 5 and c.eigengap_k_ == 5
    assert adjusted_rand_score(truth, c.labels_) > 0.95
    assert [p["k"] for p in c.k_curve_] == list(range(2, 11))


def test_fixed_k_and_eigengap_selection():
    x, truth = blobs(k=4)
    dm = DiffusionMap(n_neighbors=15, n_components=8).fit(x)
    fixed = SpectralClusterer(n_clusters=4).fit(dm.embedding_, dm.eigenvalues_)
    assert fixed.k_ == 4 and fixed.k_curve_ == []
    gap = SpectralClusterer(k_selection="eigengap", k_min=2, k_max=8).fit(dm.embedding_, dm.eigenvalues_)
    assert gap.k_ == 4 and adjusted_rand_score(truth, gap.labels_) > 0.95


def test_same_seed_same_labels():
    x, _ = blobs(k=6, seed=3)
    coords, vals = learn_manifold(x, ManifoldConfig(n_neighbors=12, n_components=10), random_state=1)
    a = SpectralClusterer.from_config(ClusterConfig(k_max=10), random_state=1).fit(coords, vals).labels_
    b = SpectralClusterer.from_config(ClusterConfig(k_max=10), random_state=1).fit(coords, vals).labels_
    assert np.array_equal(a, b)


def test_helpers():
    assert knee([2, 3, 4, 5, 6], [10.0, 4.0, 3.0, 2.5, 2.2]) == 3
    assert knee([2, 3], [1.0, 0.5]) == 2
    assert eigengap_k(np.array([1.0, 0.99, 0.98, 0.5, 0.49]), 2, 4) == 3
    x = np.array([[1.0, -2.0]])
    assert np.array_equal(nonnegative(x), [[1.0, 0.0, 0.0, 2.0]])
    with pytest.raises(ValueError):
        ClusterConfig(k_min=5, k_max=3)


def test_map_layout_is_deterministic_and_sampled_beyond_its_cap():
    from paser.selection.report import map_layout

    rng = np.random.default_rng(0)
    coords = np.vstack([rng.normal(c, 0.1, size=(40, 6)) for c in (0.0, 3.0, 6.0)])
    index, xy = map_layout(coords, seed=1)
    again = map_layout(coords, seed=1)
    assert np.array_equal(index, np.arange(120)) and xy.shape == (120, 2) and np.array_equal(xy, again[1])
    # the three groups stay apart on the map: nearest neighbours share a group
    group = np.repeat([0, 1, 2], 40)
    nearest = np.argsort(((xy[:, None] - xy[None]) ** 2).sum(-1), axis=1)[:, 1]
    assert (group[nearest] == group).mean() > 0.95
    index, xy = map_layout(coords, seed=1, max_points=50)
    assert len(index) == 50 and np.all(np.diff(index) > 0) and xy.shape == (50, 2)


def test_knee_band_takes_the_far_end_of_a_flat_bend():
    from paser.selection.clustering import knee_band

    ks = list(range(4, 21))
    # NMF error curves of the embedded default's manifold, rows in pool order and permuted (seed 11):
    # no sharp elbow, and the argmax moves from 11 to 10 while the band's far end stays at 13
    ordered = [23.496, 21.878, 20.531, 19.148, 17.912, 16.521, 15.32, 14.032, 12.979, 11.871, 10.973, 10.113,
               10.105, 8.186, 7.263, 6.362, 5.343]
    permuted = [23.675, 22.221, 20.787, 19.36, 17.927, 16.475, 15.187, 14.138, 13.038, 11.868, 10.921, 10.014,
                9.042, 8.175, 7.206, 6.244, 5.358]
    assert (knee(ks, ordered), knee(ks, permuted)) == (11, 10)
    assert knee_band(ks, ordered, 0.1) == (11, 13) and knee_band(ks, permuted, 0.1)[1] == 13
    assert knee_band(ks, permuted, 0.0) == (10, 10)  # no tolerance: the paper's knee


@pytest.mark.slow
def test_k_is_stable_under_perturbations_that_do_not_change_the_data():
    """The embedded default's instructions (1,000 suite records): K and the clusters' agreement
    with the 12 task families under float noise of 1e-6 and row permutations."""
    from paser.data.suite import suite_pool
    from paser.selection.configs import EmbedConfig
    from paser.selection.embedding import embed_texts, instruction_texts

    records = suite_pool(1000, 0).records
    families = np.array([r.fields["family"] for r in records])
    embeddings = embed_texts(instruction_texts(records, True), EmbedConfig())
    found = []
    for case in range(5):
        rng = np.random.default_rng(case)
        order = rng.permutation(len(records)) if case % 2 else np.arange(len(records))
        x = embeddings[order] + (rng.normal(0, 1e-6, embeddings.shape) if case else 0.0)
        coords, eigenvalues = learn_manifold(x.astype(np.float32), ManifoldConfig())
        clusterer = SpectralClusterer().fit(coords, eigenvalues)
        found.append((clusterer.k_, adjusted_rand_score(families[order], clusterer.labels_)))
    assert len({k for k, _ in found}) == 1, found
    assert min(a for _, a in found) >= 0.9, found
