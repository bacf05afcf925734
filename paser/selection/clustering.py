"""Stage 3: spectral clustering of the manifold coordinates, with K chosen automatically.

Each record's spectral coordinates are first scaled to unit length (as in Ng-Jordan-Weiss).
Paper variant (default): NMF of those coordinates made non-negative by splitting each into its
positive and negative parts, [max(x, 0), max(-x, 0)]; a record's cluster is the argmax of its
NMF factor row. K comes from the NMF reconstruction-error curve over [k_min, k_max] (every K
factorises the same matrix, so the curve decreases and its knee is meaningful): the paper's rule
takes the knee, the K farthest below the chord (``k_selection: knee``); the default (``knee_band``)
takes the largest K whose distance below the chord is within ``knee_band`` (10%) of the knee's, the
far end of the bend, which errs towards splitting a capability over two clusters rather than
merging two capabilities into one (whose mean degradation would blur both). The curve's NMFs run to
convergence (tol 1e-6, at most 3,000 iterations; the final fit keeps tol 1e-4). When the knee lies
less than ``FLAT_KNEE`` of the curve's range below its chord, the curve has no real elbow: the run
says so and names the band of K that fits about equally well. K stays put under float noise, row
order, thread count and one record less because the coordinates do (paser.selection.manifold builds
the eigenvalue-1 space from the graph's components); bench/k_stability.py measures it.
The eigengap of the normalised operator is reported beside it. Also k-means on the same
coordinates; a fixed K is an option.

    python -c "import numpy as np; from paser.selection.clustering import SpectralClusterer; \
print(SpectralClusterer().fit(np.random.rand(300, 8)).n_clusters_)"
"""

from __future__ import annotations

import warnings

import numpy as np

from paser.progress import bar_enabled
from paser.selection.configs import ClusterConfig


def nonnegative(coords: np.ndarray) -> np.ndarray:
    """[max(x, 0), max(-x, 0)]: non-negative with no information lost."""
    return np.hstack([np.clip(coords, 0, None), np.clip(-coords, 0, None)]).astype(np.float64)


CURVE_TOL, CURVE_MAX_ITER = 1e-6, 3000  # the K-selection curve is fitted to convergence
# A knee less than this far below the chord (in units of the curve's range) is no real elbow: the
# error falls about as much for every cluster added, and a band of K fits about equally well.
FLAT_KNEE = 0.15


def _nmf(x: np.ndarray, k: int, random_state: int, tol: float = 1e-4, max_iter: int = 400):
    from sklearn.decomposition import NMF

    model = NMF(n_components=k, init="nndsvda", max_iter=max_iter, tol=tol, random_state=random_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings: the error curve is what matters
        w = model.fit_transform(x)
    return w, float(model.reconstruction_err_)


def knee_gaps(ks: list[int], errors: list[float]) -> np.ndarray:
    """Each K's distance below the chord from the curve's first to its last point (both axes
    scaled to [0, 1]); zeros for a flat or too short curve."""
    if len(ks) < 3:
        return np.zeros(len(ks))
    x = (np.asarray(ks, float) - ks[0]) / (ks[-1] - ks[0])
    e = np.asarray(errors, float)
    span = e.max() - e.min()
    if span <= 0:
        return np.zeros(len(ks))
    return (1.0 - x) - (e - e.min()) / span  # chord from (0, 1) to (1, 0) minus the curve


def knee(ks: list[int], errors: list[float]) -> int:
    """Kneedle on a decreasing curve: the K farthest below the chord from first to last point."""
    return ks[int(np.argmax(knee_gaps(ks, errors)))]


def knee_band(ks: list[int], errors: list[float], band: float = 0.1) -> tuple[int, int]:
    """The range of K whose distance below the chord is at least (1 - band) times the knee's:
    (smallest, largest). The ``knee_band`` rule takes the largest."""
    gaps = knee_gaps(ks, errors)
    top = gaps.max()
    inside = [k for k, g in zip(ks, gaps) if g >= (1.0 - band) * top] if top > 0 else [ks[0]]
    return min(inside), max(inside)


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
    ``k_``), ``k_curve_`` (list of {k, error}), ``knee_k_``, ``knee_band_`` ((smallest, largest) K
    within the band), ``knee_height_`` (the knee's distance below the chord, in units of the curve's
    range), ``flat_`` (the curve is nearly straight: the knee's height under ``FLAT_KNEE``),
    ``eigengap_k_`` (None without eigenvalues), ``k_reason_`` (why K is what it is, in words).
    """

    # the defaults are the pipeline's (ClusterConfig), so a notebook fit equals paser select's
    def __init__(self, method: str = ClusterConfig.method, n_clusters: int | None = ClusterConfig.n_clusters,
                 k_min: int = ClusterConfig.k_min, k_max: int = ClusterConfig.k_max,
                 k_selection: str = ClusterConfig.k_selection, selection_sample: int = ClusterConfig.selection_sample,
                 random_state: int = 0, verbose: bool = False, knee_band: float = ClusterConfig.knee_band):
        self.method = method
        self.n_clusters = n_clusters
        self.k_min = k_min
        self.k_max = k_max
        self.k_selection = k_selection
        self.selection_sample = selection_sample
        self.random_state = random_state
        self.verbose = verbose
        self.knee_band = knee_band

    @classmethod
    def from_config(cls, config: ClusterConfig, random_state: int = 0, verbose: bool = False) -> SpectralClusterer:
        return cls(config.method, config.n_clusters, config.k_min, config.k_max, config.k_selection,
                   config.selection_sample, random_state, verbose, config.knee_band)

    def fit(self, coords: np.ndarray, eigenvalues: np.ndarray | None = None) -> SpectralClusterer:
        """``eigenvalues`` (diffusion map, descending) give the eigengap; UMAP coordinates have none."""
        n = coords.shape[0]
        x = spectral_rows(coords)
        k_max = max(2, min(self.k_max, n - 1))
        k_min = min(self.k_min, k_max)
        has_eig = eigenvalues is not None and len(eigenvalues) > 0
        self.eigengap_k_ = eigengap_k(eigenvalues, k_min, k_max) if has_eig else None
        self.k_curve_, self.knee_k_, self.knee_band_, self.knee_height_, self.flat_ = [], None, None, None, None
        if self.n_clusters is None:
            # the K-selection curve, on a fixed random subsample for large pools
            rng = np.random.default_rng(self.random_state)
            rows = np.arange(n) if n <= self.selection_sample else np.sort(
                rng.choice(n, self.selection_sample, replace=False))
            sample = nonnegative(x[rows])
            from tqdm.auto import tqdm

            for k in tqdm(range(k_min, k_max + 1), desc="choosing K", disable=not bar_enabled(self.verbose)):
                self.k_curve_.append({"k": k, "error": _nmf(sample, k, self.random_state, CURVE_TOL,
                                                            CURVE_MAX_ITER)[1]})
            ks, errors = [p["k"] for p in self.k_curve_], [p["error"] for p in self.k_curve_]
            self.knee_k_ = knee(ks, errors)
            self.knee_band_ = knee_band(ks, errors, self.knee_band)
            self.knee_height_ = float(knee_gaps(ks, errors).max())
            self.flat_ = self.knee_height_ < FLAT_KNEE
        if self.n_clusters is not None:
            k = min(self.n_clusters, n)
            self.k_reason_ = "fixed by the configuration (n_clusters)"
        elif self.k_selection == "eigengap" and self.eigengap_k_ is not None:
            k = self.eigengap_k_
            self.k_reason_ = "the largest gap between eigenvalues K and K+1 of the diffusion operator"
        elif self.k_selection == "knee_band":
            k = self.knee_band_[1]
            self.k_reason_ = (f"the largest K whose distance below the NMF error curve's chord is within "
                              f"{self.knee_band:.0%} of the knee's (the knee is {self.knee_k_}; K "
                              f"{self.knee_band_[0]} to {self.knee_band_[1]} are within the band)")
        else:
            k = self.knee_k_
            self.k_reason_ = "the knee: the K farthest below the NMF error curve's chord"
        if self.flat_:
            self.k_reason_ += (f"; the curve is nearly straight (its knee lies {self.knee_height_:.3f} of its range "
                               f"below the chord): K {self.knee_band_[0]} to {self.knee_band_[1]} fit about "
                               "equally well, none is a clear number of capabilities")
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
