"""The configs of ``paser select``'s stages, one dataclass per stage (YAML sections of the same names).

They hold settings only: this module imports no algorithm code, so that building the CLI's
options, reading a YAML file or printing ``--help`` loads neither torch nor scikit-learn. Each
stage's module imports its config from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from paser.data.prompts import PromptFormat
from paser.models.config import PruneConfig
from paser.selection.budget import parse_budget


@dataclass
class AllocateConfig:
    """How the budget is split across clusters."""

    method: Literal["largest_remainder", "floor", "uniform"] = "largest_remainder"
    """largest_remainder (exact total), the paper's floor, or uniform (an ablation: CDS ignored)."""


@dataclass
class SampleConfig:
    """How ``--method strat`` splits the budget and draws records. The defaults (tau_c 1, tau_i 1,
    near-duplicates at cosine 0.95) are the configuration the recovery-cost experiment's registered
    sweep chose on suite-15 (docs/benchmarks.md), frozen before it ran on any other setting."""

    cds_temperature: float = 1.0
    """tau_c: cluster shares ~ size x (CDS / mean CDS)^tau_c; 0 is in proportion to size (no model
    needed when ies_temperature is 0 too), 1 is size x CDS."""
    ies_temperature: float = 1.0
    """tau_i: inside a cluster records are drawn with probability ~ (IES / the cluster's mean
    IES)^tau_i; 0 is uniform, 1 is in proportion to IES (needs every record scored)."""
    dedup: float | Literal["off"] | None = 0.95
    """Skip a record whose instruction embedding has cosine similarity at least this with a record
    already taken (near-duplicate removal); off (YAML null): keep every record."""

    def __post_init__(self):
        if self.dedup == "off":
            self.dedup = None
        if self.cds_temperature < 0 or self.ies_temperature < 0:
            raise ValueError("cds_temperature and ies_temperature must be >= 0")
        if self.dedup is not None and not 0 < self.dedup <= 1:
            raise ValueError(f"dedup must be a cosine similarity in (0, 1], got {self.dedup}")

    @classmethod
    def uniform(cls) -> SampleConfig:
        """Stratified random sampling: shares by size, records uniformly, every record kept."""
        return cls(cds_temperature=0.0, ies_temperature=0.0, dedup=None)

    @property
    def needs_cds(self) -> bool:
        return self.cds_temperature > 0

    @property
    def needs_every_score(self) -> bool:
        return self.ies_temperature > 0


@dataclass
class EmbedConfig:
    """How instructions become vectors."""

    model: str | None = None
    """A local sentence-transformers folder; default: the packaged all-MiniLM-L6-v2."""
    include_input: bool = True
    """Embed the instruction followed by its input/context (False: instruction alone)."""
    batch_size: int = 64
    """Texts per encoder batch."""
    device: str | None = None
    """Device for the encoder (default: CUDA when available, else CPU)."""
    precomputed: str | None = None
    """Embeddings made elsewhere (a GPU job, say) instead of running the encoder here: .npz with
    ``ids`` and ``embeddings``, .parquet with ``id`` and ``embedding`` columns, or .npy rows in the
    pool's order. Every pool id must be there once (extra ids are ignored) and the vectors must have
    the encoder's dimension (``model``'s); rows are made unit length. The compute ledger names them
    as not counted."""


@dataclass
class ManifoldConfig:
    """How embeddings become low-dimensional coordinates for clustering."""

    method: Literal["diffusion", "umap"] = "diffusion"
    """Diffusion map on a sparse kNN graph (default) or UMAP."""
    n_neighbors: int = 30
    """Neighbours per point in the kNN graph (30 separated the suite's 12 families better than 15:
    see docs/benchmarks.md)."""
    n_components: int = 20
    """Output dimensions; keep it at least the largest K tried."""
    diffusion_time: int = 1
    """t in lambda^t scaling of diffusion coordinates."""
    block_size: int = 1024
    """Rows per block of the exact neighbour search (memory: block_size x N floats)."""
    neighbors: Literal["auto", "exact", "ivf"] = "auto"
    """Neighbour search: exact; ivf (an inverted-file index, approximate: about 4 sqrt(N) k-means
    lists, each row compared with the rows of its nearest lists, as many as ivf_recall needs);
    auto: exact up to exact_max rows, ivf above."""
    exact_max: int = 50_000
    """Rows up to which auto searches exactly (the exact search grows with N^2; its time at 50,000
    and 200,000 rows is in docs/benchmarks.md, bench/scale.py)."""
    ivf_probe: int = 8
    """Lists of the IVF index searched per row (of about 4 sqrt(N)), the fewest when ivf_recall is
    set; more: higher recall, slower (recall and time by size: docs/benchmarks.md)."""
    ivf_recall: float = 0.92
    """Recall@n_neighbors the IVF search must reach on a seeded sample of 500 rows checked against
    their exact neighbours: the probed lists grow by half from ivf_probe until it does (0: exactly
    ivf_probe lists)."""


@dataclass
class ClusterConfig:
    """How capability clusters are found."""

    method: Literal["nmf", "kmeans"] = "nmf"
    """NMF-based spectral clustering (the paper's) or k-means on the spectral coordinates."""
    n_clusters: int | None = None
    """A fixed K; None chooses K automatically in [k_min, k_max]."""
    k_min: int = 4
    k_max: int = 20
    k_selection: Literal["knee_band", "knee", "eigengap"] = "knee_band"
    """Automatic K: knee_band (the largest K within knee_band of the knee's height: stable when the
    curve has no sharp elbow), knee (the paper's argmax), or the largest eigengap."""
    knee_band: float = 0.1
    """knee_band's tolerance: K qualifies when its distance below the chord is at least (1 -
    knee_band) times the knee's."""
    selection_sample: int = 10000
    """Records used to trace the K-selection curve (all when fewer); the final fit uses every record."""

    def __post_init__(self):
        if not 2 <= self.k_min <= self.k_max:
            raise ValueError(f"need 2 <= k_min <= k_max, got k_min={self.k_min}, k_max={self.k_max}")
        if self.n_clusters is not None and self.n_clusters < 1:
            raise ValueError(f"n_clusters must be positive, got {self.n_clusters}")
        if not 0 <= self.knee_band < 1:
            raise ValueError(f"knee_band must be in [0, 1), got {self.knee_band}")


@dataclass
class ScoreConfig:
    """How degradation is measured."""

    prompt: PromptFormat = field(default_factory=PromptFormat)
    """The prompt format (the ``prompt`` section, shared with recovery and evaluation)."""
    MOVED: ClassVar[dict] = {"template": "prompt.template", "cutoff": "prompt.cutoff"}
    """Keys of this section that moved to the ``prompt`` section (a clear error, not "unknown key")."""
    positions: Literal["response", "prompt", "all", "instruction_sum"] = "response"
    """Scored tokens: the response (default), the prompt, all, or the authors' instruction-only sum."""
    batch_size: int = 32
    """Records per forward pass (at most)."""
    batch_tokens: int | None = None
    """Padded tokens per forward pass at most (records x the longest, records sorted by length):
    batches of like length as large as a GPU holds, short records many to a batch. None: batches
    of ``batch_size`` records."""
    shard_size: int = 256
    """Records per shard file; a resumed run skips finished shards."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Model weights dtype for scoring: auto is bfloat16 on a CUDA device with bf16 support, else
    float32 (resolved when the settings are built, so the run records the dtype used); the JSD
    itself is always computed in fp32."""
    device: str | None = None
    """Device for both models (default: CUDA when available, else CPU)."""
    jsd_chunk: int = 512
    """Positions whose vocabulary projection and JSD are computed at once (bounds peak memory)."""
    share_prefix: bool = True
    """Compute the token prefix shared by every prompt of a shard once (the template's preamble)."""
    two_pass: bool = False
    """For pairs that do not fit on one device together: run the dense model alone first, caching
    its top-k log-probabilities per shard on disk, then the pruned model alone. The JSD is then
    taken over the top-k tokens plus one bucket for the rest (exact when top_k is the vocabulary)."""
    top_k: int = 64
    """Dense log-probabilities kept per position in two-pass mode."""
    signal: Literal["jsd", "loss_gap"] = "jsd"
    """The per-record degradation that CDS and IES use: jsd (the paper), or loss_gap = mean
    response NLL under the pruned model minus under the dense model. Both are computed by every
    scoring run, so switching re-scores nothing."""
    per_cluster: int | None = None
    """Score only a seeded sample of this many records per cluster (all of a smaller cluster) when
    the method needs each cluster's CDS but not every record's score (``--method strat`` with
    ``sample.ies_temperature`` 0): a small share of the full scoring pass, CDS with a 95% interval
    in clusters.json and the report. None: every record. Methods that rank every record refuse it."""

    def __post_init__(self):
        for name in ("batch_size", "shard_size", "jsd_chunk", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ValueError(f"batch_tokens must be positive, got {self.batch_tokens}")
        if self.per_cluster is not None and self.per_cluster < 2:
            raise ValueError(f"per_cluster must be at least 2 (an interval needs two records), got {self.per_cluster}")


@dataclass
class ConceptConfig:
    """The concept consistency filter."""

    enabled: bool = True
    """False skips the filter (an ablation)."""
    max_concepts: int = 4
    """Key phrases per record: the filter's main knob. With every phrase (about 18 per Alpaca
    record) a 20% budget is unreachable; 4 accepted 88% of real Alpaca records."""
    max_phrase_words: int = 3
    """Longest key phrase, in words."""

    def __post_init__(self):
        if self.max_concepts < 1 or self.max_phrase_words < 1:
            raise ValueError("max_concepts and max_phrase_words must be positive")


@dataclass
class AdaptiveConfig:
    """How ``--method adaptive`` spends its budget in rounds."""

    rounds: int = 4
    """Rounds of recovery; the budget is split into this many equal parts."""
    probe_per_cluster: int = 8
    """Records per cluster (seeded, never trained on) on which each cluster's remaining gap is measured."""
    step: float = 1.0
    """How far one round's gaps move the next round's shares (0: the shares stay the first ones)."""
    floor: float = 0.25
    """No cluster's share falls below this fraction of its size share."""

    def __post_init__(self):
        if self.rounds < 1 or self.probe_per_cluster < 1:
            raise ValueError("rounds and probe_per_cluster must be positive")
        if self.step < 0 or not 0 <= self.floor <= 1:
            raise ValueError("step must be >= 0 and floor in [0, 1]")


@dataclass
class SelectConfig:
    """What to select from, with which models, and how much."""

    data: str | None = None
    """Instruction pool (JSON, JSONL, CSV, Parquet, datasets folder, or a Hugging Face dataset id
    read offline from the datasets cache); None: the generated suite."""
    split: str = "train"
    """The split of a Hugging Face dataset id."""
    layout: str | None = None
    """alpaca, lamini, dolly, messages (chat turns) or sharegpt (conversations); detected from the
    first record when omitted."""
    field_map: dict | None = None
    """Explicit field names: {instruction, input, response, id}, or {messages} for a field holding
    conversation turns (``--fields``)."""
    strict: bool = False
    """Refuse records with an empty instruction or response instead of setting them aside."""
    suite_size: int = 1000
    """Records of the generated capability suite (when data is None)."""
    dense: str = "smollm2-135m-instruct"
    """The unpruned model."""
    pruned: str | None = None
    """The pruned twin; None makes one with paser prune at prune_ratio (made once, cached)."""
    prune_ratio: float = 0.25
    """Ratio for the twin made when pruned is None."""
    budget: float | str = 0.2
    """What to select: records as a count (100) or a fraction of the pool (0.2), or tokens as an
    amount ("40000tok") or a fraction of the pool's tokens ("0.2tok"); see paser.selection.budget."""
    method: str = "paser"
    """A registered selection method (paser.selection.methods): paser; strat, tempered stratified
    selection (cluster shares by size and tempered CDS, records drawn by tempered IES,
    near-duplicates skipped: the ``sample`` section); adaptive, the budget spent in rounds of
    recovery whose cluster shares follow the gaps that remain (the ``adaptive`` section: selection
    plans the rounds and draws the first, ``paser recover`` on its selected.jsonl trains them and
    draws the rest); the baselines random (seeded), full (every record), longest (longest
    responses first), shortest (fewest tokens first), pruned_loss (highest response NLL under the
    pruned model first); or an ablation of PASER: uniform allocation, random_order inside
    clusters instead of IES, no_cost (IES without its compute-cost denominator), no_ccg (no
    concept filter), kmeans clusters instead of NMF. An ablation sets its stage's option
    (allocate.method, concepts.enabled, cluster.method) whatever the config says."""
    out: str = "runs/select"
    """The run folder."""
    trust_pickle: bool = False
    """Unpickle whole a pickle the restricted reader refuses (it can run code); LLM-Pruner
    checkpoints need no flag."""
    seed: int = 0
    """Seed for every random choice: the same inputs and seed give the same selection."""
    progress: bool = True
    """Progress bars on long stages."""
    pictures: bool = True
    """Draw the report's pictures (cluster map with its t-SNE, allocation, rejections); False writes
    the report without them."""

    def __post_init__(self):
        parse_budget(self.budget)  # a malformed budget fails when the settings are read


@dataclass
class DistributeConfig:
    """Where the degradation shards run. Scores do not depend on it: every engine gives the same."""

    engine: Literal["local", "dask", "ray"] = "local"
    """local: shards one after another in this process; dask or ray: spread over that engine."""
    address: str | None = None
    """Dask scheduler (tcp://host:8786) or Ray cluster (ray://host:10001, auto) to use; None starts a
    local cluster of ``workers`` processes for the run. The run folder must be on storage the
    workers can read and write."""
    workers: int | None = None
    """Worker processes of a local cluster. None: one per visible GPU when shards claim GPUs, else
    2. On GPUs never more than the GPUs visible (each worker is pinned to its own)."""
    gpus_per_shard: float | None = None
    """GPUs each shard claims (Dask resource GPU, Ray num_gpus); None: 1 when CUDA is available
    here, else 0."""

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be positive, got {self.workers}")


STAGE_CONFIGS = {"select": SelectConfig, "embed": EmbedConfig, "manifold": ManifoldConfig,
            "cluster": ClusterConfig, "score": ScoreConfig, "allocate": AllocateConfig, "sample": SampleConfig,
            "adaptive": AdaptiveConfig, "concepts": ConceptConfig, "prune": PruneConfig,
            "distribute": DistributeConfig}
