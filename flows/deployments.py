"""Deployments of paser's flows, served by ``paser serve`` against a running Prefect server.

    prefect server start --host 127.0.0.1            # one terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    paser serve                                       # another: paser-select/select, paser-run/run, ...
    prefect deployment run paser-select/select -p budget=0.1 -p out=runs/from-ui

Each deployment's parameters are its flow's (those of ``paser select`` / ``paser prune``) and
can be set per run in the UI or with ``-p``. The flows load by module path, so ``paser serve``
works from any folder; run folders given as relative paths are relative to where it was started.
"""

from __future__ import annotations

from flows import configure_prefect

configure_prefect()

from prefect.deployments.runner import EntrypointType  # noqa: E402

from flows.compare import compare_flow  # noqa: E402
from flows.pipeline import pipeline_flow  # noqa: E402
from flows.prune import prune_flow  # noqa: E402
from flows.recovery import evaluation_flow, recovery_flow  # noqa: E402
from flows.selection import selection_flow  # noqa: E402

DEPLOYMENTS = {"select": selection_flow, "run": pipeline_flow, "prune": prune_flow, "recover": recovery_flow,
               "evaluate": evaluation_flow, "compare": compare_flow}


def deployments(names: list[str] | None = None, tags: list[str] | None = None):
    """Runner deployments of the named flows (default: all), ready for ``prefect.serve``."""
    chosen = names or list(DEPLOYMENTS)
    unknown = sorted(set(chosen) - set(DEPLOYMENTS))
    if unknown:
        from paser.errors import ConfigError

        raise ConfigError(f"unknown deployment(s) {unknown}; known: {list(DEPLOYMENTS)}")
    return [DEPLOYMENTS[name].to_deployment(name=name, tags=["paser", *(tags or [])],
                                            description=DEPLOYMENTS[name].description,
                                            entrypoint_type=EntrypointType.MODULE_PATH)
            for name in chosen]


def serve(names: list[str] | None = None, limit: int | None = None) -> None:
    """Serve the deployments until interrupted; ``limit`` caps concurrent flow runs."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(names), limit=limit, print_starting_message=True)
