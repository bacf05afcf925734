"""Prefect flows that run paser's recipes as tasks (``paser COMMAND --flow``, the deployments in
the repository's ``flows/``). No algorithm lives here, and importing them changes nothing in the
environment: whoever starts a flow calls ``start()`` first (``paser.api`` does).

``configure_prefect()`` applies the offline settings paser needs before Prefect is imported:
a private ``PREFECT_HOME``, analytics off (otherwise every run prints a harmless "database is
locked" traceback), and a longer start-up timeout for the temporary API server on small machines.
Values the user has set are kept.

``hide_user_errors()`` keeps Prefect's console quiet about errors the user can fix (a
``PaserError``: the CLI prints those as one line) while bugs keep their tracebacks; the server and
its UI still get every log. ``PASER_DEBUG=1`` (``paser --debug``) shows everything.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from paser.cache import cache_dir
from paser.errors import PaserError


def configure_prefect(home: str | Path | None = None) -> None:
    defaults = {
        "PREFECT_HOME": str(home or cache_dir() / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    # Prefect keeps its SQLite database here and fails at start-up if the folder is missing
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)


@functools.cache
def _user_error_names() -> frozenset[str]:
    names, todo = set(), [PaserError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return frozenset(names)


class HideUserErrors(logging.Filter):
    """Drops console records about a ``PaserError``: its traceback, and the task and flow
    "failed with DataError: ..." lines that repeat the one line the CLI prints."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PaserError):
            return False
        text = record.getMessage()
        return not any(f"exception {n}" in text or f": {n}(" in text for n in _user_error_names())


def hide_user_errors() -> None:
    """Put ``HideUserErrors`` on the console handlers Prefect set up (not on the API handler that
    feeds the server), unless ``PASER_DEBUG`` is set."""
    if os.environ.get("PASER_DEBUG"):
        return
    loggers = [logging.getLogger(name) for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs")]
    for handler in {h for logger in loggers for h in logger.handlers}:
        if isinstance(handler, logging.StreamHandler) and not any(isinstance(f, HideUserErrors)
                                                                  for f in handler.filters):
            handler.addFilter(HideUserErrors())


def start() -> None:
    """Before a flow runs in this process: paser's Prefect settings, Prefect's logging set up, and
    errors the user can fix kept to one line (``hide_user_errors``)."""
    configure_prefect()
    import prefect.main  # noqa: F401  (sets up Prefect's logging handlers)

    hide_user_errors()
