"""The arms of a comparison: what each one trains on and how, parsed once from its name.

An arm's name is written

    none | dense | BUDGET:METHOD[-CONFIG][-SEED][@OBJECTIVE][#RSEED][=TARGET]

``none`` is the pruned model as it is, ``dense`` the model before pruning. Every other arm
selects a subset of the pool at budget ``BUDGET`` (a key of the config's ``budgets``) with a
selection method of ``paser select`` (``random-3`` is random subset 3, ``strat-c1i0d`` tempered
stratified selection at CDS temperature 1, IES temperature 0, near-duplicates at 0.95; ``full``
takes the whole pool), then recovers the pruned model on it with the comparison's one recipe,
varied by ``@OBJECTIVE`` (``distill``, ``distill-jsd``, ``distill-tN``, ``tokw``) and
retrained with recovery seed ``#RSEED``. ``BUDGET:random-K=METHOD`` is random subset K trained
at the total compute (selection + recovery, by the ledgers) that ``BUDGET:METHOD`` spent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from paser.errors import ConfigError
from paser.selection import methods


def arm_methods() -> list[str]:
    """The methods an arm may name: every registered selection method whose subset one recovery
    trains (``adaptive`` trains its rounds by a recovery of its own, not by the comparison's
    recipe), and ``loss_gap``, PASER with the loss-gap signal."""
    return [name for name, method in methods.METHODS.items() if not method.trains_in_rounds] + ["loss_gap"]

STRAT_PER_CLUSTER = 16
"""Records scored per cluster when a strat configuration needs CDS but not every record's IES."""
TOKW_STRENGTH = 0.5

_NAME = re.compile(r"(?P<budget>[A-Za-z0-9_.]+):(?P<method>[a-z_]+)(?:-(?P<config>c[0-9.]+i[0-9.]+d?))?"
                   r"(?:-(?P<seed>[0-9]+))?(?:@(?P<objective>[a-z0-9.-]+))?(?:#(?P<rseed>[0-9]+))?"
                   r"(?:=(?P<target>\S+))?")
GRAMMAR = "none, dense or BUDGET:METHOD[-cCiI[d]][-SEED][@OBJECTIVE][#RECOVERY_SEED][=TARGET_METHOD]"


@dataclass(frozen=True)
class Arm:
    """One arm, as parsed from its name (``parse_arm``)."""

    name: str
    method: str
    """none, dense, or a selection method of ``arm_methods()``."""
    budget: str | None = None
    """The key of the config's ``budgets`` (None for none and dense)."""
    strat: tuple[float, float, bool] | None = None
    """strat's (CDS temperature, IES temperature, near-duplicates at 0.95) from ``-cCiI[d]``; None:
    the sample section's defaults."""
    seed: int = 0
    """The selection seed (random subset K, a strat draw)."""
    objective: str | None = None
    """The recovery variant (``@OBJECTIVE``): distill (forward KL to the dense model, temperature 1),
    distill-jsd, distill-tN, tokw (token-weighted SFT, lambda 0.5, excess loss); None: the recipe."""
    recovery_seed: int = 0
    at_compute_of: str | None = None
    """For ``BUDGET:random-K=METHOD``: the arm ``BUDGET:METHOD`` whose total compute this one spends."""

    @property
    def reference(self) -> bool:
        """none and dense: evaluated, not trained."""
        return self.method in ("none", "dense")

    @property
    def subset_name(self) -> str:
        """The subset this arm trains on, shared by its recovery variants and seeds."""
        return self.name.split("@")[0].split("#")[0]

    @property
    def file(self) -> str:
        """A file name for the arm (its result is ``<file>.json``)."""
        return (self.name.replace(":", "-").replace("#", "-seed").replace("@", "-").replace("=", "-eq-"))

    @property
    def is_random(self) -> bool:
        """A plain random subset of its budget: one of the subsets the others are measured against."""
        return (self.method == "random" and self.objective is None and self.recovery_seed == 0
                and self.at_compute_of is None)

    def selection(self) -> dict:
        """The ``paser select`` sections that make this arm's subset (the budget is the runner's)."""
        method = "paser" if self.method == "loss_gap" else self.method
        sections: dict = {"select": {"method": method, "seed": self.seed},
                          "score": {"signal": "loss_gap" if self.method == "loss_gap" else "jsd"}}
        if self.method == "strat" and self.strat is not None:
            cds, ies, dedup = self.strat
            sections["sample"] = {"cds_temperature": cds, "ies_temperature": ies, "dedup": 0.95 if dedup else "off"}
            # CDS from a per-cluster sample when IES is not needed: the pool is not scored whole
            sections["score"]["per_cluster"] = STRAT_PER_CLUSTER if cds > 0 and ies == 0 else None
        return sections

    def recovery(self, dense: str) -> dict:
        """RecoverConfig fields that this arm changes in the comparison's recipe."""
        fields: dict = {"seed": self.recovery_seed}
        if self.objective is None:
            return fields
        name, *options = self.objective.split("-")
        if name == "tokw":
            return fields | {"token_weighting": TOKW_STRENGTH, "token_signal": "excess", "teacher": dense}
        fields |= {"objective": "distill", "teacher": dense}
        for option in options:
            if option == "jsd":
                fields["divergence"] = "jsd"
            else:
                fields["temperature"] = float(option[1:])
        return fields


def parse_arm(name: str, budgets: dict) -> Arm:
    """The Arm written ``name``; a ConfigError naming the arm and what is wrong otherwise."""
    if not isinstance(name, str):
        raise ConfigError(f"arm {name!r}: expected text ({GRAMMAR})")
    if name in ("none", "dense"):
        return Arm(name, name)
    found = _NAME.fullmatch(name)
    if found is None:
        raise ConfigError(f"arm {name!r}: not {GRAMMAR}")
    budget, method = found["budget"], found["method"]
    if budget not in budgets:
        raise ConfigError(f"arm {name!r}: budget {budget!r} is not one of the config's budgets {sorted(budgets)}")
    if method not in arm_methods():
        raise ConfigError(f"arm {name!r}: unknown method {method!r}; known: {', '.join(arm_methods())}")
    strat = None
    if found["config"]:
        if method != "strat":
            raise ConfigError(f"arm {name!r}: -cCiI configures strat, not {method}")
        cds, ies = re.fullmatch(r"c([0-9.]+)i([0-9.]+)d?", found["config"]).groups()
        strat = (float(cds), float(ies), found["config"].endswith("d"))
    objective = found["objective"]
    if objective is not None and not re.fullmatch(r"tokw|distill(-jsd|-t[0-9.]+)*", objective):
        raise ConfigError(f"arm {name!r}: unknown recovery variant @{objective} (distill, distill-jsd, distill-tN, "
                          "tokw)")
    target = None
    if found["target"]:
        if method != "random" or objective or found["rseed"]:
            raise ConfigError(f"arm {name!r}: only a plain random subset is trained at another arm's compute")
        target = parse_arm(f"{budget}:{found['target']}", budgets).name
    return Arm(name, method, budget, strat, int(found["seed"] or 0), objective, int(found["rseed"] or 0), target)


def parse_arms(names: list, budgets: dict) -> list[Arm]:
    """Every arm of a comparison, in order; references always included; names unique; an arm at
    another's compute needs that arm and its budget's random subsets among them."""
    arms = [parse_arm(n, budgets) for n in names]
    seen = [a.name for a in arms]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise ConfigError(f"arms: {twice} listed twice")
    for arm in arms:
        if arm.at_compute_of is None:
            continue
        if arm.at_compute_of not in seen:
            raise ConfigError(f"arm {arm.name!r}: trains at {arm.at_compute_of}'s compute, which is not an arm")
        if not any(a.is_random and a.budget == arm.budget for a in arms):
            raise ConfigError(f"arm {arm.name!r}: needs random subsets of budget {arm.budget!r} to measure "
                              f"{arm.at_compute_of}'s compute against")
    references = [Arm(n, n) for n in ("none", "dense") if n not in seen]
    return references + arms
