"""Stage 2: manifold learning on instruction embeddings, never with an N x N matrix.

Default: a diffusion map on a sparse, symmetric k-nearest-neighbour graph (cosine; self-tuning
bandwidth sigma_i = distance to the k-th neighbour; A_ij = exp(-d_ij^2 / (sigma_i sigma_j))).
Coordinates are the top eigenvectors of D^-1/2 A D^-1/2 turned into diffusion coordinates
psi_k = phi_k / phi_0, scaled by lambda_k^t, the trivial one dropped. Memory is O(N k).
Neighbours (``paser/selection/neighbours.py``) are exact up to ``exact_max`` rows (the search
costs O(N^2 d)); above it an inverted-file index (seeded k-means lists, exact inner products
inside the probed lists) finds them in about O(N sqrt(N) d), the same on any thread count, probing
as many lists as a sampled recall target needs; ``bench/scale.py`` measures its recall against the
exact graph. Option: UMAP (umap-learn; cosine; min_dist 0).

    python -c "import numpy as np; from paser.selection.manifold import DiffusionMap; \
x = np.random.randn(500, 16); print(DiffusionMap(n_components=4).fit_transform(x).shape)"
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, eigsh

from paser.progress import announce
from paser.selection.configs import ManifoldConfig
from paser.selection.neighbours import ivf_search, knn_graph


def neighbour_search(n: int, config: ManifoldConfig) -> str:
    """The search ``config`` uses for ``n`` rows: exact or ivf."""
    if config.neighbors == "auto":
        return "exact" if n <= config.exact_max else "ivf"
    return config.neighbors


def affinity_matrix(idx: np.ndarray, dist: np.ndarray) -> sp.csr_matrix:
    """Symmetric self-tuning Gaussian affinity on the union of kNN edges (sparse)."""
    n, k = idx.shape
    sigma = np.maximum(dist[:, -1], 1e-6).astype(np.float64)
    rows = np.repeat(np.arange(n), k)
    cols = idx.ravel()
    d2 = dist.ravel().astype(np.float64) ** 2
    w = np.exp(-d2 / (sigma[rows] * sigma[cols]))
    a = sp.csr_matrix((w, (rows, cols)), shape=(n, n))
    return a.maximum(a.T).tocsr()  # d_ij is symmetric, so the kernel is too; max keeps the union


def component_basis(a: sp.csr_matrix, sqrt_deg: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the eigenvalue-1 eigenspace of D^-1/2 A D^-1/2, from the graph's
    connected components: the global stationary vector first, then one vector per further component
    (components by size, then by total degree, then by first row): it depends on the graph, not on
    the order of its rows.

    A graph with several components has eigenvalue 1 once per component, and an iterative solver
    does not reliably return every copy of a repeated eigenvalue: on the embedded default's graph
    (3 components) ARPACK returned two, an arbitrary plane of the three-dimensional eigenspace that
    1e-6 of noise turned, which moved the coordinates and with them K. Built here exactly, the
    space is deflated from the operator before the solver sees it."""
    from scipy.sparse.csgraph import connected_components

    count, labels = connected_components(a, directed=False)
    sizes = np.bincount(labels)
    weight = np.bincount(labels, weights=sqrt_deg**2)  # the component's total degree: no row order in it
    first = np.full(count, len(labels))
    np.minimum.at(first, labels, np.arange(len(labels)))
    order = sorted(range(count), key=lambda c: (-sizes[c], -round(weight[c], 6), first[c]))
    columns = [sqrt_deg] + [np.where(labels == c, sqrt_deg, 0.0) for c in order[:-1]]
    q, r = np.linalg.qr(np.column_stack(columns))
    return q * np.sign(np.diag(r))  # QR's signs fixed: each column leans towards the vector it came from


def canonical_eigenvectors(vals: np.ndarray, vecs: np.ndarray, seed: int, tol: float = 1e-6) -> np.ndarray:
    """Replace each basis of a repeated eigenvalue (other than the components' 1) by one that
    depends only on the eigenspace: fixed seeded vectors projected onto it and orthonormalised."""
    vecs = vecs.copy()
    rng = np.random.default_rng(seed)
    start = 0
    for i in range(1, len(vals) + 1):
        if i == len(vals) or abs(vals[i] - vals[start]) > tol:
            if i - start > 1:
                v = vecs[:, start:i]
                probe = rng.standard_normal((v.shape[0], i - start))
                q, _ = np.linalg.qr(v @ (v.T @ probe))
                vecs[:, start:i] = q
            start = i
    return vecs


class DiffusionMap:
    """Diffusion-map coordinates of points on a sparse kNN graph (scikit-learn style).

    Learned: ``embedding_`` [N, n_components], ``eigenvalues_`` (incl. the trivial 1.0, once per
    connected component of the graph), ``components_`` (the graph's connected components),
    ``affinity_`` (sparse N x N, O(N k) entries), ``neighbors_`` (the search used: exact or ivf),
    ``ivf_`` (for ivf: lists made and probed, the sampled recall; else None).
    """

    # the defaults are the pipeline's (ManifoldConfig), so a notebook fit equals paser select's
    def __init__(self, n_neighbors: int = ManifoldConfig.n_neighbors, n_components: int = ManifoldConfig.n_components,
                 diffusion_time: int = ManifoldConfig.diffusion_time, block_size: int = ManifoldConfig.block_size,
                 random_state: int = 0, neighbors: str = ManifoldConfig.neighbors,
                 exact_max: int = ManifoldConfig.exact_max, ivf_probe: int = ManifoldConfig.ivf_probe,
                 ivf_recall: float = ManifoldConfig.ivf_recall):
        self.n_neighbors = n_neighbors
        self.n_components = n_components
        self.diffusion_time = diffusion_time
        self.block_size = block_size
        self.random_state = random_state
        self.neighbors = neighbors
        self.exact_max = exact_max
        self.ivf_probe = ivf_probe
        self.ivf_recall = ivf_recall

    def neighbours(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The kNN graph of ``x`` (indices, distances) by the search this map uses for its size."""
        self.neighbors_ = neighbour_search(len(x), ManifoldConfig(neighbors=self.neighbors, exact_max=self.exact_max))
        self.ivf_ = None
        if self.neighbors_ == "exact":
            return knn_graph(x, self.n_neighbors, self.block_size)
        graph = ivf_search(x, self.n_neighbors, self.ivf_probe, self.random_state, recall=self.ivf_recall)
        self.ivf_ = {"lists": graph.n_lists, "probed": graph.n_probe, "sampled_recall": graph.recall}
        measured = "" if graph.recall is None else f", recall@{self.n_neighbors} {graph.recall:.3f} on 500 sampled rows"
        announce(f"neighbours: IVF index of {graph.n_lists} lists, {graph.n_probe} probed per row{measured}")
        return graph.indices, graph.distances

    def fit(self, x: np.ndarray) -> DiffusionMap:
        return self.fit_graph(*self.neighbours(x))

    def fit_graph(self, idx: np.ndarray, dist: np.ndarray) -> DiffusionMap:
        """Fit on a kNN graph already found (``neighbours``)."""
        n = idx.shape[0]
        a = affinity_matrix(idx, dist)
        deg = np.asarray(a.sum(axis=1)).ravel()
        inv_sqrt = 1.0 / np.sqrt(deg)
        s = sp.diags(inv_sqrt) @ a @ sp.diags(inv_sqrt)  # symmetric normalised operator
        n_eig = min(self.n_components + 1, n - 1)
        ones = component_basis(a, np.sqrt(deg))
        self.components_ = int(ones.shape[1])
        ones = ones[:, :n_eig]
        rest = n_eig - ones.shape[1]
        if rest > 0:
            # the eigenvalue-1 space removed (s q = q): the solver sees only the other eigenvalues
            deflated = LinearOperator((n, n), matvec=lambda v: s @ v - ones @ (ones.T @ v), dtype=np.float64)
            v0 = np.random.default_rng(self.random_state).uniform(0.5, 1.0, n)
            v0 -= ones @ (ones.T @ v0)
            vals, vecs = eigsh(deflated, k=rest, which="LA", v0=v0, tol=1e-6)
            order = np.argsort(-vals)
            vals, vecs = vals[order], canonical_eigenvectors(vals[order], vecs[:, order], self.random_state)
            vals = np.concatenate([np.ones(ones.shape[1]), vals])
            vecs = np.hstack([ones, vecs])
        else:
            vals, vecs = np.ones(n_eig), ones
        # right eigenvectors of the random-walk matrix D^-1 A: psi = phi / sqrt(deg)
        psi = vecs * inv_sqrt[:, None]
        psi /= np.linalg.norm(psi, axis=0, keepdims=True)
        # eigenvector signs are arbitrary: make the first clearly non-zero entry positive
        # (the largest entry is not a stable choice: component indicators have many equal ones)
        big = np.abs(psi) > 0.5 * np.abs(psi).max(axis=0, keepdims=True)
        first = big.argmax(axis=0)
        psi *= np.where(psi[first, np.arange(psi.shape[1])] < 0, -1.0, 1.0)
        coords = psi[:, 1:] * (np.clip(vals[1:], 0.0, None) ** self.diffusion_time)
        self.eigenvalues_ = vals
        self.embedding_ = (coords * np.sqrt(n)).astype(np.float32)  # O(1) entries whatever N is
        self.affinity_ = a
        return self

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        return self.fit(x).embedding_


def umap_coordinates(x: np.ndarray, config: ManifoldConfig, random_state: int = 0) -> np.ndarray:
    try:
        import umap
    except ImportError:
        raise ValueError("manifold method 'umap' needs umap-learn: pip install 'paser[umap]'") from None
    reducer = umap.UMAP(n_neighbors=config.n_neighbors, n_components=config.n_components, min_dist=0.0,
                        metric="cosine", random_state=random_state)
    return reducer.fit_transform(x).astype(np.float32)


def learn_manifold(x: np.ndarray, config: ManifoldConfig, random_state: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(coordinates [N, n_components], eigenvalues or an empty array for UMAP)."""
    if config.method == "umap":
        return umap_coordinates(x, config, random_state), np.array([])
    dm = DiffusionMap(config.n_neighbors, config.n_components, config.diffusion_time, config.block_size,
                      random_state, config.neighbors, config.exact_max, config.ivf_probe, config.ivf_recall).fit(x)
    return dm.embedding_, dm.eigenvalues_
