"""Adaptive allocation (``--method adaptive``): the budget spent in rounds of recovery, each round's
cluster shares moved towards the clusters whose gap to the dense model remains.

The selection run plans the rounds (``rounds.json``); recovery (``paser recover`` on its
selected.jsonl) trains them and draws each next round as it goes:

- a probe of ``probe_per_cluster`` records per cluster (seeded), drawn from the pool and never
  trained on, measures each cluster's gap: the mean response NLL of the model minus the dense
  model's on its probe records;
- the budget is split into ``rounds`` equal parts (in its unit, records or tokens); round r draws
  records not drawn before, uniformly at random inside each cluster, the clusters' parts of the
  round in proportion to their shares; the first shares are the clusters' sizes (stratified);
- after round r, rho_k = (gap of the adapted model) / (gap of the pruned model) on cluster k's probe,
  the share of its gap that remains (clipped to [0, 2]), and the shares become

      s_k <- s_k x exp(step x (rho_k - sum_j s_j rho_j)),  at least floor x (k's size share), sum 1

  so a cluster whose gap closes more slowly than the others gets more of the next round (the
  multiplicative update of Sheared-LLaMA's dynamic batch loading, on the remaining gap). If no gap
  changes, or at step 0, every round draws with the first shares: the static schedule.

Each round trains its records for the recipe's epochs, with one learning-rate schedule and one
optimizer over all rounds, so the run has the tokens and steps of a static subset of the budget.

    python -c "from paser.selection.adaptive import update_shares; import numpy as np; \
print(update_shares(np.array([.5, .5]), np.array([.5, .5]), np.array([.9, .3]), 1.0, 0.25))"
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from paser.seeds import derived_seed
from paser.selection.allocation import allocate_budget
from paser.selection.budget import record_tokens
from paser.selection.configs import AdaptiveConfig, SampleConfig
from paser.selection.selector import StratifiedSelector

PLAN = "rounds.json"


def update_shares(shares: np.ndarray, base: np.ndarray, rho: np.ndarray, step: float, floor: float) -> np.ndarray:
    """The next round's shares from the current ``shares``, each cluster's remaining share of its
    gap ``rho`` and the size shares ``base`` (see the module docstring)."""
    shares, base, rho = (np.asarray(a, dtype=float) for a in (shares, base, rho))
    factor = np.exp(step * (rho - float(shares @ rho)))
    if np.all(factor == factor[0]):  # no cluster moves against another (step 0, or equal gaps): exactly as they are
        return shares.copy()
    moved = shares * factor
    lowest = floor * base
    fixed = np.zeros(len(moved), dtype=bool)
    while True:  # clusters below their floor are held at it; the others share the rest as they moved
        if fixed.all():  # floor 1: every cluster at its size share
            return lowest / lowest.sum()
        out = np.where(fixed, lowest, moved * (1.0 - lowest[fixed].sum()) / moved[~fixed].sum())
        under = ~fixed & (out < lowest)
        if not under.any():
            return out
        fixed |= under


RHO_MAX = 2.0  # a cluster the training made worse than pruning did counts as at most twice its gap


def remaining_gap(model_nll: np.ndarray, dense_nll: np.ndarray, pruned_nll: np.ndarray) -> np.ndarray:
    """rho per cluster: (model - dense) / (pruned - dense) on its probe, clipped to [0, RHO_MAX] (below
    the dense model nothing remains; a near-zero gap must not make the ratio explode); 0 where
    pruning did not hurt."""
    gap = np.asarray(pruned_nll, dtype=float) - np.asarray(dense_nll, dtype=float)
    left = np.asarray(model_nll, dtype=float) - np.asarray(dense_nll, dtype=float)
    rho = np.where(gap > 1e-9, left / np.where(gap > 1e-9, gap, 1.0), 0.0)
    return np.where(np.isnan(rho), rho, np.clip(rho, 0.0, RHO_MAX))


def draw_round(table: pd.DataFrame, shares, amount: int, unit: str, exclude: set[str], seed: int):
    """One round's draw (a ``SelectionResult`` over the candidates): records of ``table`` (id,
    cluster, n_prompt, n_response) outside ``exclude``, ``amount`` records or tokens split over the
    clusters by ``shares``, drawn uniformly at random inside each (seeded)."""
    candidates = table[~table["id"].isin(exclude)].reset_index(drop=True)
    if candidates.empty:
        raise ValueError("no record is left to draw: the pool is smaller than the budget and the probe")
    budget = f"{amount}tok" if unit == "tokens" else amount
    selector = StratifiedSelector(budget, SampleConfig.uniform(), random_state=seed, shares=shares)
    return selector.fit(candidates.assign(jsd=np.nan)).result_


def round_seed(seed: int, round_index: int) -> int:
    """The sampling seed of round ``round_index`` (0-based) of a run seeded ``seed``."""
    return derived_seed(seed, round_index)


def round_amounts(total: int, rounds: int) -> list[int]:
    """``total`` split into ``rounds`` parts as equal as integers allow (the first ones larger)."""
    return [total // rounds + (1 if r < total % rounds else 0) for r in range(rounds)]


def make_plan(run: Path | None, table: pd.DataFrame, budget: int, unit: str, config: AdaptiveConfig, seed: int) -> dict:
    """The rounds' plan for the pool ``table`` (id, cluster, n_prompt, n_response) of the run folder
    ``run``: the probe ids, each round's amount, the size shares, the settings, and the fingerprints
    of the records and clusters it was made from (None without a run folder)."""
    rng = np.random.default_rng(seed)
    labels = table["cluster"].to_numpy()
    k = int(labels.max()) + 1
    probe = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        take = min(config.probe_per_cluster, max(0, len(members) - 1))  # leave every cluster a record to draw
        probe += table["id"].iloc[np.sort(rng.choice(members, take, replace=False))].tolist() if take else []
    cost = record_tokens(table) if unit == "tokens" else np.ones(len(table), dtype=np.int64)
    outside = ~table["id"].isin(set(probe)).to_numpy()
    size = np.bincount(labels[outside], weights=cost[outside], minlength=k)
    base = size / size.sum()
    room = int(cost[outside].sum())
    if budget > room:
        raise ValueError(f"the budget of {budget} {unit} is above the {room} {unit} left outside the probe")
    made_from = {name: (run / f"{name}.fp").read_text() if run is not None and (run / f"{name}.fp").is_file()
                 else None for name in ("pool.parquet", "clusters.parquet")}
    return {"settings": asdict(config), "budget": int(budget), "unit": unit, "seed": int(seed),
            "amounts": round_amounts(int(budget), config.rounds), "base_shares": base.tolist(),
            "probe": probe, "clusters": k, "run": str(Path(run).resolve()) if run is not None else None,
            "made_from": made_from}


def plan_path(data: str | Path) -> Path | None:
    """Where the rounds' plan of a selection file sits: ``rounds.json`` beside ``selected.jsonl``
    (``X.rounds.json`` beside a copy named ``X.selected.jsonl``); None for other files."""
    path = Path(data)
    if not path.name.endswith("selected.jsonl"):
        return None
    return path.with_name(path.name[:-len("selected.jsonl")] + PLAN)


def read_plan(data: str | Path) -> dict | None:
    """The rounds' plan of the adaptive selection whose selected.jsonl is ``data``, or None. A plan
    whose run folder's records or clusters changed since is refused."""
    path = plan_path(data)
    if path is None or not path.is_file():
        return None
    plan = json.loads(path.read_text())
    run = Path(plan["run"])
    now = {name: (run / f"{name}.fp").read_text() if (run / f"{name}.fp").is_file() else None
           for name in ("pool.parquet", "clusters.parquet")}
    if now != plan["made_from"]:
        raise ValueError(f"{path}: its run folder {run} holds other records or clusters now; select again")
    return plan


def round_steps(amounts: list[int], per_epoch: int) -> list[int]:
    """The optimizer steps per epoch of each round: ``per_epoch`` (a static subset's, for the whole
    budget) split over the rounds in proportion to their amounts (largest remainder, at least one each)."""
    steps = allocate_budget(np.asarray(amounts, dtype=float), np.full(len(amounts), per_epoch), per_epoch)
    return [max(1, int(s)) for s in steps]

