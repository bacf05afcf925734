"""The comparison's work: the setting prepared once, each arm's subset selected (the pool's
embeddings, clusters, tokens and scores computed once, in one shared selection folder), the pruned
model recovered on it with the one recipe, and the result evaluated. A finished arm is a JSON file
written atomically and never run again; an interrupted recovery resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from paser.comparison.arms import Arm, parse_arms
from paser.comparison.config import CompareConfig
from paser.config import SECTIONS, config_with, from_mapping, read_yaml, shared_sections, to_mapping
from paser.data.pools import load_pool, write_jsonl
from paser.data.suite import generate_suite
from paser.errors import ConfigError
from paser.evaluation.config import EvalConfig
from paser.recovery.config import RecoverConfig
from paser.selection.budget import parse_budget

SELECTION_SECTIONS = (
    "prompt", "select", "embed", "manifold", "cluster", "score", "allocate", "sample", "concepts", "prune")


@dataclass
class Setup:
    """A comparison, resolved: its folder, the files and models every arm uses, and its sections."""

    config: CompareConfig
    root: Path
    pool: str | None
    heldout: str | None
    pruned: str
    recover: RecoverConfig
    evaluate: EvalConfig
    selection: dict
    arms: list[Arm]
    distribute: dict
    """Where the flow runs the arms (the ``distribute`` section); the selection runs here."""

    @property
    def results(self) -> Path:
        return self.root / "arms"

    def result(self, arm: Arm) -> Path:
        return self.results / f"{arm.file}.json"

    def finished(self, arm: Arm) -> bool:
        return self.result(arm).is_file()


def load_sections(config: str | Path | None, overrides: dict | None) -> dict:
    """The YAML file's sections with ``{section: {key: value}}`` overrides on top (None values ignored)."""
    sections = {k: dict(v or {}) for k, v in (read_yaml(config) if config else {}).items()}
    for section, values in (overrides or {}).items():
        sections[section] = sections.get(section, {}) | {k: v for k, v in (values or {}).items() if v is not None}
    return sections


def prepare(sections: dict, where: str = "compare", resolve: bool = True) -> Setup:
    """Resolve a comparison: its config, the pool split (written once), the pruned model (paser's
    twin, made once), the recipe and the evaluation. The folder remembers the settings it was
    started with and refuses others (adding arms is allowed). ``resolve=False`` (a report of
    finished arms) splits no pool and makes no twin."""
    from paser.selection.settings import Settings

    unknown = sorted(set(sections) - set(SECTIONS) - {"compare"})
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; known: compare, {', '.join(SECTIONS)}")
    cfg = from_mapping(CompareConfig, sections.get("compare", {}), f"{where}: compare")
    arms = parse_arms(cfg.arms, cfg.budgets)
    root = Path(cfg.out)
    recover = from_mapping(RecoverConfig, sections.get("recover", {}) | {"progress": False}, f"{where}: recover",
                           shared_sections(RecoverConfig, sections, where))
    evaluate = from_mapping(EvalConfig, sections.get("evaluate", {}), f"{where}: evaluate",
                            shared_sections(EvalConfig, sections, where))
    selection = {k: v for k, v in sections.items() if k in SELECTION_SECTIONS}
    check_metric(cfg, evaluate, where)
    remember(root, {"compare": to_mapping(cfg), "recover": to_mapping(recover), "evaluate": to_mapping(evaluate),
                    "selection": selection},
             {"compare": to_mapping(CompareConfig()), "recover": to_mapping(RecoverConfig(progress=False)),
              "evaluate": to_mapping(EvalConfig())})
    if not resolve:
        named = cfg.pruned or f"{cfg.dense} pruned {cfg.prune_ratio:.0%} by paser"
        return Setup(cfg, root, cfg.pool, cfg.heldout, named, recover, evaluate, selection, arms,
                     dict(sections.get("distribute", {})))
    pool, heldout = split_pool(cfg, root)
    twin = Settings.load(None, {"select": {"dense": cfg.dense, "prune_ratio": cfg.prune_ratio, "pruned": cfg.pruned},
                                "prune": selection.get("prune", {})})
    from paser.selection.scoring import twin_reference

    pruned = twin_reference(twin)
    evaluate = config_with(evaluate, {"heldout": heldout or evaluate.heldout,
                                      "divergence_from": evaluate.divergence_from or cfg.dense,
                                      "suite_exclude": [pool] if pool else evaluate.suite_exclude})
    setup = Setup(cfg, root, pool, heldout, pruned, recover, evaluate, selection, arms,
                  dict(sections.get("distribute", {})))
    preflight(setup)
    return setup


def check_metric(cfg: CompareConfig, evaluate: EvalConfig, where: str) -> None:
    """The primary metric must be one the evaluation measures."""
    if cfg.metric == "zeroshot" and not evaluate.lm_eval_tasks:
        raise ConfigError(f"{where}: metric zeroshot reads lm-eval tasks: set evaluate.lm_eval_tasks (e.g. [paper])")
    if cfg.metric == "heldout_nll" and not (cfg.heldout or cfg.heldout_records or evaluate.heldout):
        raise ConfigError(f"{where}: metric heldout_nll needs held-out records: compare.heldout_records, "
                          "compare.heldout or evaluate.heldout")
    if cfg.metric == "suite_nll" and not evaluate.suite_size:
        raise ConfigError(f"{where}: metric suite_nll needs the suite: evaluate.suite_size > 0")


JUDGEMENT = ("arms", "out", "metric", "bootstrap", "bootstrap_seed", "recovery_seeds", "trust_pickle")
"""Compare settings that change how the arms are read, not what they are: free to change."""


def remember(root: Path, settings: dict, defaults: dict) -> None:
    """Write the comparison's settings into its folder, or check them against those it holds (what
    makes an arm: the pool, models, budgets, recipe, evaluation and selection settings). A setting
    the folder does not hold (added to paser after the folder was started) agrees when it has its
    default value; a new budget is added to those held."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "compare.json"
    found, defaults = json.loads(json.dumps(settings)), json.loads(json.dumps(defaults))  # as JSON reads them back
    for values in found["compare"], defaults["compare"]:
        for key in JUDGEMENT:
            values.pop(key, None)
    if path.is_file():
        held = json.loads(path.read_text())
        for section in ("recover", "evaluate"):  # a folder started when the prompt format was keys of these
            values = held.get(section, {})
            if "prompt" not in values and {"template", "cutoff"} <= set(values):
                values["prompt"] = {"template": values.pop("template"), "cutoff": values.pop("cutoff")}
        for section, values in defaults.items():
            held[section] = values | held.get(section, {})
        for key in JUDGEMENT:
            held["compare"].pop(key, None)
        # a budget may be added; one the folder holds keeps its value
        held_budgets, found_budgets = held["compare"].pop("budgets", {}), found["compare"].pop("budgets")
        changed = sorted(f"{s}.{k}" for s in set(held) | set(found)
                         for k in set(held.get(s, {})) | set(found.get(s, {}))
                         if held.get(s, {}).get(k) != found.get(s, {}).get(k))
        changed += [f"compare.budgets.{b}" for b in sorted(set(held_budgets) & set(found_budgets))
                    if held_budgets[b] != found_budgets[b]]
        found["compare"]["budgets"] = held_budgets | found_budgets
        if changed:
            raise ConfigError(f"{root}: holds a comparison with other settings ({', '.join(changed)}); its arms would "
                              "not compare: use another out folder, or the settings it was started with")
        if found_budgets.keys() <= held_budgets.keys():
            return
    write_atomic(path, found)


def split_pool(cfg: CompareConfig, root: Path) -> tuple[str | None, str | None]:
    """The pool file and held-out file: as given, or written once into the folder: the generated
    suite (one pool for every arm, whatever its selection seed), and the config's seeded split."""
    import numpy as np

    if not cfg.heldout_records:
        if cfg.pool is not None:
            return cfg.pool, cfg.heldout
        pool = root / "pool.jsonl"
        if not pool.is_file():
            write_jsonl(pool, generate_suite(cfg.suite_records, cfg.suite_seed))
        return str(pool), cfg.heldout
    pool, heldout = root / "pool.jsonl", root / "heldout.jsonl"
    if not (pool.is_file() and heldout.is_file()):
        rows = ([dict(r.fields) for r in load_pool(cfg.pool).records] if cfg.pool
                else generate_suite(cfg.suite_records, cfg.suite_seed))
        order = np.random.default_rng(cfg.split_seed).permutation(len(rows))
        taken = cfg.pool_records if cfg.pool_records is not None else len(rows) - cfg.heldout_records
        if taken < 1 or taken + cfg.heldout_records > len(rows):
            raise ConfigError(f"{cfg.pool or 'the suite'}: {len(rows)} records cannot give a pool of {taken} and "
                              f"{cfg.heldout_records} held out")
        write_jsonl(heldout, [rows[i] for i in order[taken:taken + cfg.heldout_records]])
        write_jsonl(pool, [rows[i] for i in order[:taken]])
    return str(pool), str(heldout)


def write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_result(path: Path) -> dict:
    return json.loads(path.read_text())


def finished_rows(setup: Setup) -> dict[str, dict]:
    """The finished arms of the comparison, by name (every file in its arms folder)."""
    rows = {}
    for path in sorted(setup.results.glob("*.json")):
        row = read_result(path)
        rows[row["arm"]] = row
    return rows


# ---------------------------------------------------------------- one arm


def total_flops(row: dict) -> float | None:
    """An arm's selection + recovery FLOPs by paser's ledger."""
    found = row.get("compute")
    return None if found is None else found["selection"]["flops_total"] + found["recovery"]["flops_total"]


def budget_of(arm: Arm, setup: Setup) -> str | float | int:
    """The arm's budget: its budget name's, or for ``BUDGET:random-K=METHOD`` the token budget at
    which a random subset's recovery spends what METHOD's selection and recovery spent together
    (recovery's compute grows with the tokens trained: token batches of one size, the same epochs)."""
    budget = setup.config.budgets[arm.budget]
    if arm.at_compute_of is None:
        return budget
    parsed = parse_budget(budget)
    if not parsed.tokens or parsed.amount >= 1:
        raise ConfigError(f"arm {arm.name}: an arm at another's compute needs a budget that is a fraction of the "
                          f"pool's tokens (0.2tok), not {budget!r}")
    rows = finished_rows(setup)
    randoms = [r for a, r in rows.items() if _is_random_of(a, arm.budget, setup)]
    target = rows.get(arm.at_compute_of)
    if target is None or not randoms or total_flops(target) is None:
        raise ConfigError(f"arm {arm.name}: {arm.at_compute_of} and the random subsets of {arm.budget} must "
                          "finish first")
    fraction = parsed.amount * total_flops(target) / statistics.mean(total_flops(r) for r in randoms)
    if fraction >= 1:
        raise ConfigError(f"arm {arm.name}: {arm.at_compute_of} spent more than recovery on the whole pool "
                          f"({fraction:.0%} of its tokens)")
    return f"{fraction:.6f}tok"


def _is_random_of(name: str, budget: str, setup: Setup) -> bool:
    return any(a.name == name and a.is_random and a.budget == budget for a in setup.arms)


def select_subset(arm: Arm, setup: Setup) -> dict:
    """The arm's subset in ``subsets/`` with its selection's summary; selected once for every arm
    that trains it (recovery variants and seeds train the subset of their plain arm)."""
    from paser.selection.pipeline import run_selection

    folder = setup.root / "subsets"
    name = arm.subset_name.replace(":", "-").replace("=", "-eq-")
    done = folder / f"{name}.json"
    if done.is_file():
        return read_result(done)
    start = time.perf_counter()
    run = run_selection(selection_settings(arm, setup, budget_of(arm, setup)))
    seconds = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    subset = folder / f"{name}.selected.jsonl"
    shutil.copyfile(run / "selected.jsonl", subset)
    summary = json.loads((run / "clusters.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    found = {k: summary[k] for k in ("budget", "budget_unit", "selected", "selected_tokens",
                                     "selected_response_tokens")}
    found |= {"subset": str(subset), "selection_s": seconds, "selection_compute": manifest["compute"],
              "mean_record_tokens": mean_record_tokens(run)}
    write_atomic(done, found)
    return found


def selection_settings(arm: Arm, setup: Setup, budget):
    """``paser select``'s settings for the arm's subset: the comparison's selection sections, the
    arm's method, seed and sampling, in the shared selection folder."""
    from paser.selection.settings import Settings

    cfg = setup.config
    sections = {k: dict(v) for k, v in setup.selection.items()}
    for section, values in arm.selection().items():
        sections[section] = sections.get(section, {}) | values
    sections["select"] = sections.get("select", {}) | {
        "data": setup.pool, "dense": cfg.dense, "pruned": setup.pruned, "out": str(setup.root / "select"),
        "budget": budget, "trust_pickle": cfg.trust_pickle}
    return Settings.load(None, sections)


def preflight(setup: Setup) -> None:
    """``paser select``'s cheap checks (the pool, a record budget against its size, the models and
    their tokenizers) for the first selecting arm of each budget, before any arm runs."""
    from paser.selection.pipeline import preflight as check

    for budget in dict.fromkeys(a.budget for a in setup.arms if not a.reference):
        arm = next(a for a in setup.arms if a.budget == budget and a.at_compute_of is None)
        check(selection_settings(arm, setup, setup.config.budgets[budget]))


def mean_record_tokens(run: Path) -> float:
    import pandas as pd

    return float(pd.read_parquet(run / "tokens.parquet")["n_tokens"].mean())


def recovery_config(arm: Arm, setup: Setup, subset: dict) -> RecoverConfig:
    """The recipe with the arm's variant and seed; token batches at a token budget."""
    fields = arm.recovery(setup.config.dense)
    if setup.config.token_batches and parse_budget(setup.config.budgets[arm.budget]).tokens:
        fields["batch_tokens"] = int(round(setup.recover.steps.batch_size * subset["mean_record_tokens"]))
    return config_with(setup.recover, fields)


def run_arm(arm: Arm, setup: Setup) -> dict:
    """Select (or reuse), recover and evaluate one arm; its result is written and returned."""
    from paser.evaluation import evaluate
    from paser.recovery import recover

    cfg = setup.config
    row: dict = {"arm": arm.name, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                 "process": f"{platform.node()}:{os.getpid()}", "code": code_version(),
                 "date": time.strftime("%Y-%m-%d"), "method": arm.method, "budget_name": arm.budget}
    if arm.reference:
        model, adapter = (cfg.dense if arm.method == "dense" else setup.pruned), None
    else:
        subset = select_subset(arm, setup)
        row |= {k: subset[k] for k in ("budget", "budget_unit", "selected", "selected_tokens",
                                       "selected_response_tokens", "selection_s")}
        result = recover(setup.pruned, subset["subset"], setup.root / "recover" / arm.file,
                         recovery_config(arm, setup, subset), trust_pickle=cfg.trust_pickle)
        done = json.loads((result.out / "recovery.json").read_text())
        row |= {"recovery_s": result.seconds, "steps": result.steps, "tokens_per_step": done["tokens_per_step"],
                "batch_unit": done["batch_unit"], "train_loss": [result.first_loss, result.last_loss],
                "compute": {"selection": subset["selection_compute"], "recovery": done["compute"]}}
        model, adapter = setup.pruned, str(result.out / "adapter")
    start = time.perf_counter()
    found = evaluate(model, adapter, setup.root / "eval" / arm.file, setup.evaluate, trust_pickle=cfg.trust_pickle)
    row["eval_s"] = time.perf_counter() - start
    row |= evaluation_fields(found)
    write_atomic(setup.result(arm), row)
    return row


def code_version() -> dict:
    """Which paser made the arm: its version, and its commit when it runs from a git checkout."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("paser")
    except PackageNotFoundError:
        installed = None
    here = Path(__file__).resolve().parent
    try:
        found = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                               text=True, timeout=10)
        commit = found.stdout.strip() if found.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"paser": installed, "commit": commit}


def evaluation_fields(found: dict) -> dict:
    """What an arm keeps of its evaluation: every figure the report reads, per item."""
    row: dict = {}
    if "lm_eval" in found:
        row["zeroshot"] = {"tasks": found["lm_eval"]} | ({"paper_mean": found["paper_mean"]}
                                                          if "paper_mean" in found else {})
    if "response_nll" in found:
        row["heldout"] = {k: found["response_nll"][k] for k in ("nll", "records", "tokens", "per_record")}
    if "suite" in found:
        suite = found["suite"]
        row["suite"] = {k: suite[k] for k in ("records", "removed_overlap")} | {
            "answer_nll_macro": suite["answer_nll"]["macro"], "answer_nll": suite["answer_nll"]["per_family"],
            "per_record": suite["answer_nll"]["per_record"]}
    if "jsd_to_reference" in found:
        row["jsd"] = {where: {k: v for k, v in found["jsd_to_reference"][where].items()
                              if k in ("mean", "macro", "per_family", "per_record")}
                      for where in ("heldout", "suite") if where in found["jsd_to_reference"]}
    return row


def pending(setup: Setup, second: bool) -> list[Arm]:
    """The arms still to run: first those that need no other arm's result, then (``second``) the
    arms at another arm's compute."""
    return [a for a in setup.arms if not setup.finished(a) and (a.at_compute_of is not None) == second]
