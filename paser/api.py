"""paser's verbs in Python, one shape: ``verb(config=None, **overrides)``, run in this process,
returning a small result. The CLI's commands call these same functions.

    import paser
    run = paser.select(budget="0.2tok", out="runs/select")                # SelectResult
    twin = paser.prune(model="smollm2-135m-instruct", ratio=0.25)          # PruneResult
    done = paser.recover(model=twin.out, data=run.out / "selected.jsonl")  # RecoveryResult
    seen = paser.evaluate(model=twin.out, adapter=done.out / "adapter")    # EvalResult
    whole = paser.run(budget="0.2tok", recover={"epochs": 1})             # RunResult: all of the above

``config`` is a YAML file with the command's sections. Each override is one of: the command's own
argument (a model, ``out``, ...); a section given whole (``embed={"batch_size": 8}``); or a key of
one of the command's sections (``epochs=2``): its main section's first (``select``, ``prune``,
``recover``, ``evaluate``, ``compare``; ``select`` for ``run``), else the one section that has it;
a key two sections share must be given inside its section. Overrides set to None keep the file's
value, as an option the CLI was not given. ``flow=True`` runs the command through its Prefect flow
(``paser.flows``) instead, with the same arguments; scoring or arms on Dask or Ray always go
through it.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from pathlib import Path

from paser.comparison.config import CompareConfig
from paser.config import SECTIONS, load_config, read_yaml, section_keys
from paser.data.prompts import PromptFormat
from paser.errors import ConfigError
from paser.evaluation.config import EvalConfig
from paser.flows import start
from paser.models.config import PruneConfig
from paser.recovery.config import RecoverConfig
from paser.selection.budget import parse_budget
from paser.selection.configs import STAGE_CONFIGS

if typing.TYPE_CHECKING:
    from paser.comparison.recipe import CompareResult
    from paser.models.pruning import PruneResult
    from paser.recovery.job import RecoveryResult


def split_overrides(command: str, overrides: dict, sections: dict[str, type], main: str,
                    arguments: dict) -> tuple[dict, dict]:
    """``overrides`` as (the command's arguments, ``arguments`` giving their defaults; its sections'
    ``{section: {key: value}}``, keys set to None left out). A required argument's default is ``...``."""
    given = dict(arguments)
    found: dict[str, dict] = {name: {} for name in sections}
    keys = {name: set(section_keys(cls)) - set(SECTIONS) for name, cls in sections.items()}
    for key, value in overrides.items():
        if key in arguments:
            given[key] = value
        elif key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"paser.{command}: {key}= takes a section's keys as a dict, e.g. "
                                  f"{key}={{...}}; got {value!r}")
            found[key] |= {k: v for k, v in value.items() if v is not None}
        else:
            owners = [main] if key in keys[main] else [name for name in sections if key in keys[name]]
            if len(owners) != 1:
                where = (f"a key of {' and '.join(owners)}: give it inside its section, e.g. {owners[0]}={{{key!r}: "
                         "...}" if owners else f"neither an argument ({', '.join(arguments)}) nor a key of "
                         f"{', '.join(sections)}")
                raise ConfigError(f"paser.{command}: {key!r} is {where}")
            if value is not None:
                found[owners[0]][key] = value
    missing = [name for name, value in given.items() if value is ...]
    if missing:
        raise ConfigError(f"paser.{command}: {', '.join(missing)} must be given")
    return given, found


def _path(value) -> str | None:
    return str(value) if value is not None else None


# ---------------------------------------------------------------- select


@dataclass
class SelectResult:
    """A selection's run folder (selected.jsonl, scores.parquet, clusters.json, manifest.json,
    report.md) and its figures."""

    out: Path
    records: int
    tokens: int
    budget: float | int
    budget_unit: str
    clusters: int | None  # K, for the methods that cluster
    method: str
    compute: dict  # paser.ledger's figures (Ledger.from_dict reads them back)

    @classmethod
    def read(cls, run: str | Path) -> SelectResult:
        run = Path(run)
        summary = json.loads((run / "clusters.json").read_text())
        return cls(out=run, records=summary["selected"], tokens=summary["selected_tokens"], budget=summary["budget"],
                   budget_unit=summary["budget_unit"], clusters=summary.get("K"), method=summary["method"],
                   compute=json.loads((run / "manifest.json").read_text())["compute"])


SELECT_SECTIONS = {"prompt": PromptFormat, **STAGE_CONFIGS}


def select(config: str | Path | None = None, *, flow: bool = False, **overrides) -> SelectResult:
    """Select the records that best repair the pruned model (PASER) and write the run folder.

    Every key of the ``select`` section can be given flat (``data``, ``dense``, ``pruned``,
    ``prune_ratio``, ``budget``, ``out``, ``method``, ``seed``, ...), so can the keys only one other
    section has (``engine``, ``workers``, ``n_clusters``, ...). Left out, they keep the config's
    value, else the embedded default: a bare ``select()`` runs the generated capability suite, the
    bundled SmolLM2-135M-Instruct and its 25% paser-pruned twin, with a 20% budget.
    """
    from paser.selection.pipeline import preflight, run_selection
    from paser.selection.settings import build_settings

    _, sections = split_overrides("select", overrides, SELECT_SECTIONS, "select", {})
    if sections["select"].get("budget") is not None:
        sections["select"]["budget"] = parse_budget(sections["select"]["budget"]).setting
    settings = build_settings(config=_path(config), overrides=sections)
    preflight(settings)
    if not flow and settings.distribute.engine == "local":
        return SelectResult.read(run_selection(settings))

    start()  # paser's Prefect settings, before Prefect is first imported
    from paser.flows.selection import selection_flow

    return SelectResult.read(selection_flow(config=_path(config), overrides=sections))


# ---------------------------------------------------------------- prune

PRUNE_ARGUMENTS = {"model": "smollm2-135m-instruct", "out": "runs/pruned", "export_pickle": None,
                   "trust_pickle": False, "dtype": "float32", "device": None}


def prune(config: str | Path | None = None, *, flow: bool = False, **overrides) -> PruneResult:
    """Prune attention heads and MLP channels of ``model`` (LLM-Pruner block-wise) into ``out``;
    the ``prune`` section's keys (``ratio``, ``importance``, ...) flat."""
    from paser.models.load import check_reference
    from paser.models.pruning import prune as prune_model

    args, sections = split_overrides("prune", overrides, {"prune": PruneConfig}, "prune", PRUNE_ARGUMENTS)
    cfg = load_config(PruneConfig, config, "prune", sections["prune"])
    if not flow:
        return prune_model(args["model"], Path(args["out"]), cfg, export_pickle=args["export_pickle"],
                           trust_pickle=args["trust_pickle"], dtype=args["dtype"], device=args["device"])
    check_reference(args["model"], args["trust_pickle"])  # bad input fails here in one line, before Prefect

    start()
    from paser.flows.prune import prune_flow

    return prune_flow(str(args["model"]), str(args["out"]), _path(config), sections["prune"],
                      _path(args["export_pickle"]), args["trust_pickle"], args["dtype"], args["device"])


# ---------------------------------------------------------------- recover

RECOVER_ARGUMENTS = {"model": ..., "data": ..., "out": "runs/recover", "val_data": None, "trust_pickle": False,
                     "restart": False}


def recover(config: str | Path | None = None, *, flow: bool = False, **overrides) -> RecoveryResult:
    """LoRA-recover the pruned ``model`` on the records of ``data`` (a run's selected.jsonl or any
    instruction file) into ``out``; resumes from a checkpoint there made with the same settings
    unless ``restart``. The ``recover`` section's keys (``epochs``, ``learning_rate``, ...) and the
    ``prompt`` section's (``template``, ``cutoff``) flat."""
    from paser.models.load import check_reference
    from paser.recovery import recover as run_recover

    args, sections = split_overrides("recover", overrides, {"recover": RecoverConfig, "prompt": PromptFormat},
                                     "recover", RECOVER_ARGUMENTS)
    recover_overrides = sections["recover"] | {"prompt": sections["prompt"]}
    cfg = load_config(RecoverConfig, config, "recover", recover_overrides)
    model, data, out = str(args["model"]), str(args["data"]), Path(args["out"])
    if not flow:
        return run_recover(model, data, out, cfg, val_data=_path(args["val_data"]), trust_pickle=args["trust_pickle"],
                           restart=args["restart"])
    check_reference(model, args["trust_pickle"])

    start()
    from paser.flows.recovery import recovery_flow

    return recovery_flow(model, data, str(out), _path(config), recover_overrides, _path(args["val_data"]),
                         args["trust_pickle"], args["restart"])


# ---------------------------------------------------------------- evaluate


@dataclass
class EvalResult:
    """An evaluation: its folder (eval.json, eval.md; None when not written) and its figures, as
    eval.json holds them (``results["compute"]``: what the evaluation computed)."""

    out: Path | None
    results: dict

    @property
    def compute(self) -> dict:
        return self.results["compute"]


EVALUATE_ARGUMENTS = {"model": ..., "adapter": None, "out": None, "trust_pickle": False}


def evaluate(config: str | Path | None = None, *, flow: bool = False, **overrides) -> EvalResult:
    """Evaluate ``model`` (with LoRA ``adapter`` when given): perplexity, held-out response NLL,
    capability-suite accuracy, lm-eval tasks, as the ``evaluate`` section asks (its keys flat)."""
    from paser.evaluation import evaluate as run_evaluate
    from paser.models.load import check_reference

    args, sections = split_overrides("evaluate", overrides, {"evaluate": EvalConfig, "prompt": PromptFormat},
                                     "evaluate", EVALUATE_ARGUMENTS)
    eval_overrides = sections["evaluate"] | {"prompt": sections["prompt"]}
    cfg = load_config(EvalConfig, config, "evaluate", eval_overrides)
    model, adapter, out = str(args["model"]), _path(args["adapter"]), args["out"]
    if not flow:
        return EvalResult(Path(out) if out else None, run_evaluate(model, adapter, out, cfg,
                                                                   trust_pickle=args["trust_pickle"]))
    check_reference(model, args["trust_pickle"])

    start()
    from paser.flows.recovery import evaluation_flow

    results = evaluation_flow(model, adapter, _path(out), _path(config), eval_overrides, args["trust_pickle"])
    return EvalResult(Path(out) if out else None, results)


# ---------------------------------------------------------------- compare


def compare(config: str | Path | None = None, *, flow: bool = False, report_only: bool = False,
            **overrides) -> CompareResult:
    """Run (or resume) a comparison: arms trained alike, judged against random subsets (``paser
    compare``). The ``compare`` section's keys flat (``arms``, ``budgets``, ``out``, ...), any other
    section whole; finished arms are never run again, ``report_only`` runs none."""
    from paser.comparison.recipe import compare as run_compare
    from paser.comparison.runner import load_sections, prepare

    sections = {"compare": CompareConfig, "prompt": PromptFormat, **STAGE_CONFIGS, "recover": RecoverConfig,
                "evaluate": EvalConfig}
    _, found = split_overrides("compare", overrides, sections, "compare", {})
    found = {name: values for name, values in found.items() if values}
    engine = load_sections(config, found).get("distribute", {}).get("engine", "local")
    if not flow and engine == "local":
        return run_compare(config, found, report_only=report_only)
    # bad input fails here, before Prefect starts
    prepare(load_sections(config, found), str(config or "compare"), resolve=not report_only)

    start()
    from paser.flows.compare import compare_flow

    return compare_flow(_path(config), found, report_only)


# ---------------------------------------------------------------- run


@dataclass
class RunResult:
    """The whole pipeline's folder (pruned/ when paser pruned, select/, recover/, eval/{dense,
    pruned,recovered}/, run.md) and each step's result."""

    out: Path
    selection: SelectResult
    recovery: RecoveryResult
    evaluations: dict[str, EvalResult]  # dense, pruned, recovered


RUN_SECTIONS = {"prompt": PromptFormat, **STAGE_CONFIGS, "recover": RecoverConfig, "evaluate": EvalConfig}
RUN_ARGUMENTS = {"out": "runs/run", "trust_pickle": False}


def run(config: str | Path | None = None, *, flow: bool = False, **overrides) -> RunResult:
    """The whole pipeline (``paser run``): prune the dense model (unless ``pruned`` is given), select,
    LoRA-recover the pruned model on the selection, evaluate the dense, pruned and recovered models
    alike, and write run.md comparing them. ``config`` is one YAML file for every step; the
    ``select`` section's keys flat (``dense``, ``pruned``, ``data``, ``budget``, ``method``, ...),
    every other section whole (``recover={"epochs": 1}``). ``flow=True``: each step as its Prefect
    flow, under one ``paser-run`` flow run."""
    if not flow:
        return run_recipe(_path(config), overrides, flow=False)

    start()
    from prefect import flow as prefect_flow

    # the same recipe, each step a subflow of this one (paser.flows.pipeline serves it as a deployment)
    return prefect_flow(name="paser-run")(run_recipe)(_path(config), overrides, flow=True)


def run_recipe(config: str | None, overrides: dict, flow: bool) -> RunResult:
    """``run``'s steps, in order; each step is the verb of this module, in this process or (``flow``)
    through its Prefect flow."""
    from paser.evaluation.report import comparison_table
    from paser.ledger import parts_table
    from paser.models.load import check_reference
    from paser.selection.settings import build_settings

    args, found = split_overrides("run", overrides, RUN_SECTIONS, "select", RUN_ARGUMENTS)
    root, trust = Path(args["out"]), args["trust_pickle"]
    # the selection's settings first: they name the models (given here, else the config's, else the
    # bundled default) and the one prompt format every step shares
    chosen = {k: v for k, v in found.items() if k not in ("recover", "evaluate")}
    chosen["select"] = chosen["select"] | {"out": str(root / "select"), "trust_pickle": trust}
    if chosen["select"].get("budget") is not None:
        chosen["select"]["budget"] = parse_budget(chosen["select"]["budget"]).setting
    settings = build_settings(config=config, overrides=chosen).to_dict()
    dense, pruned, prompt = settings["select"]["dense"], settings["select"]["pruned"], settings["prompt"]
    # bad input fails here, before any step: the models, the recovery and evaluation settings
    check_reference(dense, trust)
    if pruned is not None:
        check_reference(pruned, trust, tokenizer_from=dense)
    load_config(RecoverConfig, config, "recover", found["recover"] | {"prompt": prompt})
    load_config(EvalConfig, config, "evaluate", found["evaluate"] | {"prompt": prompt})
    if pruned is None:
        pruned = str(root / "pruned")
        prune(config, flow=flow, model=dense, out=pruned, trust_pickle=trust, prune=found["prune"])
        settings["select"]["pruned"] = pruned
    selection = select(flow=flow, **settings)
    recovery = recover(config, flow=flow, model=pruned, data=selection.out / "selected.jsonl", out=root / "recover",
                       trust_pickle=trust, recover=found["recover"], prompt=prompt)
    # the held-out suite shares no prompt with the pool selected from (unless the config says
    # otherwise); the recovered model's evaluation also reports the share of each family's
    # dense-vs-pruned gap it closed, and the others their distance from the dense model
    given = dict((read_yaml(config).get("evaluate") or {}) if config else {}) | found["evaluate"]
    exclude = {} if "suite_exclude" in given else {"suite_exclude": [str(selection.out)]}
    references = {"reference_dense": str(root / "eval" / "dense"), "reference_pruned": str(root / "eval" / "pruned")}
    evaluations = {}
    for name, model, adapter in (("dense", dense, None), ("pruned", pruned, None),
                                 ("recovered", pruned, recovery.out / "adapter")):
        extra = ({} if name == "dense" else {"divergence_from": dense}) | (references if name == "recovered" else {})
        evaluations[name] = evaluate(config, flow=flow, model=model, adapter=adapter, out=root / "eval" / name,
                                     trust_pickle=trust, evaluate=exclude | found["evaluate"] | extra, prompt=prompt)
    recovery_json = json.loads((recovery.out / "recovery.json").read_text())
    parts = {"selection": selection.compute, "recovery": recovery_json["compute"]} | {
        f"evaluation of the {name} model": result.compute for name, result in evaluations.items()}
    results = {name: result.results for name, result in evaluations.items()}
    compute = ["## Compute (paser's counting rule, paser.ledger)", "", *parts_table(parts)]
    (root / "run.md").write_text("\n".join([comparison_table(results), *compute, ""]))
    return RunResult(root, selection, recovery, evaluations)
