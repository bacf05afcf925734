"""Recovery's settings, by concern: the LoRA adapters (``LoraSettings``), how the optimizer steps are
made (``StepSettings``), the records trained and held out (``DataSettings``), and what each
response token is trained towards (``LossSettings``: SFT, distillation and its teacher, token
weighting). ``RecoverConfig`` holds the four (``config.lora.r``, ``config.steps.epochs``,
``config.data.val_size``, ``config.loss.objective``) and where the run happens; its YAML section
and the command line keep the keys flat (``recover.epochs``, ``--epochs``). Defaults: LLM-Pruner's
recipe.

    python -c "from paser.recovery.config import RecoverConfig; print(RecoverConfig())"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from paser.data.prompts import PromptFormat

OBJECTIVES = ("sft", "distill", "mix")
DIVERGENCES = ("kl", "jsd")
SIGNALS = ("excess", "jsd")
RESPONSES = ("data", "dense")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _positive(settings, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be positive, got {value}")


@dataclass
class LoraSettings:
    """The adapters: where they sit and their size."""

    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA alpha (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Linear layers that get an adapter."""

    def __post_init__(self):
        _positive(self, "r", "alpha")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class StepSettings:
    """How the optimizer steps are made: their size in records or tokens, how many, the forward passes
    they are cut into, the learning-rate schedule, when to validate, checkpoint and stop."""

    learning_rate: float = 1e-4
    """Peak AdamW learning rate."""
    epochs: float = 2.0
    """Passes over the training records (a fraction stops part-way through the last one)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    batch_size: int = 64
    """Effective batch: records per optimizer step."""
    micro_batch_size: int = 4
    """Records per forward pass; batch_size / micro_batch_size steps of gradient accumulation."""
    micro_batch_tokens: int | None = None
    """Cap on a forward pass's padded tokens (records x the longest of them): a step's records are
    sorted by length and cut into micro-batches of at most ``micro_batch_size`` records within this
    cap, so that short records are not padded to long ones (speed: docs/benchmarks.md). None:
    ``micro_batch_size`` records a pass, still grouped by length. Changes no step's gradient, only
    the float order (and dropout's masks)."""
    batch_tokens: int | None = None
    """Form each optimizer step from about this many tokens (prompt + response, as a token budget
    counts them) instead of ``batch_size`` records: each epoch has round(its tokens / batch_tokens)
    steps (fewer if a record were longer than a step), and its records, in the epoch's order, are
    cut into that many consecutive groups of equal tokens up to one record. Records are grouped,
    not packed: no record attends to another, prompts stay masked. Two subsets with the same
    tokens then get the same number of steps of the same size."""
    warmup_ratio: float = 0.05
    """Share of the steps with a linearly rising learning rate (then linear decay to 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm before each optimizer step (0: no clipping)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them, to hold less activation
    memory at the cost of another forward pass per layer (for long cutoffs and large models); the
    adapter is the same (tested)."""
    seed: int = 0
    """Seeds the adapter initialisation, LoRA dropout and the record order: another seed, same data,
    measures training noise."""
    eval_every: int = 20
    """Optimizer steps between validation losses (and at the end)."""
    save_every: int = 20
    """Optimizer steps between checkpoints."""
    patience: int | None = None
    """Stop once the validation loss has not improved for this many evaluations in a row, and keep
    the adapter of the best one (train until the validation loss stops improving); needs a
    validation set. None: train every step."""

    def __post_init__(self):
        _positive(self, "batch_size", "micro_batch_size", "eval_every", "save_every", "max_steps", "patience",
                  "micro_batch_tokens", "batch_tokens")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.epochs <= 0 or self.learning_rate <= 0:
            raise ValueError("epochs and learning_rate must be positive")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")


@dataclass
class DataSettings:
    """The records: how many are held out for validation, and whose responses are trained on."""

    val_size: float = 0.05
    """Held-out validation records: a fraction of the training file (< 1) or a count; 0: none."""
    val_seed: int = 0
    """Seeds the validation split (apart from ``seed``, so that changing ``seed`` keeps the
    training records)."""
    responses: Literal["data", "dense"] = "data"
    """What the pruned model is trained to answer: data, the file's responses; dense, the dense
    model's own greedy answers to the same prompts (self-data distillation: the dense model,
    ``teacher``, regenerates the responses before training, batched and cached by content in
    OUT/dense_answers/; a record it answers with nothing keeps the file's response, counted)."""
    answer_tokens: int = 256
    """Most tokens the dense model generates per answer with responses dense (the cutoff still
    bounds prompt + answer in training)."""

    def __post_init__(self):
        if self.val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {self.val_size}")
        if self.responses not in RESPONSES:
            raise ValueError(f"responses must be one of {RESPONSES}, got {self.responses!r}")
        _positive(self, "answer_tokens")


@dataclass
class LossSettings:
    """What each response position is trained towards: the reference token (SFT, optionally weighted
    per token by what pruning broke) or the teacher's distribution (distillation), or a mix."""

    objective: Literal["sft", "distill", "mix"] = "sft"
    """What the pruned model learns at each response position: sft, the reference response's next
    token (cross-entropy); distill, the teacher's (dense model's) next-token distribution
    (``divergence``); mix, mix_weight * sft + (1 - mix_weight) * distill. See paser.recovery.distill."""
    teacher: str | None = None
    """The teacher of distill and mix: any model reference paser loads. Default: the dense model of
    the selection run whose selected.jsonl is the training data."""
    divergence: Literal["kl", "jsd"] = "kl"
    """Distillation divergence: kl, forward KL(teacher || student); jsd, as scoring measures it."""
    temperature: float = 1.0
    """Softens both distributions before the divergence (the loss is scaled by its square)."""
    mix_weight: float = 0.5
    """The SFT share of the mix objective."""
    token_weighting: float = 0.0
    """lambda of token-weighted SFT (paser.recovery.token_weights): each response token's loss is weighted
    (1 - lambda) + lambda x its signal / the mean signal of the optimizer step, so the weights
    average one over every step; 0 is plain SFT (every token alike), 1 weights by the signal alone.
    The signal comes from one pass of the dense model (``teacher``, else the selection run's) and the
    pruned model over the training records before training, cached in OUT/token_signal/."""
    token_signal: Literal["excess", "jsd"] = "excess"
    """What token weighting measures at each response token: excess, the pruned model's NLL minus the
    dense model's, floored at 0 (Rho-1's excess loss); jsd, the two models' JSD (as selection scores)."""
    teacher_top_k: int | None = None
    """None: the teacher stays in memory beside the student (exact). k: the teacher runs alone
    first and its top-k log-probabilities per response token are cached on disk (teacher_topk/),
    for pairs that do not fit together; the divergence then merges every other token into one
    bucket (exact when k is the vocabulary, a lower bound otherwise)."""

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 <= self.mix_weight <= 1:
            raise ValueError(f"mix_weight must be in [0, 1], got {self.mix_weight}")
        if not 0 <= self.token_weighting <= 1:
            raise ValueError(f"token_weighting must be in [0, 1], got {self.token_weighting}")
        if self.token_signal not in SIGNALS:
            raise ValueError(f"token_signal must be one of {SIGNALS}, got {self.token_signal!r}")
        if self.token_weighting > 0 and self.objective != "sft":
            raise ValueError("token_weighting weights the SFT loss per token; objective distill and mix learn the "
                             "teacher's distribution at every token instead")
        _positive(self, "teacher_top_k")


@dataclass
class RecoverConfig:
    """LoRA recovery settings (defaults: LLM-Pruner's recipe): the four concerns, and where and how the
    run happens."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    """The adapters."""
    steps: StepSettings = field(default_factory=StepSettings)
    """The optimizer steps."""
    data: DataSettings = field(default_factory=DataSettings)
    """The records trained and held out."""
    loss: LossSettings = field(default_factory=LossSettings)
    """What each response token is trained towards."""
    FLAT: ClassVar[tuple[str, ...]] = ("lora", "steps", "data", "loss")
    """The concerns whose keys the YAML section and the command line write flat (paser.config.concerns)."""
    prompt: PromptFormat = field(default_factory=PromptFormat)
    """The prompt format (the ``prompt`` section, shared with scoring and evaluation)."""
    MOVED: ClassVar[dict] = {"template": "prompt.template", "cutoff": "prompt.cutoff"}
    """Keys of this section that moved to the ``prompt`` section (a clear error, not "unknown key")."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Base model (and teacher) weights: auto is bfloat16 on a CUDA device with bf16 support, else
    float32; adapters train in fp32. fp16 is not offered: it gives NaN losses on Llama-2 for
    LLM-Pruner users. recovery.json records the dtype used."""
    device: str | None = None
    """Default: CUDA when available, else CPU."""
    merge: bool = False
    """Also save the model with the adapter merged in (merged/)."""
    progress: bool = True
    """Progress bar with the loss."""
    pictures: bool = True
    """Draw training_curve.png (training and validation loss by step)."""

