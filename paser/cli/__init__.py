"""The ``paser`` command line: a thin face over the Python API, its options built from the stage
configs (``paser.cli.options``), one module per command group (``paser.cli.commands``).

    paser select                      # the embedded default
    paser select --data pool.json --dense DENSE --pruned PRUNED --budget 0.2 --out runs/x
    paser prune smollm2-135m-instruct --ratio 0.25 --out runs/smollm2-pruned-25

Errors a user can fix (``PaserError``) print one line and exit with status 2; no traceback.
"""

from paser.cli import commands  # noqa: F401  (registers every command on the app)
from paser.cli.app import app, main

__all__ = ["app", "main"]
