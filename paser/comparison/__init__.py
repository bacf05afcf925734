"""``paser compare``: does selection pay on this model, at this budget? Arms (random subsets, paser's
selections, the whole pool, the pruned and dense models, recovery variants and seeds, random
subsets at another arm's total compute) trained with one recipe, evaluated alike, and judged
against the random subsets with paired intervals over items and a rule fixed before the runs.

    paser compare --config configs/compare/smoke.yaml
    python -c "import paser; print(paser.compare('configs/compare/smoke.yaml').summary)"

The recipe is ``STAGES`` (paser.comparison.recipe): the in-process run and the Prefect flow
(paser/flows/compare.py) both walk it, calling the same functions.
"""

from paser.lazy import lazy_names

_HOMES = {
    "STAGES": "paser.comparison.recipe",
    "CompareResult": "paser.comparison.recipe",
    "compare": "paser.comparison.recipe",
    "finish": "paser.comparison.recipe",
    "run_one": "paser.comparison.recipe",
    "Arm": "paser.comparison.arms",
    "parse_arm": "paser.comparison.arms",
    "parse_arms": "paser.comparison.arms",
    "CompareConfig": "paser.comparison.config",
    "prepare": "paser.comparison.runner",
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_names(__name__, _HOMES)
