"""The adapters and the Trainer's arguments: LoRA on the linear layers, activation checkpointing
under its current names, one device per process, and merging an adapter into the weights.

    python -c "from paser.recovery.lora import checkpointing_arguments; print(checkpointing_arguments(True))"
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from paser.errors import ConfigError
from paser.models.layers import layer_shapes, save_pruned_folder
from paser.recovery.config import RecoverConfig


def lora_model(model, config: RecoverConfig):
    """The model wrapped with fresh LoRA adapters on ``target_modules`` (seeded)."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = sorted(set(config.lora.target_modules) - present)
    if missing:
        raise ConfigError(f"target_modules {missing} are not linear layers of this model; it has {sorted(present)}")
    torch.manual_seed(config.steps.seed)
    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=list(config.lora.target_modules), bias="none", task_type="CAUSAL_LM")
    with peft_quietly():
        return get_peft_model(model, lora)


@contextlib.contextmanager
def peft_quietly():
    """peft (0.21) reads the model's ``is_gradient_checkpointing``, which transformers 5 deprecated
    with a FutureWarning: not ours to rename, and a user would read it as something wrong."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def sparsity(model) -> float:
    """Share of exact zeros in the decoder's linear weights (Wanda/SparseGPT leave about half)."""
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / max(total, 1)


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
        per_device_train_batch_size=1, learning_rate=config.steps.learning_rate, weight_decay=config.steps.weight_decay,
        max_grad_norm=config.steps.max_grad_norm, bf16=config.dtype == "bfloat16" and not on_cpu,
        **checkpointing_arguments(config.steps.gradient_checkpointing),
        save_strategy="steps", save_steps=config.steps.save_every, save_total_limit=2, logging_strategy="no",
        report_to="none", disable_tqdm=True, seed=config.steps.seed, use_cpu=on_cpu,
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


def save_merged(peft_model, tokenizer, kind: str, folder: Path, zeros: float = 0.0) -> Path:
    """Merge the adapter into the weights and save a model paser (and, for uniform widths, plain
    transformers) loads. Merging fills the zeros of an unstructured-sparse (Wanda/SparseGPT)
    model; ``zeros`` is the base model's share of zero weights, for the warning."""
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
