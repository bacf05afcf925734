"""Recovery and evaluation flows: LoRA recovery on a selected subset, then evaluation of the result."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from paser.config import load_config
from paser.evaluation import evaluate as run_evaluate
from paser.evaluation.config import EvalConfig
from paser.evaluation.report import markdown_table
from paser.recovery import RecoverConfig, RecoveryResult
from paser.recovery import recover as run_recover


@task(name="LoRA recovery", cache_policy=NO_CACHE)
def lora_recovery(model: str, data: str, out: str, config: RecoverConfig, val_data: str | None,
                  trust_pickle: bool, restart: bool) -> RecoveryResult:
    # resumable by itself: a checkpoint in `out` made with the same settings is continued
    return run_recover(model, data, out, config, val_data=val_data, trust_pickle=trust_pickle, restart=restart)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluation(model: str, adapter: str | None, out: str | None, config: EvalConfig, trust_pickle: bool) -> dict:
    result = run_evaluate(model, adapter, out, config, trust_pickle=trust_pickle)
    create_markdown_artifact(markdown_table(result), key="paser-evaluation",
                             description=f"evaluation of {result['description']}")
    return result


@flow(name="paser-recover")
def recovery_flow(model: str, data: str, out: str = "runs/recover", config: str | None = None,
                  overrides: dict | None = None, val_data: str | None = None, trust_pickle: bool = False,
                  restart: bool = False) -> RecoveryResult:
    """LoRA-recover ``model`` on the records of ``data`` (e.g. a run's selected.jsonl) into ``out``.
    ``config`` is a YAML file whose ``recover`` and ``prompt`` sections are read; ``overrides`` are the
    recover section's fields, and the prompt section's under ``"prompt"``."""
    cfg = load_config(RecoverConfig, config, "recover", overrides)
    return lora_recovery(model, data, out, cfg, val_data, trust_pickle, restart)


@flow(name="paser-evaluate")
def evaluation_flow(model: str, adapter: str | None = None, out: str | None = None, config: str | None = None,
                    overrides: dict | None = None, trust_pickle: bool = False) -> dict:
    """Evaluate ``model`` (with ``adapter`` when given); ``config``'s ``evaluate`` and ``prompt``
    sections, ``overrides`` on top (the prompt section's under ``"prompt"``)."""
    cfg = load_config(EvalConfig, config, "evaluate", overrides)
    return evaluation(model, adapter, out, cfg, trust_pickle)

