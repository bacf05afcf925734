"""The ``paser`` application: the Typer app, its global options, and the one way every command runs
(``paser.api``'s verb) and fails (one line, status 2).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from paser.errors import PaserError
from paser.progress import library_bars, set_quiet

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


def dispatch(call: Callable[[], T]) -> T:
    """Every command's one way to run: ``call`` (its verb of ``paser.api``), offline; an error the
    user can fix ends the command with one line and status 2."""
    offline_defaults()
    try:
        return call()
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
    if debug:
        os.environ["PASER_DEBUG"] = "1"
    set_quiet(quiet)
    library_bars()


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except PaserError as err:
        if os.environ.get("PASER_DEBUG"):  # paser --debug: where it was raised, then the line
            traceback.print_exc()
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        sys.exit(2)

