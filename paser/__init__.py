"""paser: select the instruction samples that repair what pruning broke, and recover the model.

The Python API mirrors the CLI: ``paser.select(...)`` is ``paser select``, ``paser.prune(...)``
is ``paser prune``, ``paser.compare(...)`` is ``paser compare``; ``paser.recovery.recover`` and
``paser.evaluation.evaluate`` are ``paser recover`` and ``paser evaluate``. The selection's
estimators (scikit-learn style: ``fit`` returns the estimator, learned attributes end in ``_``)
are here for notebooks.
"""

from paser.api import select
from paser.comparison import CompareResult, compare
from paser.errors import PaserError
from paser.models.load import load_model, load_pair
from paser.models.pruning import PruneConfig, prune
from paser.selection.clustering import SpectralClusterer
from paser.selection.manifold import DiffusionMap
from paser.selection.selector import Selector, StratifiedSelector

__version__ = "0.1.0"
__all__ = ["CompareResult", "DiffusionMap", "PaserError", "PruneConfig", "Selector", "SpectralClusterer",
           "StratifiedSelector", "compare", "load_model", "load_pair", "prune", "select", "__version__"]
