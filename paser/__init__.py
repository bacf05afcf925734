"""paser: select the instruction samples that repair what pruning broke, and recover the model.

The Python API mirrors the CLI, one shape for every verb (``paser.api``): ``paser.select(config,
**overrides)`` is ``paser select``, and so are ``prune``, ``recover``, ``evaluate``, ``compare`` and ``run``;
each runs in this process and returns a small result (its folder, figures and compute). The selection's
estimators (scikit-learn style: ``fit`` returns the estimator, learned attributes end in ``_``)
are here for notebooks.

The names below are imported when first used, so that ``import paser`` (and every ``paser``
command, every worker process) does not load torch, scikit-learn and the trainer before it needs them.
"""

from paser.lazy import lazy_names

__version__ = "0.1.0"

_HOMES = {
    **{name: "paser.api" for name in ("select", "prune", "recover", "evaluate", "compare", "run", "SelectResult",
                                      "EvalResult", "RunResult")},
    "PruneResult": "paser.models.pruning", "RecoveryResult": "paser.recovery", "CompareResult": "paser.comparison",
    "PaserError": "paser.errors",
    "load_model": "paser.models.load", "load_pair": "paser.models.load",
    "PruneConfig": "paser.models.config",
    "SpectralClusterer": "paser.selection.clustering",
    "DiffusionMap": "paser.selection.manifold",
    "Selector": "paser.selection.selector", "StratifiedSelector": "paser.selection.selector",
}
__all__ = [*sorted(_HOMES), "__version__"]


__getattr__, __dir__ = lazy_names(__name__, _HOMES)
