"""The PASER selection flow: the pipeline's table of contents, one task per stage.

Tasks take the settings (a plain dict) and the run folder, and return paths; every result lives
in the run folder, and each stage skips itself when its inputs' fingerprint is unchanged.

    python -m flows.selection            # the embedded default, through Prefect
"""

from __future__ import annotations

from pathlib import Path

from flows import configure_prefect

configure_prefect()

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from paser import pipeline  # noqa: E402
from paser.report import write_report  # noqa: E402


def _settings(settings: dict) -> pipeline.Settings:
    return pipeline.Settings.from_dict(settings)


@task(name="load data", cache_policy=NO_CACHE)
def load_data(settings: dict, run: str) -> str:
    return str(pipeline.stage_data(_settings(settings), Path(run)))


@task(name="embed instructions", cache_policy=NO_CACHE)
def embed(settings: dict, run: str, cache_dir: str | None) -> str:
    return str(pipeline.stage_embed(_settings(settings), Path(run), Path(cache_dir) if cache_dir else None))


@task(name="find capability clusters", cache_policy=NO_CACHE)
def cluster(settings: dict, run: str) -> str:
    return str(pipeline.stage_cluster(_settings(settings), Path(run)))


@task(name="score degradation", cache_policy=NO_CACHE)
def score(settings: dict, run: str) -> str:
    return str(pipeline.stage_score(_settings(settings), Path(run)))


@task(name="allocate, rank and filter", cache_policy=NO_CACHE)
def select(settings: dict, run: str) -> str:
    return str(pipeline.stage_select(_settings(settings), Path(run)))


@task(name="write report", cache_policy=NO_CACHE)
def report(settings: dict, run: str) -> str:
    return str(write_report(_settings(settings), Path(run)))


@flow(name="paser-select")
def selection_flow(settings: dict | None = None, cache_dir: str | None = None) -> str:
    """Select the records that repair a pruned model; returns the run folder."""
    settings = pipeline.Settings.from_dict(settings or {}).to_dict()
    run = str(pipeline.run_folder(_settings(settings)))
    load_data(settings, run)
    embed(settings, run, cache_dir)
    cluster(settings, run)
    score(settings, run)
    select(settings, run)
    report(settings, run)
    return run


if __name__ == "__main__":
    print(selection_flow())
