"""Recovery's entry, ``recover``: LoRA recovery of a pruned model on a file of records, or in
adaptive rounds when the file is an adaptive selection's.

    python -c "from paser.recovery.entry import recover; print(recover.__doc__)"
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from paser.config import config_with
from paser.data.pools import load_pool
from paser.errors import ConfigError, DataError
from paser.recovery.config import RecoverConfig
from paser.recovery.dense_answers import answer_with_dense, count_answers
from paser.recovery.job import Job, RecoveryResult, train_device, world_size
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
    config = config_with(config or RecoverConfig(), overrides)
    check_prompt_format(config, data)
    plan = adaptive_plan(data, config)
    if plan is not None:  # an adaptive selection: the rounds draw their records as they go
        return recover_in_rounds(model, data, Path(out), config, plan, val_data, trust_pickle, restart)
    train, val, answers = training_records(data, val_data, config, Path(out), trust_pickle)
    # set up: the run, its records encoded, the checkpoint, the references and the student
    job = Job.open(model, data, Path(out), config, trust_pickle, restart, [r.id for r in train])
    train_ex, val_ex = job.encode(train), job.encode(val)
    if config.steps.patience is not None and not val_ex:
        raise ConfigError("patience stops on the validation loss: give a validation set (val_size > 0 or val_data)")
    if answers is not None:
        count_answers(job.ledger, answers)
    job.start(train_ex)
    # train the plan of steps (a finished run's adapter is in its checkpoint)
    steps = step_batches(len(train_ex), config.steps, [len(e.ids) for e in train_ex])
    t0 = time.perf_counter()
    if job.finished:  # nothing to train, its adapter is in the checkpoint
        job.load_finished_adapter()
    else:
        job.train(train_ex, val_ex, steps, len(steps))
    seconds = time.perf_counter() - t0
    # finish: the adapter, recovery.json with the compute, the curve
    summary = {"data": str(data), "train_records": len(train), "val_records": len(val)}
    if answers is not None:
        summary["dense_answers"] = {k: v for k, v in answers.items() if k != "params"}
    result = job.finish(train_ex, val_ex, steps, seconds, data_summary=summary)
    job.release()
    return result


def adaptive_plan(data: str, config: RecoverConfig) -> dict | None:
    """The plan of an adaptive selection's file (rounds.json beside it), else None."""
    try:
        plan = read_plan(data)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if plan is not None and config.data.responses == "dense":
        raise ConfigError(f"{data} is an adaptive selection, whose rounds draw records by their tokens as they "
                          "train; responses dense (the dense model's own answers) trains on a fixed file")
    return plan


def training_records(data: str, val_data: str | None, config: RecoverConfig, out: Path,
                     trust_pickle: bool) -> tuple[list, list, dict | None]:
    """(training records, validation records, the dense answers' summary or None): the file's
    records, with ``responses: dense`` the dense model's own answers to the same prompts (self-data
    distillation, validation included); ``val_size`` of them held out unless ``val_data`` is given."""
    records = load_pool(data).records
    val_records = load_pool(val_data).records if val_data is not None else None
    answers = None
    if config.data.responses == "dense":
        both, answers = answer_with_dense(records + (val_records or []), data, config, out, trust_pickle,
                                          train_device(config), world_size())
        records, val_records = both[:len(records)], (both[len(records):] if val_records is not None else None)
    train, val = split_validation(records, config.data)
    if val_records is not None:
        val = val_records
    if not train:
        raise DataError(f"{data}: no training records")
    return train, val, answers


def check_prompt_format(config: RecoverConfig, data: str | Path) -> None:
    """A selection under a token budget counted each record's tokens in its prompt format (the
    ``prompt`` section, recorded in the run folder's manifest.json); trained in another format the
    subset would spend another budget than the one it was chosen for. A ConfigError naming both
    formats; files outside a run folder, and record budgets, pass."""
    manifest = Path(data).parent / "manifest.json"
    if not manifest.is_file():
        return
    try:
        found = json.loads(manifest.read_text())
        unit = found["selection"]["budget_unit"]
        settings = found["settings"]
        fmt = settings["prompt"] if "prompt" in settings else settings["score"]  # runs made before the section
        counted = (fmt["template"], int(fmt["cutoff"]))
    except (ValueError, KeyError, TypeError):
        return  # not a selection run's manifest
    prompt = config.prompt
    if unit == "tokens" and counted != (prompt.template, prompt.cutoff):
        raise ConfigError(
            f"{data}: its token budget was counted in the {counted[0]!r} template at a {counted[1]}-token cutoff "
            f"(the prompt section in {manifest}); recovery is set to {prompt.template!r} at {prompt.cutoff}: train "
            f"in the selection's format (prompt.template: {counted[0]}, prompt.cutoff: {counted[1]}, or --cutoff "
            f"{counted[1]}), or select again in the format you train in")
