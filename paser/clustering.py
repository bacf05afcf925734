"""Stage 3: spectral clustering of the manifold coordinates, with K chosen automatically.

Each record's spectral coordinates are first scaled to unit length (as in Ng-Jordan-Weiss).
Paper variant (default): NMF of those coordinates made non-negative by splitting each into its
positive and negative parts, [max(x, 0), max(-x, 0)]; a record's cluster is the argmax of its
NMF factor row. K is the knee of the NMF reconstruction-error curve over [k_min, k_max] (every K
factorises the same matrix, so the curve decreases and its knee is meaningful);
the eigengap of the normalised operator is reported beside it. Also k-means on the same
coordinates; a fixed K is an option.

    python -c "import numpy as np; from paser.clustering import SpectralClusterer; \
print(SpectralClusterer().fit(np.random.rand(300, 8)).n_clusters_)"
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass
class ClusterConfig:
    """How capability clusters are found."""

    method: Literal["nmf", "kmeans"] = "nmf"
    """NMF-based spectral clustering (the paper's) or k-means on the spectral coordinates."""
    n_clusters: int | None = None
    """A fixed K; None chooses K automatically in [k_min, k_max]."""
    k_min: int = 4
    k_max: int = 20
    k_selection: Literal["knee", "eigengap"] = "knee"
    """Automatic K: knee of the NMF reconstruction error (paper) or the largest eigengap."""
    selection_sample: int = 10000
    """Records used to trace the K-selection curve (all when fewer); the final fit uses every record."""

    def __post_init__(self):
        if not 2 <= self.k_min <= self.k_max:
            raise ValueError(f"need 2 <= k_min <= k_max, got k_min={self.k_min}, k_max={self.k_max}")
        if self.n_clusters is not None and self.n_clusters < 1:
            raise ValueError(f"n_clusters must be positive, got {self.n_clusters}")


def nonnegative(coords: np.ndarray) -> np.ndarray:
    """[max(x, 0), max(-x, 0)]: non-negative with no information lost."""
    return np.hstack([np.clip(coords, 0, None), np.clip(-coords, 0, None)]).astype(np.float64)


def _nmf(x: np.ndarray, k: int, random_state: int):
    from sklearn.decomposition import NMF

    model = NMF(n_components=k, init="nndsvda", max_iter=400, tol=1e-4, random_state=random_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings: the error curve is what matters
        w = model.fit_transform(x)
    return w, float(model.reconstruction_err_)


def knee(ks: list[int], errors: list[float]) -> int:
    """Kneedle on a decreasing curve: the K farthest below the chord from first to last point."""
    if len(ks) < 3:
        return ks[0]
    x = (np.asarray(ks, float) - ks[0]) / (ks[-1] - ks[0])
    e = np.asarray(errors, float)
    span = e.max() - e.min()
    if span <= 0:
        return ks[0]
    y = (e - e.min()) / span
    gap = (1.0 - x) - y  # chord from (0, 1) to (1, 0) minus the curve
    return ks[int(np.argmax(gap))]


def eigengap_k(eigenvalues: np.ndarray, k_min: int, k_max: int) -> int | None:
    """K with the largest gap lambda_K - lambda_{K+1} (eigenvalues sorted descending, trivial first)."""
    vals = np.asarray(eigenvalues, float)
    if vals.size < k_min + 1:
        return None
    hi = min(k_max, vals.size - 1)
    gaps = [vals[k - 1] - vals[k] for k in range(k_min, hi + 1)]
    return k_min + int(np.argmax(gaps))


class SpectralClusterer:
    """Cluster spectral coordinates (scikit-learn style).

    Learned: ``labels_`` [N], ``k_`` (the K fitted), ``n_clusters_`` (non-empty clusters, at most
    ``k_``), ``k_curve_`` (list of {k, error}), ``knee_k_``, ``eigengap_k_`` (None without eigenvalues).
    """

    def __init__(self, method: str = "nmf", n_clusters: int | None = None, k_min: int = 4, k_max: int = 20,
                 k_selection: str = "knee", selection_sample: int = 10000, random_state: int = 0,
                 verbose: bool = False):
        self.method = method
        self.n_clusters = n_clusters
        self.k_min = k_min
        self.k_max = k_max
        self.k_selection = k_selection
        self.selection_sample = selection_sample
        self.random_state = random_state
        self.verbose = verbose

    @classmethod
    def from_config(cls, config: ClusterConfig, random_state: int = 0, verbose: bool = False) -> SpectralClusterer:
        return cls(config.method, config.n_clusters, config.k_min, config.k_max, config.k_selection,
                   config.selection_sample, random_state, verbose)

    def fit(self, coords: np.ndarray, eigenvalues: np.ndarray | None = None) -> SpectralClusterer:
        """``eigenvalues`` (diffusion map, descending) give the eigengap; UMAP coordinates have none."""
        n = coords.shape[0]
        x = spectral_rows(coords)
        k_max = max(2, min(self.k_max, n - 1))
        k_min = min(self.k_min, k_max)
        has_eig = eigenvalues is not None and len(eigenvalues) > 0
        self.eigengap_k_ = eigengap_k(eigenvalues, k_min, k_max) if has_eig else None
        self.k_curve_, self.knee_k_ = [], None
        if self.n_clusters is None:
            # the K-selection curve, on a fixed random subsample for large pools
            rng = np.random.default_rng(self.random_state)
            rows = np.arange(n) if n <= self.selection_sample else np.sort(
                rng.choice(n, self.selection_sample, replace=False))
            sample = nonnegative(x[rows])
            from tqdm.auto import tqdm

            from paser.progress import bar_enabled

            for k in tqdm(range(k_min, k_max + 1), desc="choosing K", disable=not bar_enabled(self.verbose)):
                self.k_curve_.append({"k": k, "error": _nmf(sample, k, self.random_state)[1]})
            self.knee_k_ = knee([p["k"] for p in self.k_curve_], [p["error"] for p in self.k_curve_])
        if self.n_clusters is not None:
            k = min(self.n_clusters, n)
        elif self.k_selection == "eigengap" and self.eigengap_k_ is not None:
            k = self.eigengap_k_
        else:
            k = self.knee_k_
        if self.method == "nmf":
            labels = _nmf(nonnegative(x), k, self.random_state)[0].argmax(axis=1)
        elif self.method == "kmeans":
            from sklearn.cluster import KMeans

            labels = KMeans(n_clusters=k, n_init=10, random_state=self.random_state).fit_predict(x)
        else:
            raise ValueError(f"unknown clustering method {self.method!r}; choose nmf or kmeans")
        self.k_ = k
        self.labels_ = _relabel(labels)
        self.n_clusters_ = int(self.labels_.max()) + 1
        return self


def spectral_rows(coords: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length."""
    return coords / np.maximum(np.linalg.norm(coords, axis=1, keepdims=True), 1e-12)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive labels 0..K'-1 in order of first appearance (an NMF factor may stay empty)."""
    mapping: dict[int, int] = {}
    for lab in labels.tolist():
        mapping.setdefault(lab, len(mapping))
    return np.array([mapping[lab] for lab in labels.tolist()], dtype=np.int64)
