"""``paser compare`` as a Prefect flow: the recipe's stages (``paser.comparison.STAGES``) as tasks,
the arms spread over the configured engine (``distribute`` section: local, one arm after another;
Dask or Ray, one arm per worker and one GPU per worker where there are GPUs).

    paser compare --config configs/compare/smoke.yaml            # through this flow

The subsets are selected here, one after another, before the arms are sent out: they share one
selection folder (the pool's embeddings, clusters, tokens and scores computed once). A finished
arm is a file in the comparison's folder, so a rerun sends only the arms still to run.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from paser.comparison.recipe import STAGES, CompareResult, finish, run_one
from paser.comparison.runner import Setup, load_sections, pending, prepare, select_subset
from paser.config import from_mapping
from paser.flows.runners import shard_resources, task_runner
from paser.selection.configs import DistributeConfig


@task(name=STAGES[0], cache_policy=NO_CACHE)
def setting(sections: dict, where: str, resolve: bool) -> Setup:
    return prepare(sections, where, resolve)


@task(name="select the subsets", cache_policy=NO_CACHE)
def subsets(setup: Setup, names: list[str]) -> None:
    for arm in setup.arms:
        if arm.name in names and not arm.reference:
            select_subset(arm, setup)


@task(name="arm", task_run_name="arm {name}", cache_policy=NO_CACHE)
def arm_task(setup: Setup, name: str) -> str:
    run_one(next(a for a in setup.arms if a.name == name), setup)
    return name


@flow(name="paser-compare-arms")
def arms_flow(setup: Setup, names: list[str]) -> list[str]:
    """Every arm of ``names`` as a task on the flow's task runner."""
    with shard_resources(distribute(setup)):
        futures = [arm_task.submit(setup, n) for n in names]
    return [f.result() for f in futures]


def distribute(setup: Setup) -> DistributeConfig:
    return from_mapping(DistributeConfig, setup.distribute, "distribute")


@task(name=STAGES[3], cache_policy=NO_CACHE)
def report(setup: Setup) -> CompareResult:
    result = finish(setup)
    create_markdown_artifact(result.report.read_text(), key="paser-compare", description="paser compare's report")
    return result


@flow(name="paser-compare")
def compare_flow(config: str | None = None, overrides: dict | None = None,
                 report_only: bool = False) -> CompareResult:
    """Run (or resume) the comparison of ``config`` with ``overrides`` ({section: {key: value}}) on
    top; returns its result (``paser.compare``'s)."""
    sections = load_sections(config, overrides)
    setup = setting(sections, config or "compare", not report_only)
    engine = arms_flow.with_options(task_runner=task_runner(distribute(setup)))
    for second in ([] if report_only else [False, True]):  # STAGES[1], then STAGES[2]
        names = [a.name for a in pending(setup, second)]
        if names:
            subsets(setup, names)
            engine(setup, names)
    return report(setup)

