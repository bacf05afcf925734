"""Recovery: LoRA fine-tuning of the pruned model on the selected records (peft).

Defaults follow LLM-Pruner's recipe: rank 8, alpha 16, dropout 0.05 on q/k/v/o/gate/up/down,
learning rate 1e-4, 2 epochs, cutoff 256, effective batch 64 in micro-batches of 4, and the same
prompt template as degradation scoring with the prompt tokens masked out of the loss. The loss of
an optimizer step is the mean over every response token of its effective batch (token-weighted, so
gradient accumulation, and data parallelism over processes, give the same step as one large
batch). paser plans the steps; Hugging Face's Trainer runs them (``paser.trainer``): clipping,
bf16 autocast on GPUs, gradient checkpointing, checkpoints, ``torchrun``. A checkpoint is written
every ``save_every`` steps; a killed run started again with the same settings continues from the
last complete one and ends with the same adapter as an uninterrupted one.

Output folder:
  adapter/              the LoRA adapter (peft ``save_pretrained``)
  merged/               with ``merge``: the merged model (paser-pruned folder, or a Hugging Face folder)
  checkpoints/          the Trainer's latest checkpoints (adapter, optimizer, scheduler, RNG, step) with
                        paser's state (settings fingerprint, log, best adapter)
  train_log.jsonl       one line per step: loss, learning rate, and the validation loss when measured
  training_curve.png    training and validation loss
  recovery.json         settings, data, model, steps, losses, wall time

    python -c "import paser.recovery as r; print(r.RecoverConfig())"
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from paser.adaptive import plan_path, read_plan
from paser.degradation import body_and_head
from paser.devices import default_device, resolve_dtype
from paser.distill import DIVERGENCES, OBJECTIVES, TopKCache, cache_fingerprint, divergence, in_memory_targets
from paser.errors import ConfigError, DataError
from paser.ledger import Ledger, flop_params
from paser.progress import announce, bar_enabled
from paser.prompts import tokenize_example
from paser.token_weights import SIGNALS, SignalCache, signal_fingerprint, step_weights
from paser.trainer import (
    RecoveryTrainer,
    StepData,
    StepLog,
    last_checkpoint,
    micro_batches,
    write_log,
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100


@dataclass
class RecoverConfig:
    """LoRA recovery settings (defaults: LLM-Pruner's recipe)."""

    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA alpha (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Linear layers that get an adapter."""
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
    cap, so that short records are not padded to long ones (on CPUs about 1.7x faster at 768 than
    one micro-batch per step; docs/benchmarks.md). None: ``micro_batch_size`` records a pass, still
    grouped by length. Changes no step's gradient, only the float order (and dropout's masks)."""
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
    cutoff: int = 256
    """Tokens of prompt + response kept (as in scoring)."""
    template: Literal["alpaca", "chat"] = "alpaca"
    """Prompt template (as in scoring)."""
    val_size: float = 0.05
    """Held-out validation records: a fraction of the training file (< 1) or a count; 0: none."""
    eval_every: int = 20
    """Optimizer steps between validation losses (and at the end)."""
    patience: int | None = None
    """Stop once the validation loss has not improved for this many evaluations in a row, and keep
    the adapter of the best one (train until the validation loss stops improving); needs a
    validation set. None: train every step."""
    save_every: int = 20
    """Optimizer steps between checkpoints."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm before each optimizer step (0: no clipping)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them, to hold less activation
    memory at the cost of another forward pass per layer (for long cutoffs and large models); the
    adapter is the same (tested)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Base model (and teacher) weights: auto is bfloat16 on a CUDA device with bf16 support, else
    float32; adapters train in fp32. fp16 is not offered: it gives NaN losses on Llama-2 for
    LLM-Pruner users. recovery.json records the dtype used."""
    device: str | None = None
    """Default: CUDA when available, else CPU."""
    seed: int = 0
    """Seeds the adapter initialisation, LoRA dropout and the record order: another seed, same data,
    measures training noise."""
    val_seed: int = 0
    """Seeds the validation split (apart from ``seed``, so that changing ``seed`` keeps the
    training records)."""
    merge: bool = False
    """Also save the model with the adapter merged in (merged/)."""
    objective: Literal["sft", "distill", "mix"] = "sft"
    """What the pruned model learns at each response position: sft, the reference response's next
    token (cross-entropy); distill, the teacher's (dense model's) next-token distribution
    (``divergence``); mix, mix_weight * sft + (1 - mix_weight) * distill. See paser.distill."""
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
    """lambda of token-weighted SFT (paser.token_weights): each response token's loss is weighted
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
    progress: bool = True
    """Progress bar with the loss."""

    def __post_init__(self):
        for name in ("r", "alpha", "batch_size", "micro_batch_size", "cutoff", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        if not 0 <= self.dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("dropout and warmup_ratio must be in [0, 1)")
        if self.epochs <= 0 or self.learning_rate <= 0:
            raise ValueError("epochs and learning_rate must be positive")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {self.val_size}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be positive, got {self.patience}")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be positive, got {self.micro_batch_tokens}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ValueError(f"batch_tokens must be positive, got {self.batch_tokens}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 <= self.mix_weight <= 1:
            raise ValueError(f"mix_weight must be in [0, 1], got {self.mix_weight}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if not 0 <= self.token_weighting <= 1:
            raise ValueError(f"token_weighting must be in [0, 1], got {self.token_weighting}")
        if self.token_signal not in SIGNALS:
            raise ValueError(f"token_signal must be one of {SIGNALS}, got {self.token_signal!r}")
        if self.token_weighting > 0 and self.objective != "sft":
            raise ValueError("token_weighting weights the SFT loss per token; objective distill and mix learn the "
                             "teacher's distribution at every token instead")
        if self.teacher_top_k is not None and self.teacher_top_k < 1:
            raise ValueError(f"teacher_top_k must be positive, got {self.teacher_top_k}")


@dataclass
class Example:
    """One tokenised record: ids and labels (-100 on the prompt)."""

    ids: list[int]
    labels: list[int]


def encode_for_training(tokenizer, records, config: RecoverConfig) -> list[Example]:
    """Prompt + response ids with the prompt masked; records with no response token left are refused."""
    out = []
    for r in records:
        ids, n_prompt, n_response, _ = tokenize_example(tokenizer, r, config.template, config.cutoff)
        if n_response == 0:
            raise DataError(f"record {r.id!r}: its prompt fills the {config.cutoff}-token cutoff, so no "
                            "response token is left to train on; raise cutoff or drop the record")
        out.append(Example(ids, [IGNORE] * n_prompt + ids[n_prompt:]))
    return out


def scored_tokens(example: Example) -> int:
    """Tokens of ``example`` the loss is taken on (labelled targets after the one-token shift)."""
    return sum(1 for t in example.labels[1:] if t != IGNORE)


def collate(batch: list[Example], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 on padding and prompts)."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
        mask[i, :len(e.ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _labelled(model, batch: dict[str, torch.Tensor]):
    """(logits at the positions that predict a labelled token [M, V], the NLL of each of those
    tokens [M], per-row NLL sums [B], per-row counts [B]), positions in row-major order. Only the
    labelled positions go through the vocabulary projection and to fp32."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    body, head = body_and_head(model)
    # no KV cache: nothing reads it, and at 7B it costs GBs per batch
    if body is not None:  # the vocabulary projection on the labelled positions only (a quarter of a 135M's work)
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False).last_hidden_state  # [B, T, H]
        kept = head(hidden[:, :-1][keep])  # [M, V]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        kept = logits[:, :-1][keep]
    nll = torch.nn.functional.cross_entropy(kept.float(), targets[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(len(keep), dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return kept, nll, sums, keep.sum(1)


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the batch: the summed next-token cross-entropy over its labelled (response)
    tokens, and their count."""
    _, _, sums, counts = _labelled(model, batch)
    return sums, counts


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled (response) tokens, and their count."""
    sums, counts = token_losses(model, batch)
    return sums.sum(), int(counts.sum())


def objective_loss_sum(model, batch: dict[str, torch.Tensor], config: RecoverConfig,
                       targets=None) -> tuple[torch.Tensor, float, float | None]:
    """(the summed training loss of ``config.objective`` over the labelled tokens, to divide by
    the step's token count; its summed NLL; its summed divergence from the teacher's ``targets``,
    None for sft). With ``batch["weights"]`` (one per labelled token, row-major: token weighting)
    the SFT loss is the weighted sum of the tokens' NLL."""
    if config.objective == "sft":
        if "weights" not in batch:
            loss, _ = token_loss_sum(model, batch)
            return loss, float(loss.detach()), None
        _, nll, _, _ = _labelled(model, batch)
        loss = (nll * batch["weights"].to(nll.device, nll.dtype)).sum()
        return loss, float(nll.detach().sum()), None
    kept, _, sums, _ = _labelled(model, batch)
    nll = sums.sum()
    div = divergence(targets, kept, config.divergence, config.temperature).sum()
    loss = div if config.objective == "distill" else config.mix_weight * nll + (1 - config.mix_weight) * div
    return loss, float(nll.detach()), float(div.detach())


def validation_rows(model, examples: list[Example], pad_id: int, device, batch_size: int):
    """Per example: the summed response-token NLL and the number of those tokens (numpy arrays)."""
    sums, counts = np.zeros(len(examples)), np.zeros(len(examples))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(examples), batch_size):
            row_sums, row_counts = token_losses(model, collate(examples[lo:lo + batch_size], pad_id, device))
            sums[lo:lo + batch_size] = row_sums.double().cpu().numpy()
            counts[lo:lo + batch_size] = row_counts.cpu().numpy()
    model.train(was_training)
    return sums, counts


def validation_sums(model, examples: list[Example], pad_id: int, device, batch_size: int) -> tuple[float, int]:
    """Summed response-token NLL over ``examples`` and the number of those tokens."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(examples), batch_size):
            loss, n = token_loss_sum(model, collate(examples[lo:lo + batch_size], pad_id, device))
            total, count = total + float(loss), count + n
    model.train(was_training)
    return total, count


def split_validation(records: list, config: RecoverConfig) -> tuple[list, list]:
    """(train, validation): a seeded random ``val_size`` of the records held out."""
    n_val = int(round(config.val_size * len(records))) if config.val_size < 1 else int(config.val_size)
    if n_val == 0:
        return list(records), []
    if n_val >= len(records):
        raise ConfigError(f"val_size {config.val_size} leaves no training records out of {len(records)}")
    order = list(range(len(records)))
    random.Random(config.val_seed).shuffle(order)
    held = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The record order of one epoch: a seeded shuffle, the same on a resumed run."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def cut_into(order: list[int], lengths, n_steps: int) -> list[list[int]]:
    """``order`` cut into exactly ``n_steps`` consecutive non-empty steps of about equal tokens (each
    record in the step its middle token falls in; equal record counts when a record is longer than
    a step). ``n_steps`` must not exceed the records."""
    if not 1 <= n_steps <= len(order):
        raise ValueError(f"cannot cut {len(order)} records into {n_steps} steps")
    steps = _by_middle_token(order, lengths, n_steps)
    if all(steps):
        return steps
    bounds = np.linspace(0, len(order), n_steps + 1).round().astype(int)
    return [list(order[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _by_middle_token(order: list[int], lengths, n_steps: int) -> list[list[int]]:
    """``order`` into ``n_steps`` consecutive steps of total / n_steps tokens, each record in the
    step its middle token falls in."""
    width = sum(int(lengths[i]) for i in order) / n_steps
    steps: list[list[int]] = [[] for _ in range(n_steps)]
    start = 0
    for i in order:
        steps[min(n_steps - 1, int((start + int(lengths[i]) / 2) // width))].append(i)
        start += int(lengths[i])
    return steps


def token_steps(order: list[int], lengths, batch_tokens: int) -> list[list[int]]:
    """``order`` cut into consecutive steps of about ``batch_tokens`` tokens each.

    The number of steps is round(total / batch_tokens), lowered until a step (total / steps) holds
    the longest record; each record goes to the step its middle token falls in. So every step is
    non-empty and holds total / steps tokens up to one record, and the step count depends only on
    the total and the longest record, not on which records they are."""
    total = sum(int(lengths[i]) for i in order)
    longest = max((int(lengths[i]) for i in order), default=0)
    n_steps = max(1, math.floor(total / batch_tokens + 0.5))
    while n_steps > 1 and total / n_steps < longest:
        n_steps -= 1
    return _by_middle_token(order, lengths, n_steps)


def step_batches(n: int, config: RecoverConfig, lengths=None) -> list[list[int]]:
    """Record indices of every optimizer step, over all epochs: ``batch_size`` records a step (the
    last of an epoch may be short), or with ``batch_tokens`` steps of equal tokens (``lengths``:
    each record's tokens)."""
    steps = []
    full = math.floor(config.epochs)
    for epoch in range(math.ceil(config.epochs)):
        order = epoch_order(n, epoch, config.seed)
        if epoch >= full:  # a fractional last epoch
            order = order[:max(1, int(round((config.epochs - full) * n)))]
        if config.batch_tokens is not None:
            steps += token_steps(order, lengths, config.batch_tokens)
        else:
            steps += [order[lo:lo + config.batch_size] for lo in range(0, len(order), config.batch_size)]
    return steps[:config.max_steps] if config.max_steps else steps


def lora_model(model, config: RecoverConfig):
    """The model wrapped with fresh LoRA adapters on ``target_modules`` (seeded)."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = sorted(set(config.target_modules) - present)
    if missing:
        raise ConfigError(f"target_modules {missing} are not linear layers of this model; it has {sorted(present)}")
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft reads the deprecated is_gradient_checkpointing: not ours to rename
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


DISTILL_FIELDS = ("objective", "teacher", "divergence", "temperature", "mix_weight", "teacher_top_k")
TOKEN_FIELDS = ("token_weighting", "token_signal")


def _fingerprint(config: RecoverConfig, model_fp: str, train_ids: list[str]) -> str:
    # sft leaves the distillation fields out, so checkpoints made before they existed still resume
    skip = ("progress", "merge", "device", "eval_every", "save_every", "gradient_checkpointing") + (
        DISTILL_FIELDS if config.objective == "sft" else ()) + (TOKEN_FIELDS if config.token_weighting == 0 else ())
    keep = {k: v for k, v in vars(config).items() if k not in skip}
    h = hashlib.sha256(json.dumps([keep, model_fp], sort_keys=True, default=str).encode())
    for rid in train_ids:
        h.update(rid.encode() + b"\x00")
    return h.hexdigest()[:16]


def schedule(optimizer, total: int, warmup: int):
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def sparsity(model) -> float:
    """Share of exact zeros in the decoder's linear weights (Wanda/SparseGPT leave about half)."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / max(total, 1)


def training_curve(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([e["step"] for e in log], [e["loss"] for e in log], label="training loss")
    val = [e for e in log if "val_loss" in e]
    if val:
        ax.plot([e["step"] for e in val], [e["val_loss"] for e in val], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("response-token NLL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class RecoveryResult:
    out: Path
    steps: int
    first_loss: float
    last_loss: float
    val_loss: float | None
    seconds: float
    resumed_from: int
    train_tokens: int = 0  # response tokens the loss is taken on, one epoch
    tokens_per_step: float = 0.0  # prompt + response tokens of the mean optimizer step
    ledger: Ledger | None = None  # what the recovery computed (paser.ledger)


def resolve_teacher(config: RecoverConfig, data: str) -> str:
    """The teacher of distill and mix: ``config.teacher``, else the dense model of the selection
    run that wrote ``data`` (its models.json, else its manifest)."""
    if config.teacher is not None:
        return config.teacher
    from paser.models import DEFAULT_MODEL

    run = Path(data).parent
    if (run / "models.json").is_file():
        return json.loads((run / "models.json").read_text())["dense"]["reference"]
    if (run / "manifest.json").is_file():
        return json.loads((run / "manifest.json").read_text())["settings"]["select"].get("dense") or DEFAULT_MODEL
    why = (f"objective {config.objective!r} learns from a teacher" if config.objective != "sft"
           else "token weighting compares the pruned model with the dense one")
    raise ConfigError(f"{why}: give the dense model (--teacher, recover.teacher), or train on a selection run's "
                      f"selected.jsonl, whose dense model is the default; {data} is not in a run folder")


def rank_zero_first(world: int, device) -> contextlib.AbstractContextManager:
    """Under torchrun (``world`` processes), the first process runs the block before the others,
    which then find its files (a cache built once, not by every process into one folder)."""
    if world <= 1:
        return contextlib.nullcontext()
    from accelerate import PartialState

    # the process group the Trainer joins next (gloo on CPUs, as training_arguments asks for)
    return PartialState(cpu=not str(device).startswith("cuda")).main_process_first()


def _teacher(reference: str, tokenizer, student: str, examples: list[Example], pad_id: int, device,
             config: RecoverConfig, out: Path, trust_pickle: bool, world: int = 1):
    """(the teacher in memory, None, its parameter counts), or with ``teacher_top_k`` (None, its
    finished top-k cache, its counts): the teacher then runs alone, once per training record (in the
    first of ``world`` processes), and is released."""
    from paser.models import check_same_tokenizer, load_model, model_fingerprint

    loaded = load_model(reference, dtype=config.dtype, trust_pickle=trust_pickle, device=device)
    check_same_tokenizer(loaded.tokenizer, tokenizer, str(reference), str(student))
    teacher = loaded.model.requires_grad_(False)
    params = flop_params(teacher)
    if config.teacher_top_k is None:
        return teacher, None, params
    cache = TopKCache(out / "teacher_topk", cache_fingerprint(model_fingerprint(reference), config.teacher_top_k,
                                                              config.temperature, examples))
    from tqdm.auto import tqdm

    with rank_zero_first(world, device):
        if cache.missing(len(examples)):
            announce(f"running the teacher {reference} alone over {len(examples)} records for its "
                     f"top-{config.teacher_top_k} cache in {cache.folder}")
            with tqdm(total=len(examples), desc="teacher top-k", unit="rec",
                      disable=not bar_enabled(config.progress)) as bar:
                cache.build(teacher, examples, collate, pad_id, device, config.teacher_top_k, config.temperature,
                            config.micro_batch_size, bar.update)
    cache.vocab_size = _vocab_size(teacher)
    del teacher, loaded
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    cache.load(len(examples))
    return None, cache, params


def _vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head.weight.shape[0] if head is not None else int(model.config.vocab_size)


def _check_vocab(teacher, student, teacher_ref: str, student_ref: str) -> None:
    """The teacher's and the student's next-token distributions must range over the same ids."""
    size = teacher.vocab_size if isinstance(teacher, TopKCache) else _vocab_size(teacher)
    if size != _vocab_size(student):
        raise ConfigError(f"the teacher {teacher_ref} predicts over {size} token ids and the student {student_ref} "
                          f"over {_vocab_size(student)}; distillation needs the same vocabulary")


def checkpointing_on(model) -> bool:
    """Whether the model under the adapter recomputes activations in the backward pass."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    flag = getattr(type(base), "is_activation_checkpointing", None)
    return bool(base.is_activation_checkpointing if flag is not None else getattr(base, "is_gradient_checkpointing",
                                                                                   False))


def checkpointing_arguments(on: bool) -> dict:
    """The Trainer's activation checkpointing arguments under their current names (transformers 5
    renamed ``gradient_checkpointing`` to ``activation_checkpointing`` and warns on the old ones)."""
    from transformers import TrainingArguments

    name = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
            else "gradient_checkpointing")
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}


def training_arguments(config: RecoverConfig, folder: Path, steps: int, accumulation: int, device: str, world: int):
    """The Trainer's arguments for paser's plan: ``steps`` optimizer steps of ``accumulation``
    micro-batches per process, clipping, bf16 autocast when the weights are bf16 on a GPU, the
    checkpoint cadence; logging and reporting stay paser's."""
    from transformers import TrainingArguments

    on_cpu = not str(device).startswith("cuda")
    args = TrainingArguments(
        output_dir=str(folder), max_steps=steps, gradient_accumulation_steps=accumulation,
        per_device_train_batch_size=1, learning_rate=config.learning_rate, weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, bf16=config.dtype == "bfloat16" and not on_cpu,
        **checkpointing_arguments(config.gradient_checkpointing),
        save_strategy="steps", save_steps=config.save_every, save_total_limit=2, logging_strategy="no",
        report_to="none", disable_tqdm=True, seed=config.seed, use_cpu=on_cpu,
        ddp_backend="gloo" if on_cpu and world > 1 else None, average_tokens_across_devices=True,
        remove_unused_columns=False, dataloader_num_workers=0)
    return one_device(args, world)


def one_device(args, world: int):
    """A single process trains on one GPU: the Trainer would wrap the model in ``nn.DataParallel``
    over every visible GPU (moving a teacher's batches off its device, and splitting micro-batches
    the step plan sized); several GPUs are for ``torchrun`` (one process each)."""
    if world == 1 and args.n_gpu > 1:
        args._n_gpu = 1
    return args


def recover(model: str, data: str, out: str | Path = "runs/recover", config: RecoverConfig | None = None, *,
            val_data: str | None = None, trust_pickle: bool = False, restart: bool = False,
            **overrides) -> RecoveryResult:
    """LoRA-recover ``model`` (any reference paser loads) on the records of ``data`` into ``out``.

    ``overrides`` are ``RecoverConfig`` fields, e.g. ``recover(m, "selected.jsonl", epochs=1)``.
    ``val_data`` is a separate validation file (else ``val_size`` of ``data`` is held out).
    A checkpoint in ``out`` made with the same settings is resumed unless ``restart``.
    """
    from paser.config import config_with
    from paser.data import load_pool

    config = config_with(config or RecoverConfig(), overrides)
    try:
        plan = read_plan(data)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if plan is not None:  # an adaptive selection: the rounds draw their records as they go
        return recover_in_rounds(model, data, Path(out), config, plan, val_data, trust_pickle, restart)
    records = load_pool(data).records
    train, val = split_validation(records, config)
    if val_data is not None:
        val = load_pool(val_data).records
    if not train:
        raise DataError(f"{data}: no training records")
    job = Job.open(model, data, Path(out), config, trust_pickle, restart, [r.id for r in train])
    train_ex, val_ex = job.encode(train), job.encode(val)
    if config.patience is not None and not val_ex:
        raise ConfigError("patience stops on the validation loss: give a validation set (val_size > 0 or val_data)")
    job.check_checkpoint()
    job.prepare_references(train_ex)
    job.wrap_student()
    steps = step_batches(len(train_ex), config, [len(e.ids) for e in train_ex])
    t0 = time.perf_counter()
    if job.finished:  # nothing to train, its adapter is in the checkpoint
        job.load_finished_adapter()
    else:
        job.train(train_ex, val_ex, steps, len(steps))
    seconds = time.perf_counter() - t0
    result = job.finish(train_ex, val_ex, steps, seconds, data_summary={"data": str(data), "train_records": len(train),
                                                                        "val_records": len(val)})
    job.release()
    return result


class Job:
    """One recovery run, in named steps: where it runs, the student and its references (the teacher
    of distillation, the dense model of token weighting), the checkpoint to resume, training on a
    plan of steps, and the outputs. ``recover`` runs them once over a fixed set of records; adaptive
    recovery (``paser.rounds``) trains round after round on records it draws as it goes."""

    def __init__(self, model: str, data: str, out: Path, config: RecoverConfig, trust_pickle: bool):
        self.model, self.data, self.out, self.trust_pickle = model, data, out, trust_pickle
        self.world = int(os.environ.get("WORLD_SIZE", "1"))  # processes started by torchrun or accelerate launch
        self.rank = int(os.environ.get("RANK", "0"))
        device = config.device or default_device()
        if self.world > 1 and str(device).startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # each process its own GPU
        elif str(device).startswith("cuda:") and torch.device(device).index != 0:
            # the Trainer of a single process trains on cuda:0 (of the visible ones) and would move
            # the student there, away from a teacher on the device asked for
            raise ConfigError(f"recover.device {device}: one process trains on the first visible GPU; choose the "
                              f"GPU with CUDA_VISIBLE_DEVICES={torch.device(device).index} and device cuda, or "
                              "train on several with torchrun")
        self.device = device
        # resolved before the fingerprint: a checkpoint records the precision it was trained in
        self.config = dataclasses.replace(config, dtype=resolve_dtype(config.dtype, device))
        uses_dense = config.objective != "sft" or config.token_weighting > 0
        self.reference = resolve_teacher(config, data) if uses_dense else None
        self.teacher = self.cache = self.signal = None
        self.ledger = Ledger()
        self.log: list[dict] = []
        # early stopping: the best validation loss so far, its step and adapter, evaluations since, stopped
        self.best = {"loss": math.inf, "step": 0, "adapter": None, "since": 0, "stopped": False}
        self.state = self.checkpoint = None
        self.resumed_from = 0
        self.teacher_params: dict | None = None
        self.teacher_seconds = 0.0

    @classmethod
    def open(cls, model: str, data: str, out: Path, config: RecoverConfig, trust_pickle: bool, restart: bool,
             identity: list[str]) -> Job:
        """The run, its student loaded (or only the tokenizer when a top-k cache is built first) and its
        fingerprint over the settings, the models and ``identity`` (the training records' ids)."""
        from paser.models import load_model, load_tokenizer, model_fingerprint

        job = cls(model, data, out, config, trust_pickle)
        config = job.config
        # with a top-k cache the teacher runs before the student is loaded, so only the tokenizer first
        lazy = job.reference is not None and config.objective != "sft" and config.teacher_top_k
        job.tokenizer = load_tokenizer(model, trust_pickle, job.reference) if lazy else None
        job.loaded = None if job.tokenizer is not None else load_model(
            model, dtype=config.dtype, trust_pickle=trust_pickle, device=job.device, tokenizer_from=job.reference)
        job.tokenizer = job.tokenizer or job.loaded.tokenizer
        tok = job.tokenizer
        job.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        model_fp = model_fingerprint(model) + (f"+teacher:{model_fingerprint(job.reference)}" if job.reference else "")
        job.fingerprint = _fingerprint(config, model_fp, identity)
        out.mkdir(parents=True, exist_ok=True)
        if restart:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        return job

    def encode(self, records) -> list[Example]:
        return encode_for_training(self.tokenizer, records, self.config)

    def check_checkpoint(self) -> None:
        """The last complete checkpoint of these settings (refused when made with others)."""
        self.checkpoint, self.state = last_checkpoint(self.out / "checkpoints", self.fingerprint)
        if self.state:
            self.log = list(self.state["log"])
            self.best |= self.state["best"]
        self.resumed_from = len(self.log)

    @property
    def finished(self) -> bool:
        """A finished run needs neither its references nor a Trainer: its adapter is in the checkpoint."""
        return self.state is not None and self.state["finished"]

    def prepare_references(self, train_ex: list[Example]) -> None:
        """The dense model's part before training: distillation's teacher (in memory, or its top-k
        cache), token weighting's signal over ``train_ex`` (then the dense model is released)."""
        from paser.models import load_model, model_fingerprint

        config, ref = self.config, self.reference
        distilling = config.objective != "sft"
        if ref is not None and not self.finished and distilling:
            start = time.perf_counter()
            self.teacher, self.cache, self.teacher_params = _teacher(
                ref, self.tokenizer, self.model, train_ex, self.pad_id, self.device, config, self.out,
                self.trust_pickle, self.world)
            self.teacher_seconds = time.perf_counter() - start
            if self.cache is not None:  # the teacher ran once over every training record
                self.ledger.forward("teacher top-k cache", ref, self.teacher_params, sum(len(e.ids) for e in train_ex),
                                    sum(scored_tokens(e) for e in train_ex), self.teacher_seconds)
        if self.loaded is None:
            self.loaded = load_model(self.model, dtype=config.dtype, trust_pickle=self.trust_pickle,
                                     device=self.device, tokenizer_from=ref)
        if ref is not None and not self.finished and distilling:
            _check_vocab(self.teacher if self.teacher is not None else self.cache, self.loaded.model, ref, self.model)
        self.student_params = flop_params(self.loaded.model)
        if ref is not None and not self.finished and config.token_weighting > 0:
            start = time.perf_counter()
            dense = load_model(ref, dtype=config.dtype, trust_pickle=self.trust_pickle, device=self.device)
            from paser.models import check_same_tokenizer

            check_same_tokenizer(dense.tokenizer, self.tokenizer, str(ref), str(self.model))
            cache = SignalCache(self.out / "token_signal", signal_fingerprint(
                model_fingerprint(ref), model_fingerprint(self.model), config.token_signal, train_ex))
            announce(f"token weighting: {config.token_signal} of {ref} against {self.model} over {len(train_ex)} "
                     f"records ({cache.folder})")
            with rank_zero_first(self.world, self.device):  # one process computes the signal, the others read it
                self.signal = cache.build(dense.model.requires_grad_(False), self.loaded.model, train_ex, collate,
                                          self.pad_id, self.device, config.token_signal, config.micro_batch_size,
                                          _labelled)
            tokens, positions = sum(len(e.ids) for e in train_ex), sum(scored_tokens(e) for e in train_ex)
            seconds = time.perf_counter() - start
            self.ledger.forward("token signal", ref, flop_params(dense.model), tokens, positions, seconds)
            self.ledger.forward("token signal", self.model, self.student_params, tokens, positions)
            del dense
            if str(self.device).startswith("cuda"):
                torch.cuda.empty_cache()

    def wrap_student(self) -> None:
        self.zeros = sparsity(self.loaded.model)
        self.peft_model = lora_model(self.loaded.model, self.config)
        self.student_params = flop_params(self.peft_model)

    def release(self) -> None:
        """Drop the student, its optimizer's Trainer and the teacher now, not at the next garbage
        collection (the Trainer and its step callback hold each other): ``paser run`` evaluates in the
        same process next, and on a GPU their memory must be free for it."""
        import gc

        self.teacher = self.cache = self.peft_model = self.loaded = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def load_checkpoint_adapter(self) -> None:
        """The adapter of the last complete checkpoint (a run resumed between two of its parts)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.peft_model, load_file(self.checkpoint / "adapter_model.safetensors"))

    def load_finished_adapter(self) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        announce(f"LoRA recovery of {self.model}: finished in {self.out / 'checkpoints'} ({len(self.log)} steps), "
                 "nothing to train")
        set_peft_model_state_dict(self.peft_model, load_file(self.checkpoint / "adapter_model.safetensors"))

    def train(self, train_ex: list[Example], val_ex: list[Example], steps: list[list[int]], total: int,
              stop_at: int | None = None) -> None:
        """Train the planned ``steps`` (indices into ``train_ex``) from the last checkpoint on, out of
        ``total`` steps (the learning-rate schedule's length); ``stop_at``: end (with a checkpoint)
        after that global step instead of at the end of ``steps``."""
        from tqdm.auto import tqdm
        from transformers import PrinterCallback

        config, world, rank = self.config, self.world, self.rank
        batches, accumulation = micro_batches(steps, config.micro_batch_size, world, [len(e.ids) for e in train_ex],
                                              config.micro_batch_tokens)
        weights = (step_weights(self.signal, batches, accumulation * world, config.token_weighting)
                   if self.signal is not None else None)
        teacher, cache = self.teacher, self.cache

        def targets(batch, index):  # the teacher's next-token distributions of the batch (None for SFT)
            if cache is not None:
                return cache.targets(index, batch["input_ids"].device)
            return None if teacher is None else in_memory_targets(teacher, batch, config.temperature)

        def validate(net):  # with several processes each takes every world-th record; the sums are added
            if not val_ex:
                return None
            total_nll, count = validation_sums(net, val_ex[rank::world], self.pad_id, net.device,
                                               config.micro_batch_size)
            if world > 1:
                both = trainer.accelerator.reduce(torch.tensor([total_nll, count], dtype=torch.float64,
                                                               device=net.device), reduction="sum")
                total_nll, count = float(both[0]), float(both[1])
            return total_nll / max(count, 1)

        start_step = len(self.log)
        step_data = StepData(batches, train_ex, lambda chosen: collate(chosen, self.pad_id, "cpu"),
                             Example([self.pad_id], [IGNORE]), weights)
        trainer = RecoveryTrainer(model=self.peft_model, args=training_arguments(
            config, self.out / "checkpoints", total, accumulation, self.device, world), config=config,
                                  data=step_data, loss_fn=objective_loss_sum, targets_fn=targets,
                                  schedule_fn=schedule)
        bar = tqdm(total=stop_at or total, initial=start_step, desc="LoRA recovery", unit="step",
                   disable=not (bar_enabled(config.progress) and rank == 0))
        plan_tokens = [sum(scored_tokens(train_ex[i]) for i in step) for step in steps]
        trainer.add_callback(StepLog(trainer, plan_tokens, validate, self.fingerprint, self.log, self.best, bar,
                                     stop_at))
        trainer.remove_callback(PrinterCallback)  # paser logs the steps itself
        announce(f"LoRA recovery of {self.model}: {len(steps)} steps ({config.objective}"
                 + (f", token-weighted by {config.token_signal}" if self.signal is not None else "")
                 + (f", resuming at step {start_step})" if start_step else ")")
                 + (f" on {world} processes" if world > 1 else ""))
        trainer.train(resume_from_checkpoint=str(self.checkpoint) if self.checkpoint else None)
        bar.close()
        self.checkpoint, _ = last_checkpoint(self.out / "checkpoints", self.fingerprint)

    def training_ledger(self, train_ex: list[Example], val_ex: list[Example], steps: list[list[int]],
                        seconds: float) -> Ledger:
        """The ledger of the steps trained (those of the log), their validation passes and the
        teacher's passes, on top of what ``prepare_references`` recorded."""
        done = steps[:len(self.log)]
        tokens = sum(len(train_ex[i].ids) for step in done for i in step)
        positions = sum(scored_tokens(train_ex[i]) for step in done for i in step)
        earlier = {}
        if self.finished and (self.out / "recovery.json").is_file():  # trained by an earlier invocation
            earlier = json.loads((self.out / "recovery.json").read_text())
            if earlier.get("compute"):
                entries = Ledger.from_dict(earlier["compute"]).entries
                return Ledger([dataclasses.replace(e, reused=True) for e in entries])
        ledger = Ledger(list(self.ledger.entries))
        ledger.training("recovery", self.model, self.student_params, tokens, positions,
                        checkpointing_on(self.peft_model), earlier.get("seconds", seconds))
        ledger.entries[-1].reused = self.finished  # counted from the plan of a run trained before the ledger
        if self.teacher is not None:  # the teacher in memory ran beside the student on every step
            ledger.forward("teacher", str(self.reference), self.teacher_params, tokens, positions)
        checks = sum(1 for e in self.log if "val_loss" in e)
        if checks and val_ex:
            ledger.forward("validation", self.model, self.student_params, checks * sum(len(e.ids) for e in val_ex),
                           checks * sum(scored_tokens(e) for e in val_ex))
        return ledger

    def finish(self, train_ex: list[Example], val_ex: list[Example], steps: list[list[int]], seconds: float,
               data_summary: dict, extra: dict | None = None) -> RecoveryResult:
        """Keep the best adapter (early stopping), write the outputs and recovery.json (rank 0)."""
        from peft import set_peft_model_state_dict

        log, best, config = self.log, self.best, self.config
        if best["adapter"] is not None:  # early stopping keeps the adapter of the best validation loss
            set_peft_model_state_dict(self.peft_model, best["adapter"])
        start_step = self.resumed_from
        if self.rank != 0:
            return RecoveryResult(self.out, len(log), log[0]["loss"] if log else math.nan,
                                  log[-1]["loss"] if log else math.nan, None, seconds, start_step)
        out = self.out
        self.peft_model.save_pretrained(out / "adapter")
        self.tokenizer.save_pretrained(out / "adapter")
        write_log(log, out / "train_log.jsonl")
        training_curve(log, out / "training_curve.png")
        if config.merge:
            save_merged(self.peft_model, self.tokenizer, self.loaded.kind, out / "merged", self.zeros)
        val_losses = [e["val_loss"] for e in log if "val_loss" in e]
        done = steps[:len(log)]  # fewer than planned when early stopping ended the run
        step_tokens = [sum(len(train_ex[i].ids) for i in step) for step in done]
        mean_step = sum(step_tokens) / max(1, len(done))
        kept_val = best["loss"] if best["adapter"] is not None else (val_losses[-1] if val_losses else None)
        ledger = self.training_ledger(train_ex, val_ex, steps, seconds)
        result = RecoveryResult(out, len(done), log[0]["loss"] if log else math.nan,
                                log[-1]["loss"] if log else math.nan, kept_val, seconds, start_step,
                                sum(scored_tokens(e) for e in train_ex), mean_step, ledger)
        distilling = config.objective != "sft"
        (out / "recovery.json").write_text(json.dumps({
            "model": str(self.model), "model_kind": self.loaded.kind, **data_summary,
            "train_tokens": result.train_tokens,
            "batch_unit": "tokens" if config.batch_tokens else "records",
            "tokens_per_step": {"mean": round(mean_step, 1), "min": min(step_tokens, default=0),
                                "max": max(step_tokens, default=0)},
            "records_per_step": round(sum(len(b) for b in done) / max(1, len(done)), 2),
            "settings": {k: v for k, v in vars(config).items()},
            "objective": config.objective if not distilling else {
                "objective": config.objective, "teacher": str(self.reference), "divergence": config.divergence,
                "temperature": config.temperature,
                "mix_weight": config.mix_weight if config.objective == "mix" else None,
                "teacher_targets": ("in memory (exact)" if config.teacher_top_k is None
                                    else f"top-{config.teacher_top_k} cache on disk"),
                "teacher_seconds": round(self.teacher_seconds, 2)},
            "token_weighting": None if config.token_weighting == 0 else {
                "strength": config.token_weighting, "signal": config.token_signal, "reference": str(self.reference)},
            "steps": len(done), "planned_steps": len(steps), "stopped_early": bool(best["stopped"]),
            "best_step": best["step"] if best["adapter"] is not None else None,
            "resumed_from_step": start_step, "processes": self.world,
            "accumulation": micro_batches(steps, config.micro_batch_size, self.world, [len(e.ids) for e in train_ex],
                                          config.micro_batch_tokens)[1],
            "activation_checkpointing": checkpointing_on(self.peft_model),
            "first_loss": result.first_loss,
            "last_loss": result.last_loss, "val_loss": result.val_loss, "seconds": round(seconds, 2),
            "compute": ledger.to_dict(), "fingerprint": self.fingerprint} | (extra or {}), indent=2, default=str))
        return result


# ---------------------------------------------------------------- adaptive rounds (paser.adaptive)


def recover_in_rounds(model: str, data: str, out: Path, config: RecoverConfig, plan: dict,
                      val_data: str | None = None, trust_pickle: bool = False, restart: bool = False) -> RecoveryResult:
    """Recovery of an adaptive selection (its ``plan``, rounds.json): round after round, draw the
    round's records with the current cluster shares, train them for the recipe's epochs (one
    optimizer and learning-rate schedule over every round), measure each cluster's remaining gap on
    the probe and move the shares (paser.adaptive). Each round's draw and gaps are kept in
    OUT/rounds.json, so a killed run resumes in the round it was in and draws what it drew."""
    from paser.adaptive import draw_round, remaining_gap, round_seed, round_steps, update_shares
    from paser.data import load_pool
    from paser.models import load_model
    from paser.runfolder import selection_table
    from paser.settings import Settings

    _check_rounds(config, plan)
    run = Path(plan["run"])
    settings = Settings.from_dict(json.loads((run / "settings.json").read_text()))
    pool, table = selection_table(settings, run)
    by_id = {r.id: r for r in pool}
    val = load_pool(val_data).records if val_data is not None else []
    identity = [hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest(), "adaptive rounds"]
    job = Job.open(model, data, out, config, trust_pickle, restart, identity)
    config, val_ex = job.config, job.encode(val)
    reference = resolve_teacher(config, str(run / "selected.jsonl"))
    history_path = out / "rounds.json"
    if restart:
        history_path.unlink(missing_ok=True)
    history = json.loads(history_path.read_text()) if history_path.is_file() else {}
    if history.get("fingerprint") != job.fingerprint:
        history = {"fingerprint": job.fingerprint, "rounds": []}
    job.check_checkpoint()
    job.prepare_references([])
    job.wrap_student()
    probe_ex = job.encode([by_id[i] for i in plan["probe"]])
    probe_labels = table.set_index("id").loc[plan["probe"], "cluster"].to_numpy()
    k = plan["clusters"]
    probe_tokens, probe_positions = sum(len(e.ids) for e in probe_ex), sum(scored_tokens(e) for e in probe_ex)

    def measure(net) -> list[float]:  # each cluster's mean response NLL on its probe records
        sums, counts = validation_rows(net, probe_ex, job.pad_id, job.device, config.micro_batch_size)
        total = np.bincount(probe_labels, weights=sums, minlength=k)
        tokens = np.bincount(probe_labels, weights=counts, minlength=k)
        return np.where(tokens > 0, total / np.maximum(tokens, 1), np.nan).tolist()

    def count(name: str, params: dict, reused: bool) -> None:  # a probe pass in the ledger
        job.ledger.forward("probe", name, params, probe_tokens, probe_positions, reused=reused)

    reused = "dense" in history
    if not reused:  # the probe under the dense model (loaded once) and the pruned one
        dense = load_model(reference, dtype=config.dtype, trust_pickle=trust_pickle, device=job.device)
        history["dense"], history["dense_params"] = measure(dense.model), flop_params(dense.model)
        del dense
        history["pruned"] = measure(job.peft_model)  # the adapters start at zero: the pruned model
        _write_json(history_path, history)
    count(str(reference), history["dense_params"], reused)
    count(str(model), job.student_params, reused)
    epochs = int(config.epochs)
    per_epoch = (math.floor(plan["budget"] / config.batch_tokens + 0.5) if plan["unit"] == "tokens"
                 else math.ceil(plan["budget"] / config.batch_size))
    per_round = round_steps(plan["amounts"], max(per_epoch, len(plan["amounts"])))
    total = epochs * sum(per_round)
    shares, base, taken = np.asarray(plan["base_shares"]), np.asarray(plan["base_shares"]), set(plan["probe"])
    train_ex: list[Example] = []
    steps: list[list[int]] = []
    t0 = time.perf_counter()
    for r, amount in enumerate(plan["amounts"]):
        if r < len(history["rounds"]):  # drawn before a resume: the same records
            shares, ids = np.asarray(history["rounds"][r]["shares"]), history["rounds"][r]["ids"]
        else:
            ids = draw_round(table, shares, amount, plan["unit"], taken, round_seed(plan["seed"], r)).selected["id"]
            ids = ids.tolist()
            history["rounds"].append({"round": r + 1, "shares": shares.tolist(), "ids": ids})
            _write_json(history_path, history)
        taken |= set(ids)
        first = len(train_ex)
        train_ex += job.encode([by_id[i] for i in ids])
        lengths = [len(e.ids) for e in train_ex]
        if per_round[r] > len(ids):
            raise ConfigError(f"round {r + 1} drew {len(ids)} records, fewer than its {per_round[r]} steps; "
                              "use fewer rounds or a larger budget")
        for epoch in range(epochs):
            order = [first + i for i in epoch_order(len(ids), epoch, config.seed + 1_000 * (r + 1))]
            steps += cut_into(order, lengths, per_round[r])
        record = history["rounds"][r]
        if len(job.log) < len(steps) and not job.finished:
            job.train(train_ex, val_ex, steps, total, stop_at=len(steps))
        elif "rho" not in record and r + 1 < len(plan["amounts"]):  # killed between training and measuring
            job.load_checkpoint_adapter()
        if r + 1 < len(plan["amounts"]):
            count(str(model), job.student_params, "rho" in record)
        if r + 1 < len(plan["amounts"]) and "rho" not in record:
            record["nll"] = measure(job.peft_model)
            rho = remaining_gap(np.asarray(record["nll"]), np.asarray(history["dense"]),
                                np.asarray(history["pruned"]))
            finite = np.isfinite(rho)  # a cluster without probe records keeps the mean: no move
            rho = np.where(finite, rho, float(shares[finite] @ rho[finite]) / max(shares[finite].sum(), 1e-12))
            record["rho"] = rho.tolist()
            record["next_shares"] = update_shares(shares, base, rho, plan["settings"]["step"],
                                                  plan["settings"]["floor"]).tolist()
            _write_json(history_path, history)
        if r + 1 < len(plan["amounts"]):
            shares = np.asarray(record["next_shares"])
    if job.finished:
        job.load_finished_adapter()
    seconds = time.perf_counter() - t0
    rounds = [{"round": h["round"], "records": len(h["ids"]),
               "tokens": int(sum(len(e.ids) for e in job.encode([by_id[i] for i in h["ids"]]))),
               "shares": h["shares"], "rho": h.get("rho")} for h in history["rounds"]]
    result = job.finish(train_ex, val_ex, steps, seconds,
                        data_summary={"data": str(data), "train_records": len(train_ex), "val_records": len(val)},
                      extra={"adaptive": {"plan": str(plan_path(data)), "rounds": rounds,
                                          "probe_records": len(probe_ex), "dense_probe_nll": history["dense"],
                                          "pruned_probe_nll": history["pruned"]}})
    job.release()
    return result


def _check_rounds(config: RecoverConfig, plan: dict) -> None:
    """What adaptive rounds support: SFT, whole epochs, the budget's unit in the batches."""
    if config.objective != "sft" or config.token_weighting > 0:
        raise ConfigError("adaptive rounds train with plain SFT (objective sft, token_weighting 0)")
    if config.epochs != int(config.epochs) or config.max_steps is not None or config.patience is not None:
        raise ConfigError("adaptive rounds train whole epochs per round: no fractional epochs, max_steps or patience")
    if (plan["unit"] == "tokens") != (config.batch_tokens is not None):
        raise ConfigError(f"an adaptive budget in {plan['unit']} trains in batches of {plan['unit']}: "
                          + ("give batch_tokens (--batch-tokens)" if plan["unit"] == "tokens"
                             else "leave batch_tokens out"))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def save_merged(peft_model, tokenizer, kind: str, folder: Path, zeros: float = 0.0) -> Path:
    """Merge the adapter into the weights and save a model paser (and, for uniform widths, plain
    transformers) loads. Merging fills the zeros of an unstructured-sparse (Wanda/SparseGPT)
    model; ``zeros`` is the base model's share of zero weights, for the warning."""
    from paser.layers import layer_shapes, save_pruned_folder

    merged = peft_model.merge_and_unload()
    shapes = layer_shapes(merged)
    if zeros > 0.2:
        warnings.warn(f"the model had {zeros:.0%} zero weights before merging; the merged model is dense "
                      "(LoRA updates fill the zeros); keep the adapter separate to stay sparse", stacklevel=2)
    if len({(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in shapes}) > 1 or kind == "paser-pruned":
        return save_pruned_folder(merged, tokenizer, folder, {"merged_from": "paser recover"})
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
