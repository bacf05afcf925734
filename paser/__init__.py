"""paser: select the instruction samples that repair what pruning broke, and recover the model.

The Python API mirrors the CLI: ``paser.select(...)`` is ``paser select``, ``paser.prune(...)``
is ``paser prune``, ``paser.recover(...)`` is ``paser recover``, ``paser.evaluate(...)`` is
``paser evaluate``, ``paser.compare(...)`` is ``paser compare``. The selection's
estimators (scikit-learn style: ``fit`` returns the estimator, learned attributes end in ``_``)
are here for notebooks.

The names below are imported when first used, so that ``import paser`` (and every ``paser``
command, every worker process) does not load torch, scikit-learn and the trainer before it needs them.
"""

import importlib

__version__ = "0.1.0"

_HOMES = {
    "select": "paser.api",
    "recover": "paser.recovery", "RecoveryResult": "paser.recovery",
    "evaluate": "paser.evaluation",
    "CompareResult": "paser.comparison", "compare": "paser.comparison",
    "PaserError": "paser.errors",
    "load_model": "paser.models.load", "load_pair": "paser.models.load",
    "PruneConfig": "paser.models.pruning", "prune": "paser.models.pruning",
    "SpectralClusterer": "paser.selection.clustering",
    "DiffusionMap": "paser.selection.manifold",
    "Selector": "paser.selection.selector", "StratifiedSelector": "paser.selection.selector",
}
__all__ = [*sorted(_HOMES), "__version__"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'paser' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
