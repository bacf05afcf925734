"""The ``paser`` application: the Typer app, its global options, and the one way every command runs
(its flow or the library) and fails (one line, status 2).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from paser.errors import PaserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Select the instruction samples that repair a pruned LLM, and recover it.")
T = TypeVar("T")


def offline_defaults() -> None:
    # paser never downloads at run time; a missing local file should fail fast, not hang on a hub.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")


def fail(err: Exception) -> typer.Exit:
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


def quiet_flows() -> None:
    """Errors the user can fix reach the terminal as one line, not as Prefect's tracebacks."""
    from flows import configure_prefect, hide_user_errors

    configure_prefect()
    import prefect.main  # noqa: F401  (sets up Prefect's logging handlers)

    hide_user_errors()


def dispatch(flow: bool, direct: Callable[[], T] | None, flowed: Callable[[], T]) -> T:
    """Every command's one way to run: through its Prefect flow (``flowed``) or the library
    (``direct``; None for a command that is a flow); an error the user can fix ends the command
    with one line and status 2."""
    offline_defaults()
    try:
        if flow:
            quiet_flows()
            return flowed()
        return direct()
    except (PaserError, ValueError) as err:
        if os.environ.get("PASER_DEBUG"):  # paser --debug: the whole traceback
            raise
        raise fail(err) from None


@app.callback()
def _group(debug: Annotated[bool, typer.Option("--debug", help="Show Prefect's full logs, tracebacks of "
                                                                "input errors included.")] = False,
           quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No stage names and no progress bars; "
                                                                    "results and errors only.")] = False) -> None:
    """Select the instruction samples that repair a pruned LLM, and recover it."""
    from paser.progress import library_bars, set_quiet

    if debug:
        os.environ["PASER_DEBUG"] = "1"
    set_quiet(quiet)
    library_bars()


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except PaserError as err:
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        sys.exit(2)

