"""Prefect flows that run paser's stages as tasks. No algorithm lives here.

``configure_prefect()`` applies the offline settings paser needs before Prefect is imported:
a private ``PREFECT_HOME``, analytics off (otherwise every run prints a harmless "database is
locked" traceback), and a longer start-up timeout for the temporary API server on small machines.
Values the user has set are kept.
"""

from __future__ import annotations

import os
from pathlib import Path


def configure_prefect(home: str | Path | None = None) -> None:
    from paser.models import cache_dir

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
