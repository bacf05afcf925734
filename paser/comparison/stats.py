"""The comparison's statistics: an arm's metric built from its items, the paired bootstrap of a
difference between arms over those items, and the verdict rule.

Every metric is a mean over groups of a ratio of sums over the group's items: the lm-eval tasks
(items scored 0 or 1; the mean over tasks is the seven-task mean), the suite's families (answer
NLL per record; the macro average), or one group of held-out records (NLL summed over tokens,
divided by the tokens). The bootstrap resamples items within each group, the same draw for every
arm (paired), so what two arms share (the items' difficulty) cancels from their difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from paser.errors import DataError


@dataclass
class Group:
    """One group of items: per arm the numerators (arms x items) and the shared denominators."""

    name: str
    values: np.ndarray
    weights: np.ndarray


def groups(rows: list[dict], metric: str, tasks: list[str] | None = None) -> list[Group]:
    """The metric's groups over ``rows`` (one row per arm), items aligned across arms."""
    if metric == "zeroshot":
        names = tasks or sorted(rows[0]["zeroshot"]["tasks"])
        out = []
        for task in names:
            found = [r["zeroshot"]["tasks"].get(task) for r in rows]
            if any(f is None for f in found):
                raise DataError(f"task {task}: not scored for arm(s) "
                                f"{[r['arm'] for r, f in zip(rows, found) if f is None]}")
            _same_items([f["items"]["doc_id"] for f in found], rows, task)
            values = np.array([f["items"][f["metric"]] for f in found], dtype=float)
            out.append(Group(task, values, np.ones(values.shape[1])))
        return out
    if metric == "heldout_nll":
        _same_items([r["heldout"]["per_record"].get("id") for r in rows], rows, "held-out records")
        values = np.array([r["heldout"]["per_record"]["nll_sum"] for r in rows], dtype=float)
        return [Group("held-out", values, np.asarray(rows[0]["heldout"]["per_record"]["tokens"], dtype=float))]
    if metric == "suite_nll":
        _same_items([r["suite"]["per_record"].get("id") for r in rows], rows, "suite records")
        families = np.array(rows[0]["suite"]["per_record"]["family"])
        values = np.array([r["suite"]["per_record"]["nll"] for r in rows], dtype=float)
        return [Group(f, values[:, families == f], np.ones(int((families == f).sum()))) for f in sorted(set(families))]
    raise ValueError(f"unknown metric {metric!r}")


def _same_items(ids: list, rows: list[dict], what: str) -> None:
    """Every arm scored the same items in the same order (rows without item ids are taken as
    they are)."""
    for row, found in zip(rows[1:], ids[1:]):
        if found is None or ids[0] is None:
            continue
        if list(found) != list(ids[0]):
            raise DataError(f"{what}: arm {row['arm']} was scored on other items than {rows[0]['arm']}; "
                            "paired intervals need the same items")


def metric_value(gs: list[Group]) -> np.ndarray:
    """The metric of every arm: the mean over groups of sum(values) / sum(weights)."""
    return np.mean([g.values.sum(1) / g.weights.sum() for g in gs], axis=0)


def group_values(gs: list[Group]) -> np.ndarray:
    """Each arm's value in each group (arms x groups)."""
    return np.stack([g.values.sum(1) / g.weights.sum() for g in gs], axis=1)


def paired_bootstrap(gs: list[Group], first: int, draws: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of (mean of arms [0, first)) - (mean of arms [first, end)) in the
    metric, resampling every group's items with replacement, the same draw for every arm. Each
    draw takes ``rng.integers`` indices group after group (the order the recovery experiments'
    intervals were drawn in, so their committed figures are this function's)."""
    rng = np.random.default_rng(seed)
    diffs = np.empty(draws)
    sizes = [g.weights.shape[0] for g in gs]
    for d in range(draws):
        per_arm = 0.0
        for g, n in zip(gs, sizes):
            idx = rng.integers(0, n, n)
            per_arm = per_arm + g.values[:, idx].sum(1) / g.weights[idx].sum()
        per_arm = per_arm / len(gs)
        diffs[d] = per_arm[:first].mean() - per_arm[first:].mean()
    return _percentiles(diffs, level)


def _percentiles(diffs: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    return float(lo), float(hi)


def group_bootstrap(gs: list[Group], first: int, draws: int = 2000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """The same difference's interval resampling the groups (tasks, families) instead of items."""
    per_group = group_values(gs)
    diff = per_group[:first].mean(0) - per_group[first:].mean(0)
    rng = np.random.default_rng(seed)
    return _percentiles(diff[rng.integers(0, len(diff), (draws, len(diff)))].mean(1), level)


def place(value: float, randoms: list[float], higher_is_better: bool) -> str:
    """Where ``value`` lies against the random subsets' values."""
    better = (lambda a, b: a > b) if higher_is_better else (lambda a, b: a < b)
    if all(better(value, r) for r in randoms):
        return "better than all"
    if all(better(r, value) for r in randoms):
        return "worse than all"
    return "inside"


def verdict(value: float, randoms: list[float], interval: tuple[float, float], higher_is_better: bool) -> str:
    """The registered rule: *beats random* when better than every random subset with the paired
    interval of the difference excluding zero on the better side; *loses* when worse than every
    one with the interval excluding zero on the worse side; *level* otherwise."""
    lo, hi = interval
    where = place(value, randoms, higher_is_better)
    above, below = lo > 0, hi < 0
    if where == "better than all" and (above if higher_is_better else below):
        return "beats random"
    if where == "worse than all" and (below if higher_is_better else above):
        return "loses"
    return "level"
