"""One recovery run as named steps (``Job``): where it runs, the student and its references, the
checkpoint to resume, training a plan of steps on Hugging Face's Trainer (``paser.recovery.trainer``),
and the outputs with the compute ledger.

    python -c "from paser.recovery.job import RecoveryResult; print(RecoveryResult.__doc__)"
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from paser.config import to_mapping
from paser.devices import default_device, resolve_dtype
from paser.errors import ConfigError
from paser.ledger import Ledger, flop_params
from paser.models.load import check_same_tokenizer, load_model, load_tokenizer, model_fingerprint
from paser.progress import announce, bar_enabled
from paser.recovery.config import RecoverConfig
from paser.recovery.distill import in_memory_targets
from paser.recovery.lora import checkpointing_on, lora_model, save_merged, sparsity, training_arguments
from paser.recovery.losses import (
    IGNORE,
    Example,
    collate,
    encode_for_training,
    labelled_logits,
    objective_loss_sum,
    scored_tokens,
    validation_sums,
)
from paser.recovery.plan import schedule
from paser.recovery.teacher import check_vocab, load_dense, load_teacher, rank_zero_first, resolve_teacher
from paser.recovery.token_weights import SignalCache, signal_fingerprint, step_weights
from paser.recovery.trainer import RecoveryTrainer, StepData, StepLog, last_checkpoint, micro_batches, write_log

DISTILL_FIELDS = ("objective", "teacher", "divergence", "temperature", "mix_weight", "teacher_top_k")


TOKEN_FIELDS = ("token_weighting", "token_signal")


SELF_FIELDS = ("responses", "answer_tokens")


def world_size() -> int:
    """Processes started by torchrun or accelerate launch (1 without them)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def train_device(config: RecoverConfig) -> str:
    """The device this process trains on: ``config.device`` (default CUDA when available, else CPU);
    under torchrun on GPUs each process its own (LOCAL_RANK)."""
    device = config.device or default_device()
    if world_size() > 1 and str(device).startswith("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if str(device).startswith("cuda:") and torch.device(device).index != 0:
        # the Trainer of a single process trains on cuda:0 (of the visible ones) and would move
        # the student there, away from a teacher on the device asked for
        raise ConfigError(f"recover.device {device}: one process trains on the first visible GPU; choose the "
                          f"GPU with CUDA_VISIBLE_DEVICES={torch.device(device).index} and device cuda, or "
                          "train on several with torchrun")
    return device


def uses_dense(config: RecoverConfig) -> bool:
    """Whether training needs the dense model: as the teacher, for token weighting's signal or for
    its own answers."""
    return config.loss.objective != "sft" or config.loss.token_weighting > 0 or config.data.responses == "dense"


def _fingerprint(config: RecoverConfig, model_fp: str, train_ids: list[str]) -> str:
    # sft leaves the distillation fields out, so checkpoints made before they existed still resume
    skip = ("progress", "pictures", "merge", "device", "eval_every", "save_every", "gradient_checkpointing") + (
        DISTILL_FIELDS if config.loss.objective == "sft" else ()) + (
        TOKEN_FIELDS if config.loss.token_weighting == 0 else ()) + (
        SELF_FIELDS if config.data.responses == "data" else ())
    keep = {k: v for k, v in to_mapping(config).items() if k not in skip}  # the keys flat, as in the YAML
    keep |= keep.pop("prompt")  # template and cutoff, as when they were fields here
    h = hashlib.sha256(json.dumps([keep, model_fp], sort_keys=True, default=str).encode())
    for rid in train_ids:
        h.update(rid.encode() + b"\x00")
    return h.hexdigest()[:16]


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


class Job:
    """One recovery run, in named steps: where it runs, the student and its references (the teacher
    of distillation, the dense model of token weighting), the checkpoint to resume, training on a
    plan of steps, and the outputs. ``recover`` runs them once over a fixed set of records; adaptive
    recovery (``paser.rounds``) trains round after round on records it draws as it goes."""

    def __init__(self, model: str, data: str, out: Path, config: RecoverConfig, trust_pickle: bool):
        self.model, self.data, self.out, self.trust_pickle = model, data, out, trust_pickle
        self.world = world_size()
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device = train_device(config)
        # resolved before the fingerprint: a checkpoint records the precision it was trained in
        self.config = dataclasses.replace(config, dtype=resolve_dtype(config.dtype, device))
        self.reference = resolve_teacher(config, data) if uses_dense(config) else None
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
        job = cls(model, data, out, config, trust_pickle)
        config = job.config
        # with a top-k cache the teacher runs before the student is loaded, so only the tokenizer first
        lazy = job.reference is not None and config.loss.objective != "sft" and config.loss.teacher_top_k
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
        return encode_for_training(self.tokenizer, records, self.config.prompt)

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

    def start(self, train_ex: list[Example]) -> None:
        """Everything before training, in its order: the checkpoint to resume; distillation's teacher
        (its top-k cache is built before the student is loaded); the student; token weighting's
        signal over ``train_ex`` (then the dense model is released); the LoRA adapters. A finished
        run loads no reference: its adapter is in the checkpoint."""
        self.check_checkpoint()
        training = self.reference is not None and not self.finished
        if training and self.config.loss.objective != "sft":
            self.load_teacher(train_ex)
        self.load_student()
        if training and self.config.loss.token_weighting > 0:
            self.build_token_signal(train_ex)
        self.wrap_student()

    def load_teacher(self, train_ex: list[Example]) -> None:
        """Distillation's teacher: in memory, or its top-k over ``train_ex`` cached on disk."""
        config, ref = self.config, self.reference
        start = time.perf_counter()
        self.teacher, self.cache, self.teacher_params = load_teacher(
            ref, self.tokenizer, self.model, train_ex, self.pad_id, self.device, config, self.out,
            self.trust_pickle, self.world)
        self.teacher_seconds = time.perf_counter() - start
        if self.cache is not None:  # the teacher ran once over every training record
            self.ledger.forward("teacher top-k cache", ref, self.teacher_params, sum(len(e.ids) for e in train_ex),
                                sum(scored_tokens(e) for e in train_ex), self.teacher_seconds)

    def load_student(self) -> None:
        """The pruned model (unless loaded with the job), checked against the teacher's vocabulary."""
        if self.loaded is None:
            self.loaded = load_model(self.model, dtype=self.config.dtype, trust_pickle=self.trust_pickle,
                                     device=self.device, tokenizer_from=self.reference)
        if self.teacher is not None or self.cache is not None:
            check_vocab(self.teacher if self.teacher is not None else self.cache, self.loaded.model, self.reference,
                        self.model)
        self.student_params = flop_params(self.loaded.model)

    def build_token_signal(self, train_ex: list[Example]) -> None:
        """Token weighting's signal over ``train_ex``: the dense model against the student, cached on
        disk; the dense model is released after."""
        config, ref = self.config, self.reference
        start = time.perf_counter()
        dense = load_dense(ref, config, self.trust_pickle, self.device)
        check_same_tokenizer(dense.tokenizer, self.tokenizer, str(ref), str(self.model))
        cache = SignalCache(self.out / "token_signal", signal_fingerprint(
            model_fingerprint(ref), model_fingerprint(self.model), config.loss.token_signal, train_ex))
        announce(f"token weighting: {config.loss.token_signal} of {ref} against {self.model} over {len(train_ex)} "
                 f"records ({cache.folder})")
        with rank_zero_first(self.world, self.device):  # one process computes the signal, the others read it
            self.signal = cache.build(dense.model.requires_grad_(False), self.loaded.model, train_ex, collate,
                                      self.pad_id, self.device, config.loss.token_signal, config.steps.micro_batch_size,
                                      labelled_logits)
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
        batches, accumulation = micro_batches(steps, config.steps.micro_batch_size, world,
                                              [len(e.ids) for e in train_ex], config.steps.micro_batch_tokens)
        weights = (step_weights(self.signal, batches, accumulation * world, config.loss.token_weighting)
                   if self.signal is not None else None)
        teacher, cache = self.teacher, self.cache

        def targets(batch, index):  # the teacher's next-token distributions of the batch (None for SFT)
            if cache is not None:
                return cache.targets(index, batch["input_ids"].device)
            return None if teacher is None else in_memory_targets(teacher, batch, config.loss.temperature)

        def validate(net):  # with several processes each takes every world-th record; the sums are added
            if not val_ex:
                return None
            total_nll, count = validation_sums(net, val_ex[rank::world], self.pad_id, net.device,
                                               config.steps.micro_batch_size)
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
        announce(f"LoRA recovery of {self.model}: {len(steps)} steps ({config.loss.objective}"
                 + (f", token-weighted by {config.loss.token_signal}" if self.signal is not None else "")
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
        if config.pictures:
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
        loss = config.loss
        distilling = loss.objective != "sft"
        (out / "recovery.json").write_text(json.dumps({
            "model": str(self.model), "model_kind": self.loaded.kind, **data_summary,
            "train_tokens": result.train_tokens,
            "batch_unit": "tokens" if config.steps.batch_tokens else "records",
            "tokens_per_step": {"mean": round(mean_step, 1), "min": min(step_tokens, default=0),
                                "max": max(step_tokens, default=0)},
            "records_per_step": round(sum(len(b) for b in done) / max(1, len(done)), 2),
            "settings": to_mapping(config),
            "objective": loss.objective if not distilling else {
                "objective": loss.objective, "teacher": str(self.reference), "divergence": loss.divergence,
                "temperature": loss.temperature, "mix_weight": loss.mix_weight if loss.objective == "mix" else None,
                "teacher_targets": ("in memory (exact)" if loss.teacher_top_k is None
                                    else f"top-{loss.teacher_top_k} cache on disk"),
                "teacher_seconds": round(self.teacher_seconds, 2)},
            "token_weighting": None if loss.token_weighting == 0 else {
                "strength": loss.token_weighting, "signal": loss.token_signal, "reference": str(self.reference)},
            "steps": len(done), "planned_steps": len(steps), "stopped_early": bool(best["stopped"]),
            "best_step": best["step"] if best["adapter"] is not None else None,
            "resumed_from_step": start_step, "processes": self.world,
            "accumulation": micro_batches(steps, config.steps.micro_batch_size, self.world,
                                          [len(e.ids) for e in train_ex], config.steps.micro_batch_tokens)[1],
            "activation_checkpointing": checkpointing_on(self.peft_model),
            "first_loss": result.first_loss,
            "last_loss": result.last_loss, "val_loss": result.val_loss, "seconds": round(seconds, 2),
            "compute": ledger.to_dict(), "fingerprint": self.fingerprint} | (extra or {}), indent=2, default=str))
        return result
