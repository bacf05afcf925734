"""``paser compare``'s settings: the ``compare`` section of a YAML file. The recipe every arm shares
is the file's ``recover`` section, the evaluation its ``evaluate`` section, the selection's stage
settings its ``select`` sections (``embed``, ``cluster``, ``score``, ``sample`` ...), and where the
arms run its ``distribute`` section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from paser.selection.budget import parse_budget


@dataclass
class CompareConfig:
    """What to compare, on which models and data, and how to judge."""

    pool: str | None = None
    """Instruction pool the arms select from (any file ``paser select`` reads); None: the generated
    capability suite (suite_records records of suite_seed, written into the folder once)."""
    suite_records: int = 1000
    """Records of the generated suite when pool is None."""
    suite_seed: int = 0
    """Seed of that suite (the evaluation's own suite, seed 12345, leaves out its prompts)."""
    pool_records: int | None = None
    """With heldout_records: the pool is the first N positions of a seeded permutation of the file,
    the held-out records the next ones; None: every record not held out."""
    heldout_records: int = 0
    """Records of the pool file held out for the response NLL (a seeded permutation: pool_records
    positions, then these); 0: none (use ``heldout`` or the evaluate section's own)."""
    split_seed: int = 0
    """Seed of that permutation (numpy default_rng)."""
    heldout: str | None = None
    """An instruction file for the held-out response NLL instead of a split of the pool."""
    dense: str = "smollm2-135m-instruct"
    """The model before pruning (the ``dense`` arm; the teacher of distillation variants)."""
    pruned: str | None = None
    """The pruned model every arm recovers; None: paser's own prune of ``dense`` at prune_ratio."""
    prune_ratio: float = 0.25
    """Ratio of the twin made when pruned is None."""
    budgets: dict = field(default_factory=lambda: {"tok": "0.2tok"})
    """Named budgets, as ``paser select --budget`` reads them: records (200, 0.2) or tokens
    ("40000tok", "0.2tok"). An arm names its budget: ``tok:paser``."""
    token_batches: bool = True
    """Arms at a token budget train token batches of ``recover.batch_size`` x the pool's mean record
    tokens (the same steps for the same tokens); record budgets train batches of records."""
    arms: list = field(default_factory=lambda: ["tok:random-0", "tok:random-1", "tok:random-2", "tok:paser"])
    """The arms, in the order they run (paser.comparison.arms: ``BUDGET:METHOD[-SEED][@OBJECTIVE][#SEED]``,
    ``BUDGET:random-K=METHOD``); ``none`` and ``dense`` are always added."""
    metric: Literal["zeroshot", "heldout_nll", "suite_nll"] = "zeroshot"
    """The primary metric the verdicts read: zeroshot, the mean accuracy over the evaluate section's
    lm-eval tasks (the seven-task mean with ``lm_eval_tasks: [paper]``; higher is better);
    heldout_nll, the held-out response NLL; suite_nll, the suite's macro answer NLL (lower is better)."""
    bootstrap: int = 2000
    """Draws of the paired bootstrap over items."""
    bootstrap_seed: int = 0
    recovery_seeds: int = 3
    """Recovery seeds a candidate needs (``ARM#1``, ``ARM#2`` ...) before its verdict is final."""
    out: str = "runs/compare"
    """The comparison folder: arms/<arm>.json (one per finished arm), report.md, compare.png, and the
    subsets, adapters and evaluations the arms made."""
    trust_pickle: bool = False
    """Load LLM-Pruner pickles (runs their code)."""

    def __post_init__(self):
        if not isinstance(self.budgets, dict) or not self.budgets:
            raise ValueError(f"budgets must map names to budgets, got {self.budgets!r}")
        for name, budget in self.budgets.items():
            if not isinstance(name, str) or ":" in name:
                raise ValueError(f"budget name {name!r} must be text without ':'")
            parse_budget(budget)
        if not isinstance(self.arms, list) or not self.arms:
            raise ValueError(f"arms must be a list of arm names, got {self.arms!r}")
        if self.heldout_records < 0 or (self.pool_records is not None and self.pool_records < 1):
            raise ValueError("heldout_records must be >= 0 and pool_records >= 1")
        if self.suite_records < 1:
            raise ValueError(f"suite_records must be >= 1, got {self.suite_records}")
        if self.pool_records is not None and not self.heldout_records:
            raise ValueError("pool_records splits the pool file: set heldout_records too")
        if self.heldout_records and self.heldout is not None:
            raise ValueError("heldout_records splits the pool; heldout names another file: set one of them")
        if self.bootstrap < 100:
            raise ValueError(f"bootstrap must be >= 100 draws, got {self.bootstrap}")
        if self.recovery_seeds < 1:
            raise ValueError(f"recovery_seeds must be >= 1, got {self.recovery_seeds}")

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "zeroshot"
