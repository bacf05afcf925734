"""paser: select the instruction samples that repair what pruning broke, and recover the model.

The Python API mirrors the CLI: ``paser.select(...)`` is ``paser select``, ``paser.prune(...)`` is
``paser prune``.
"""

from paser.api import select
from paser.errors import PaserError
from paser.models import load_model, load_pair
from paser.pruning import PruneConfig, prune

__version__ = "0.1.0"
__all__ = ["PaserError", "PruneConfig", "load_model", "load_pair", "prune", "select", "__version__"]
