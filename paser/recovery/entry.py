"""Recovery's entry, ``recover``: LoRA recovery of a pruned model on a file of records, or in
adaptive rounds when the file is an adaptive selection's.

    python -c "from paser.recovery.entry import recover; print(recover.__doc__)"
"""

from __future__ import annotations

import time
from pathlib import Path

from paser.errors import ConfigError, DataError
from paser.recovery.config import RecoverConfig
from paser.recovery.job import Job, RecoveryResult
from paser.recovery.plan import split_validation, step_batches
from paser.recovery.rounds import recover_in_rounds
from paser.selection.adaptive import read_plan


def recover(model: str, data: str, out: str | Path = "runs/recover", config: RecoverConfig | None = None, *,
            val_data: str | None = None, trust_pickle: bool = False, restart: bool = False,
            **overrides) -> RecoveryResult:
    """LoRA-recover ``model`` (any reference paser loads) on the records of ``data`` into ``out``.

    ``overrides`` are ``RecoverConfig`` fields, e.g. ``recover(m, "selected.jsonl", epochs=1)``.
    ``val_data`` is a separate validation file (else ``val_size`` of ``data`` is held out).
    A checkpoint in ``out`` made with the same settings is resumed unless ``restart``.
    """
    from paser.config import config_with
    from paser.data.pools import load_pool

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
