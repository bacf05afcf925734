"""Serve paser's flows as Prefect deployments to a running Prefect server.

    prefect server start --host 127.0.0.1                               # one terminal
    python flows/deployments.py --api-url http://127.0.0.1:4200/api    # another: every deployment
    prefect deployment run paser-select/select -p budget=0.1 -p out=runs/from-ui

The flows themselves are paser's (``paser.flows``: select, run, prune, recover, evaluate, compare);
this file only says which of them to serve and under which name, so it works from a checkout and
from any folder (the flows load by module path; relative run folders are relative to where it was
started). Each deployment's parameters are its flow's, settable per run in the UI or with ``-p``.
"""

from __future__ import annotations

import argparse
import os
import sys

NAMES = ("select", "run", "prune", "recover", "evaluate", "compare")


def flows_by_name() -> dict:
    """Deployment name -> paser's flow. Imported here, after Prefect's settings are in place."""
    from paser.flows.compare import compare_flow
    from paser.flows.pipeline import pipeline_flow
    from paser.flows.prune import prune_flow
    from paser.flows.recovery import evaluation_flow, recovery_flow
    from paser.flows.selection import selection_flow

    return {"select": selection_flow, "run": pipeline_flow, "prune": prune_flow, "recover": recovery_flow,
            "evaluate": evaluation_flow, "compare": compare_flow}


def deployments(names: list[str] | None = None, tags: list[str] | None = None) -> list:
    """Runner deployments of the named flows (default: all), ready for ``prefect.serve``."""
    from prefect.deployments.runner import EntrypointType

    chosen = names or list(NAMES)
    unknown = sorted(set(chosen) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown deployment(s) {unknown}; known: {list(NAMES)}")
    flows = flows_by_name()
    return [flows[name].to_deployment(name=name, tags=["paser", *(tags or [])], description=flows[name].description,
                                      entrypoint_type=EntrypointType.MODULE_PATH)
            for name in chosen]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve paser's deployments (paser-select/select, paser-run/run, "
                                                 "...) to a Prefect server until interrupted.")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"deployments to serve: {', '.join(NAMES)} "
                                                                 "(default: all)")
    parser.add_argument("--api-url", default=os.environ.get("PREFECT_API_URL"),
                        help="the Prefect server's API, e.g. http://127.0.0.1:4200/api (default: $PREFECT_API_URL)")
    parser.add_argument("--limit", type=int, help="most flow runs at once (default: no limit)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(NAMES))
    if unknown:
        parser.error(f"unknown deployment(s) {unknown}; known: {', '.join(NAMES)}")
    if not args.api_url:
        sys.exit("error: serving needs a Prefect server: start one with 'prefect server start --host 127.0.0.1' "
                 "and pass --api-url http://127.0.0.1:4200/api (or set PREFECT_API_URL)")
    # paser's offline Prefect settings, the server's address, and no hub download at run time; set
    # before Prefect is imported, which reads them once
    from paser.cli.app import offline_defaults
    from paser.flows import start

    os.environ["PREFECT_API_URL"] = args.api_url
    offline_defaults()
    start()
    from prefect import serve

    serve(*deployments(args.names), limit=args.limit, print_starting_message=True)


if __name__ == "__main__":
    main()
