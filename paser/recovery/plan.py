"""The step plan: the validation split, each epoch's seeded record order, optimizer steps of
``batch_size`` records or of about ``batch_tokens`` tokens, and the learning-rate schedule.

    python -c "from paser.recovery.plan import token_steps; print(token_steps([0, 1, 2], [5, 5, 5], 10))"
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from paser.errors import ConfigError
from paser.recovery.config import DataSettings, StepSettings
from paser.seeds import derived_seed


def split_validation(records: list, config: DataSettings) -> tuple[list, list]:
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
    random.Random(derived_seed(seed, epoch)).shuffle(order)
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


def step_batches(n: int, config: StepSettings, lengths=None) -> list[list[int]]:
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


def schedule(optimizer, total: int, warmup: int):
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
