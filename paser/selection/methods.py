"""Selection methods as objects, in one registry: ``--method NAME`` is ``method_of(NAME)``.

A method tells the pipeline what it needs and picks the records:

- ``clusters``: whether it needs the instruction embeddings and the capability clusters (the
  embed and cluster stages run);
- ``scores(settings)``: which records degradation scoring must cover: ``"all"``, ``"sample"``
  (``score.per_cluster`` records of each cluster) or ``"none"`` (no model is loaded);
- ``configure(settings)``: the stage options it implies, set when the settings are built, so
  that fingerprints and the report see them (an ablation is a configuration of PASER);
- how it picks: a ``ClusteredMethod`` returns a ``SelectionResult`` over the selection table
  (cluster, degradation, tokens and concepts per record); an ``OrderedMethod`` (the baselines)
  returns the order in which records are taken while the next one fits the budget.

Adding a method is a subclass in its own module and ``register(TheMethod())``; the pipeline,
the report and the settings only ever ask the registered object. Method names are compared in
this module alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from paser.errors import ConfigError
from paser.selection.adaptive import PLAN, draw_round, make_plan, round_seed
from paser.selection.budget import parse_budget, record_tokens
from paser.selection.selector import SelectionResult, Selector, StratifiedSelector


class Method:
    """What every method declares; subclass ``ClusteredMethod`` or ``OrderedMethod``."""

    name: str = ""
    clusters: bool = True
    """Needs embeddings and clusters (the embed and cluster stages run)."""
    trains_in_rounds: bool = False
    """Its subset is trained in rounds by a recovery of its own (adaptive), not in one."""

    def scores(self, settings) -> str:
        """The records degradation scoring covers for ``settings``: "all", "sample" or "none"."""
        return "all"

    def configure(self, settings) -> None:
        """Set the stage options this method implies (called once, when the settings are built)."""

    def describe(self, settings) -> str:
        """How the method picks, one line for the report."""
        return ""


class ClusteredMethod(Method):
    """A method over the capability clusters: ``pick`` gets the selection table (id, cluster,
    n_prompt, n_response, the degradation signals, concepts)."""

    filter_name = "concept filter"
    rejection_columns = ("conflicting concepts",)
    """The report's columns on a rejected record, after its id and cluster."""

    def rejection_cells(self, row) -> list[str]:
        """The report's cells on a rejected record (a row of scores.parquet)."""
        return [f"{row.conflict_a} / {row.conflict_b}"]

    def uses_embeddings(self, settings) -> bool:
        """Whether ``pick`` compares records by their instruction embeddings."""
        return False

    def pick(self, settings, table: pd.DataFrame, budget, embeddings: np.ndarray | None = None,
             run: Path | None = None) -> SelectionResult:
        """The selection over ``table`` at ``budget``. ``run``: the run folder, for what a method
        keeps for later stages (adaptive's rounds plan); None writes nothing."""
        raise NotImplementedError

    def summary(self, settings, run: Path) -> dict:
        """Keys this method adds to clusters.json."""
        return {}


class OrderedMethod(Method):
    """A baseline: records taken in ``order`` while the next one fits the budget (records or
    tokens); no clusters."""

    clusters = False
    how = ""
    """What the order is, for the report ({seed} is replaced by the run's seed)."""
    takes_all = False
    """Takes every record whatever the budget."""

    def scores(self, settings) -> str:
        return "none"

    def order(self, settings, table: pd.DataFrame) -> np.ndarray:
        """Row indices of ``table`` (id, n_prompt, n_response, n_tokens, response_chars, and the
        degradation columns when the method scores) in the order they are taken; rows left out are
        never taken."""
        raise NotImplementedError

    def describe(self, settings) -> str:
        return self.how.format(seed=settings.select.seed)


class Paser(ClusteredMethod):
    """PASER: CDS-proportional allocation, IES order inside clusters, the concept filter.
    Its ablations are the same method with one option changed."""

    def __init__(self, name: str = "paser", order: str = "ies", section: str | None = None,
                 option: str | None = None, value=None):
        self.name, self.order, self.fixed = name, order, (section, option, value)

    def configure(self, settings) -> None:
        section, option, value = self.fixed
        if section is not None:
            setattr(getattr(settings, section), option, value)

    def pick(self, settings, table, budget, embeddings=None, run=None) -> SelectionResult:
        return Selector(budget, settings.allocate.method, use_concepts=settings.concepts.enabled, order=self.order,
                        random_state=settings.select.seed, signal=settings.score.signal).fit(table).result_


class Strat(ClusteredMethod):
    """Tempered stratified selection (the ``sample`` section, paser.selection.stratified)."""

    name = "strat"
    filter_name = "near-duplicate filter"
    rejection_columns = ("why", "near-duplicate of")

    def rejection_cells(self, row) -> list[str]:
        return [row.reason, row.conflict_a]

    def scores(self, settings) -> str:
        sample = settings.sample
        if not (sample.needs_cds or sample.needs_every_score):
            return "none"
        return "sample" if settings.score.per_cluster is not None and not sample.needs_every_score else "all"

    def uses_embeddings(self, settings) -> bool:
        return settings.sample.dedup is not None

    def pick(self, settings, table, budget, embeddings=None, run=None) -> SelectionResult:
        return StratifiedSelector(budget, settings.sample, random_state=settings.select.seed,
                                  signal=settings.score.signal).fit(table, embeddings).result_

    def describe(self, settings) -> str:
        c, coverage = settings.sample, self.scores(settings)
        scored = {"all": "every record scored", "none": "no record scored",
                  "sample": f"CDS from {settings.score.per_cluster} scored records per cluster"}[coverage]
        return (f"cluster shares ~ size x (CDS / mean)^{c.cds_temperature:g}, records drawn ~ "
                f"(IES / cluster mean)^{c.ies_temperature:g}, near-duplicates "
                f"{'at cosine >= ' + format(c.dedup, 'g') if c.dedup is not None else 'kept'}; {scored}")


class Adaptive(ClusteredMethod):
    """The budget in rounds of recovery (the ``adaptive`` section, paser.selection.adaptive):
    selection plans the rounds and draws the first; ``paser recover`` draws the rest from the gaps
    that remain. Scores nothing: it measures its gaps in recovery."""

    name = "adaptive"
    trains_in_rounds = True

    def scores(self, settings) -> str:
        return "none"

    def pick(self, settings, table, budget, embeddings=None, run=None) -> SelectionResult:
        """The first round's draw over every record, probe records marked so; with ``run``, the
        rounds' plan is written there (rounds.json)."""
        parsed, seed = parse_budget(budget), settings.select.seed
        tokens = int(record_tokens(table).sum()) if parsed.tokens else None
        try:
            amount = parsed.resolve(len(table), tokens)
            plan = make_plan(run, table, amount, parsed.unit, settings.adaptive, seed)
            result = draw_round(table, plan["base_shares"], plan["amounts"][0], parsed.unit, set(plan["probe"]),
                                round_seed(seed, 0))
        except ValueError as err:
            raise ConfigError(f"{run or 'adaptive selection'}: {err}") from None
        probe = table[table["id"].isin(set(plan["probe"]))].assign(
            n_tokens=record_tokens, ies=np.nan, status="probe",
            reason="probe of the adaptive rounds (never trained on)", rank=0, conflict_a="", conflict_b="")
        result.table = pd.concat([result.table, probe[result.table.columns]], ignore_index=True).set_index(
            "id").loc[table["id"]].reset_index()
        if run is not None:
            (run / PLAN).write_text(json.dumps(plan, indent=2))
        return result

    def summary(self, settings, run: Path) -> dict:
        plan = json.loads((run / PLAN).read_text())
        return {"rounds": {"rounds": len(plan["amounts"]), "budget": plan["budget"], "unit": plan["unit"],
                           "amounts": plan["amounts"], "probe_records": len(plan["probe"])}}

    def describe(self, settings) -> str:
        a = settings.adaptive
        return (f"the budget in {a.rounds} rounds of recovery, this selection being the first (sizes' shares); "
                f"later rounds drawn by `paser recover` from the gaps left on a probe of {a.probe_per_cluster} "
                f"records per cluster (step {a.step:g}, floor {a.floor:g}; rounds.json)")


class Full(OrderedMethod):
    name, how, takes_all = "full", "every record", True

    def order(self, settings, table):
        return np.arange(len(table))


class RandomOrder(OrderedMethod):
    name, how = "random", "records drawn at random (seed {seed}) while the next one fits the budget"

    def order(self, settings, table):
        return np.random.default_rng(settings.select.seed).permutation(len(table))


class Longest(OrderedMethod):
    name = "longest"
    how = ("the records with the most response tokens (then the longest response text) first, while the next one "
           "fits the budget")

    def order(self, settings, table):
        return np.lexsort((np.arange(len(table)), -table["response_chars"].to_numpy(), -table["n_response"].to_numpy()))


class Shortest(OrderedMethod):
    name, how = "shortest", "the records with the fewest tokens first, while the next one fits the budget"

    def order(self, settings, table):
        return np.lexsort((np.arange(len(table)), table["n_tokens"].to_numpy()))


class PrunedLoss(OrderedMethod):
    name = "pruned_loss"
    how = ("the records with the highest mean response NLL under the pruned model first, while the next one fits "
           "the budget")

    def scores(self, settings) -> str:
        return "all"

    def order(self, settings, table):
        nll = table["nll_pruned"].to_numpy(dtype=float)
        scored = np.flatnonzero(np.isfinite(nll))  # a record without scored tokens is never taken
        return scored[np.lexsort((scored, -nll[scored]))]


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry under ``method.name`` (a name taken is refused)."""
    if not method.name or method.name in METHODS:
        raise ValueError(f"a selection method needs a name not yet registered, got {method.name!r}")
    if isinstance(method, ClusteredMethod) == isinstance(method, OrderedMethod):
        raise TypeError(f"{method.name}: subclass ClusteredMethod or OrderedMethod")
    METHODS[method.name] = method
    return method


def method_of(name: str) -> Method:
    """The registered method called ``name``; a KeyError names the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown selection method {name!r}; known: {', '.join(METHODS)}") from None


for _method in (
    Paser(),
    # the ablations: PASER with one stage changed
    Paser("uniform", section="allocate", option="method", value="uniform"),  # allocation by size
    Paser("random_order", order="random"),  # a seeded random order inside clusters instead of IES
    Paser("no_cost", order="signal"),  # degradation order: IES without its compute-cost term
    Paser("no_ccg", section="concepts", option="enabled", value=False),  # no concept filter
    Paser("kmeans", section="cluster", option="method", value="kmeans"),  # k-means clusters, not NMF
    Strat(), Adaptive(), RandomOrder(), Full(), Longest(), Shortest(), PrunedLoss(),
):
    register(_method)
