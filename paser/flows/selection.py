"""The PASER selection flow: the recipe of ``paser select`` (``paser.selection.pipeline.stages``),
one task per stage.

The flow walks the list that ``run_selection`` (in this process) walks; each task calls the same
stage function with the settings and the run folder, and every result lives in the run folder.
The cached stages (data, embed, cluster) carry a Prefect cache key made of their fingerprint (data
content, model files, stage config), with the result record kept in the run folder (``.prefect/``):
re-running with another budget finds every one of them cached, and changing only the clustering
settings re-runs clustering and what follows, nothing before it. Scoring is
``pipeline.stage_score`` with its shards mapped by a subflow over the configured engine (this
process, Dask or Ray); its table is reused from the run folder like every stage's, a failed shard
fails with its record range, and a rerun scores only the shards that are missing.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from paser.errors import ShardError
from paser.flows.runners import release_workers, shard_resources, task_runner, worker_dtype
from paser.selection import pipeline, runfolder
from paser.selection.report import artifact_markdown
from paser.selection.scoring import ScoringPlan, score_planned_shard, scoring_progress
from paser.selection.settings import Settings, build_settings


def _cached(stage_task, stage: str, settings: Settings, run: str):
    """``stage_task`` keyed on the stage's fingerprint, and that fingerprint (computed once: the task
    gets it, so a miss does not hash the pool again); a stale or missing output in the run folder
    refreshes the cache instead of trusting it."""
    fp, fresh = runfolder.stage_state(stage, settings, Path(run))
    if fresh:
        runfolder.record_stage(Path(run), stage, 0.0, reused=True)
    key = f"paser-{stage}-{fp}"
    return stage_task.with_options(cache_key_fn=lambda *_: key, refresh_cache=not fresh, persist_result=True,
                                   result_storage=Path(run).resolve() / ".prefect" / "results"), fp


@task(name="check inputs", cache_policy=NO_CACHE)
def check_inputs(settings: Settings) -> str:
    pipeline.preflight(settings)
    return str(runfolder.run_folder(settings))


def stage_task(step: pipeline.Step):
    """The recipe's ``step`` as a Prefect task of the same name, called with the settings and the run
    folder; a stage the run folder reuses by fingerprint keeps its result in
    Prefect's cache under that fingerprint."""

    def call(settings: Settings, run: str, *fingerprint: str) -> str:  # a cached stage's, computed once
        return str(step.run(settings, Path(run), *fingerprint))

    call.__name__ = call.__qualname__ = step.run.__name__  # each stage its own task key
    return task(call, name=step.name) if step.cached else task(call, name=step.name, cache_policy=NO_CACHE)


def _transient(task, task_run, state) -> bool:
    err = state.result(raise_on_failure=False)
    return isinstance(err, ShardError) and err.transient


@task(name="score shard", task_run_name="score shard {index}", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=5, retry_condition_fn=_transient)
def score_shard(settings: Settings, plan: ScoringPlan, index: int) -> dict:
    return score_planned_shard(settings, plan, index)


@flow(name="paser-score-shards", validate_parameters=False)  # the settings as they are, not coerced
def score_shards(settings: Settings, plan: ScoringPlan) -> list[dict]:
    """Every shard of ``plan``, mapped over the task runner; finished shards return at once. One
    progress display: batches of shards scored in this process, and every shard as it finishes."""
    from prefect.futures import as_completed

    with scoring_progress(settings, plan) as shown:
        with shard_resources(settings.distribute):
            futures = score_shard.map(unmapped(settings), unmapped(plan), list(range(len(plan.shards))))
        for future in as_completed(futures):
            report = future.result()
            lo, hi = report["records"]
            shown.shard_done(report["shard"], hi - lo, report["computed"])
    return [f.result() for f in futures]


def degradation(settings: Settings, run: str, step: pipeline.Step) -> str:
    """The recipe's scoring stage, its shards mapped over the configured engine by a subflow
    instead of one after another."""
    engine = score_shards.with_options(task_runner=task_runner(settings.distribute))
    try:
        return str(step.run(settings, Path(run), map_shards=lambda _, plan: engine(settings, plan)))
    finally:
        release_workers(settings.distribute)  # a remote cluster's workers keep no model after the run


@flow(name="paser-select")
def selection_flow(data: str | None = None, dense: str | None = None, pruned: str | None = None,
                   prune_ratio: float | None = None, budget: str | None = None, out: str | None = None,
                   config: str | None = None, trust_pickle: bool | None = None, seed: int | None = None,
                   engine: str | None = None, address: str | None = None, workers: int | None = None,
                   overrides: dict | None = None) -> str:
    """Select the records that repair a pruned model; returns the run folder.

    Parameters are those of ``paser select``; left empty, they keep the config file's value
    (``config``), else the embedded default. ``overrides`` sets any other key as
    ``{section: {key: value}}``.
    """
    settings = build_settings(data, dense, pruned, prune_ratio, budget, out, config, trust_pickle, seed,
                              engine, address, workers, overrides)
    if settings.score.dtype == "auto" and settings.scored:  # a remote cluster: its workers say what auto means
        settings.score.dtype = worker_dtype(settings.distribute, settings.score.device)
    run = check_inputs(settings)
    for step in pipeline.stages(settings):  # the recipe run_selection walks, as tasks
        if step.shards:
            degradation(settings, run, step)
            continue
        if step.cached:
            called, fp = _cached(stage_task(step), step.cached, settings, run)
            called(settings, run, fp)
        else:
            stage_task(step)(settings, run)
    create_markdown_artifact(artifact_markdown(Path(run)), key="paser-selection",
                             description="PASER selection: clusters, budget and outputs")
    return run

