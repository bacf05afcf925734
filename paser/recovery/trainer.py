"""Recovery's engine: Hugging Face's Trainer running paser's step plan.

paser decides which records form each optimizer step (``paser.recovery.step_batches``: record or
token batches, seeded epochs); the Trainer runs the steps: gradient accumulation over the step's
micro-batches, gradient clipping, bf16 autocast on GPUs, gradient checkpointing, checkpoints and
resume, and data parallelism when started by ``torchrun`` or ``accelerate launch`` (every process
runs ``recover``; on CPUs the processes talk over gloo).

Each step's records are cut into micro-batches of ``micro_batch_size`` and dealt to the processes;
every process gets the same number of micro-batches per step (the step with the most sets it),
short ones filled with an empty micro-batch (one padding token, no label) that adds nothing to the
gradient. The loss of a micro-batch is its summed token loss divided by the step's labelled tokens
over every process (the Trainer's ``num_items_in_batch``), times the process count because data
parallelism averages gradients: each step's gradient is then that of the mean token loss over the
whole step, whatever the micro-batches and processes (tested: one process and two give the same
adapter).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from paser.errors import ConfigError
from paser.seeds import derived_seed

STATE = "paser_state.pt"  # in each checkpoint folder, written once the Trainer's own files are complete


def micro_batches(steps: list[list[int]], micro: int, world: int, lengths=None,
                  max_tokens: int | None = None) -> tuple[list[list[int]], int]:
    """The micro-batches of every step in the order the processes take them (micro-batch i goes to
    process i % world), and how many each process runs per step. An empty list is a filler.

    Without ``lengths`` each step is cut in its order into micro-batches of ``micro`` records. With
    each record's ``lengths`` (tokens), a step's records are sorted longest first and cut into
    micro-batches of at most ``micro`` records that pad to at most ``max_tokens`` tokens (records x
    the longest; a longer record goes alone): records of like length share a forward pass, so less
    of it is padding. The step's gradient is the same either way (the loss is a sum over tokens)."""
    per_step = [_cut(step, micro, lengths, max_tokens) for step in steps]
    accumulation = max(1, max((math.ceil(len(chunks) / world) for chunks in per_step), default=1))
    order = []
    for chunks in per_step:
        order += chunks + [[] for _ in range(accumulation * world - len(chunks))]
    return order, accumulation


def _cut(step: list[int], micro: int, lengths, max_tokens: int | None) -> list[list[int]]:
    if lengths is None:
        return [step[lo:lo + micro] for lo in range(0, len(step), micro)]
    chunks: list[list[int]] = []
    for i in sorted(step, key=lambda i: (-int(lengths[i]), i)):
        chunk = chunks[-1] if chunks else None
        if chunk is None or len(chunk) == micro or (
                max_tokens is not None and (len(chunk) + 1) * int(lengths[chunk[0]]) > max_tokens):
            chunks.append([i])
        else:
            chunk.append(i)
    return chunks


class StepData(torch.utils.data.Dataset):
    """The planned micro-batches as tensors made by ``collate(examples)`` (``index``: the records'
    positions in the training set, -1 for a filler, which collates ``filler``: an example without
    a label; ``weights``: each micro-batch's token weights, row-major over its labelled tokens, for
    token-weighted SFT)."""

    def __init__(self, batches: list[list[int]], examples: list, collate, filler, weights=None):
        self.batches, self.examples, self.collate, self.filler = batches, examples, collate, filler
        self.weights = weights

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        chosen = self.batches[i]
        if not chosen:
            return self.collate([self.filler]) | {"index": torch.tensor([-1])}
        out = self.collate([self.examples[j] for j in chosen]) | {"index": torch.tensor(chosen)}
        if self.weights is not None:
            out["weights"] = torch.from_numpy(self.weights[i])
        return out


class RecoveryTrainer(Trainer):
    """The Trainer with paser's loss, optimizer and schedule. ``loss_fn(model, batch, config,
    targets)`` gives (summed loss, summed NLL, summed divergence or None) over the batch's labelled
    tokens; ``targets_fn(batch, index)`` the teacher's targets of the batch (None for SFT);
    ``schedule_fn(optimizer, total, warmup)`` the learning-rate schedule."""

    def __init__(self, *args, config, data: StepData, loss_fn, targets_fn, schedule_fn, **kwargs):
        super().__init__(*args, train_dataset=data, **kwargs)
        self.config, self.data = config, data
        self.loss_fn, self.targets_fn, self.schedule_fn = loss_fn, targets_fn, schedule_fn
        # the loss below is already divided by the step's token count: no division by the
        # accumulation steps, and the Trainer counts the labelled tokens of every step
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self.step_sums = torch.zeros(3, dtype=torch.float64)  # loss, nll, divergence of this step, this process

    def get_train_dataloader(self):
        loader = torch.utils.data.DataLoader(self.data, batch_size=1, shuffle=False, collate_fn=lambda items: items[0],
                                             num_workers=0)
        return self.accelerator.prepare(loader)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(params, lr=self.config.steps.learning_rate,
                                               weight_decay=self.config.steps.weight_decay)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = self.schedule_fn(optimizer or self.optimizer, num_training_steps,
                                                 int(self.config.steps.warmup_ratio * num_training_steps))
        return self.lr_scheduler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop("index")
        if int(index[0]) < 0:  # a filler: the graph touches the model, the gradient is zero
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           use_cache=False).logits
            return logits.sum() * 0.0
        loss, nll, div = self.loss_fn(model, inputs, self.config.loss, self.targets_fn(inputs, index.tolist()))
        self.step_sums += torch.tensor([float(loss.detach()), nll, div or 0.0], dtype=torch.float64)
        return loss / num_items_in_batch * self.accelerator.num_processes


class StepLog(TrainerCallback):
    """Per step: the seed of its dropout masks, the log entry (loss, learning rate, validation
    loss), early stopping, and paser's state in every checkpoint (fingerprint, log, best adapter)."""

    def __init__(self, trainer: RecoveryTrainer, plan_tokens: list[int], validate, fingerprint: str,
                 log: list[dict], best: dict, bar=None, stop_at: int | None = None):
        """``plan_tokens``: the labelled tokens of each step; ``validate(model)``: the validation
        loss, or None without a validation set; ``stop_at``: end this training (with a checkpoint)
        after that step, before the schedule's end (a round of adaptive recovery)."""
        self.trainer, self.plan_tokens, self.validate = trainer, plan_tokens, validate
        self.fingerprint, self.log, self.best, self.bar = fingerprint, log, best, bar
        self.stop_at = stop_at

    def on_step_begin(self, args, state, control, **kwargs):
        # a per-step seed keeps dropout identical on a resumed run
        torch.manual_seed(derived_seed(self.trainer.config.steps.seed, state.global_step))
        self.trainer.step_sums.zero_()

    def on_step_end(self, args, state, control, **kwargs):
        config, trainer = self.trainer.config, self.trainer
        sums = trainer.accelerator.reduce(trainer.step_sums.to(args.device), reduction="sum").cpu()
        n_tokens = self.plan_tokens[state.global_step - 1]
        entry = {"step": state.global_step, "loss": float(sums[0]) / n_tokens,
                 "lr": trainer.lr_scheduler.get_last_lr()[0]}
        if config.loss.objective != "sft":
            entry |= {"nll": float(sums[1]) / n_tokens, "divergence": float(sums[2]) / n_tokens}
        elif config.loss.token_weighting > 0:  # the loss is weighted; the plain NLL beside it
            entry["nll"] = float(sums[1]) / n_tokens
        if not math.isfinite(entry["loss"]):
            raise FloatingPointError(f"step {state.global_step}: loss is {entry['loss']}; lower the learning rate "
                                     "or train in float32")
        last = state.global_step == state.max_steps
        if state.global_step % config.steps.eval_every == 0 or last:
            model = trainer.accelerator.unwrap_model(trainer.model)
            val_loss = self.validate(model)
            if val_loss is not None:
                entry["val_loss"] = val_loss
            if val_loss is not None and config.steps.patience is not None:
                self._early_stopping(entry, model, state.global_step)
        self.log.append(entry)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{entry['loss']:.3f}")
            self.bar.update(1)
        if self.best["stopped"] or last or state.global_step == self.stop_at:
            control.should_training_stop = True
            control.should_save = True
        return control

    def _early_stopping(self, entry: dict, model, step: int) -> None:
        from peft import get_peft_model_state_dict

        if entry["val_loss"] < self.best["loss"]:
            adapter = get_peft_model_state_dict(model)
            self.best |= {"loss": entry["val_loss"], "step": step, "since": 0,
                          "adapter": {k: v.detach().cpu().clone() for k, v in adapter.items()}}
        else:
            self.best["since"] += 1
            self.best["stopped"] = self.best["since"] >= self.trainer.config.steps.patience

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            done = state.global_step == state.max_steps or self.best["stopped"]
            torch.save({"fingerprint": self.fingerprint, "log": self.log, "best": self.best, "finished": done},
                       folder / f".{STATE}")
            (folder / f".{STATE}").replace(folder / STATE)
            write_log(self.log, Path(args.output_dir).parent / "train_log.jsonl")
        return control


def write_log(log: list[dict], path: Path) -> None:
    with path.open("w") as fh:
        fh.writelines(json.dumps(e) + "\n" for e in log)


def last_checkpoint(folder: Path, fingerprint: str) -> tuple[Path | None, dict | None]:
    """The newest complete checkpoint under ``folder`` (one whose paser state was written) and that
    state; a ConfigError when it was made with other settings, data or model."""
    done = sorted((p for p in folder.glob("checkpoint-*") if (p / STATE).is_file()),
                  key=lambda p: int(p.name.rsplit("-", 1)[1]))
    if not done:
        return None, None
    state = torch.load(done[-1] / STATE, weights_only=True)
    if state["fingerprint"] != fingerprint:
        raise ConfigError(f"{done[-1]}: this checkpoint was made with other settings, data or model; "
                          "use another output folder or pass restart=True (--restart) to discard it")
    return done[-1], state
