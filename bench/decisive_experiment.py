"""When does PASER beat random, at equal compute, on capabilities? (the decisive recovery experiment)

    python bench/decisive_experiment.py                                  # every setting, every arm
    python bench/decisive_experiment.py --settings suite-25 --arms rec:paser rec:random-0
    python bench/decisive_experiment.py --smoke                          # minutes: tiny sizes, 2 steps
    python bench/decisive_experiment.py --report-only                    # results.md from the finished arms

Models: the bundled SmolLM2-135M-Instruct (dense) and its `paser prune` twins (Taylor, cached).

Settings (decided before any result was seen):
- ``suite-25`` / ``suite-15``: pool = the embedded default's 1,000 capability-suite records (seed
  0); evaluation = --suite-heldout suite records of seed 12345 with every record whose
  instruction + input also occurs in the pool removed (the count is reported); twin pruned 25% /
  15%. Metric: per-family answer NLL, its macro average; answer-found accuracy beside it, on the
  first --accuracy-per-family (10) held-out records of each family.
- ``alpaca-25``: pool = the first --alpaca-pool (1,000) positions of a permutation (numpy
  default_rng(0)) of ../shared/data/alpaca_5000.json, held out = the next --alpaca-heldout (200);
  twin 25%. Metric: held-out response NLL; the suite's answer-NLL macro average as a second view.
- ``alpaca4800-25``: pool = every record of ../shared/data/alpaca_5000.json outside alpaca-25's
  held-out 200 (4,800, in the permutation's order), held out = the same 200; twin 25%; the budget
  unit ``tok4`` (4% of the pool's tokens, the paper's LaMini ratio): selection has more to choose from.

New experiments run through ``paser compare`` (paser.comparison, configs/compare/), whose statistics
this script's report uses; the paper's claim on its own metric (configs/compare/zeroshot-25.yaml)
ran its first three arms from this script at commit 6557583 and the rest through ``paser compare``.

Sized for the 2-core machine after its first two arms (dense and pruned evaluations took 237 s
and 457 s beside other work, almost all of it generating answers for 480 records): accuracy is
generated for 10 records per family, not all, and the Alpaca pool is 1,000 records, not 2,000
(recovery time grows with the budget, 20% of the pool). Even so the whole takes about 4 hours of
arm time; it resumes where it stopped.

Arms (``UNIT:METHOD``): UNIT ``rec`` is a 20% record budget with record batches (--batch-size
records a step), ``tok`` a 20% token budget (of the pool's tokens), ``tok5`` (alpaca-25 only) a
5% one and ``tok4`` (alpaca4800-25 only) a 4% one, all with token batches of --batch-size times the
pool's mean record tokens. METHOD:
``paser``, ``loss_gap`` (PASER with --signal loss_gap), ``no_cost``, ``uniform``,
``random-0``..``random-4``, ``longest``, ``shortest``, ``pruned_loss``; and once per setting
``none`` (the pruned model), ``dense`` and ``full`` (the whole pool, record batches). ``ARM#K``
retrains ARM's subset with recovery seed K (training noise beside subset noise); ``ARM~conv``
retrains it until the validation loss (10% of the subset held out) has not improved for
--conv-patience evaluations, at most --conv-epochs epochs (does the ranking survive convergence?).
``ARM@distill`` trains ARM's subset with the distillation objective (forward KL to the dense
model's next-token distribution, temperature 1, teacher in memory) instead of SFT, same steps and
batches; ``ARM@distill-jsd`` with the JSD instead of forward KL, ``ARM@distill-t2`` at temperature
2 (the choice of distillation's defaults). Every arm also reports the mean token JSD to the dense
model on the held-out records (suite answers; Alpaca held-out responses): how much of the dense
behaviour came back.
--add-jsd computes it for finished arms that lack it (from their saved adapters).
``UNIT:random-K=METHOD`` is random subset K at METHOD's total compute: drawn at the token budget
whose recovery (token batches of the same size, so more steps) spends what ``UNIT:METHOD``'s
selection and recovery spent together, by the arms' ledgers; it runs after METHOD and the
budget's random arms, and the report compares METHOD with these arms at equal total compute.
METHOD may be a recovery variant (``tok:random-K=paser@tokw``): the random subset still trains by
plain SFT, at the total compute of PASER's subset trained token-weighted.

Recovery, identical for every arm: LoRA r 8, alpha 16, dropout 0.05, 2 epochs, cutoff 256, lr
3e-4, fp32, no validation split. Every finished arm's figures go to RESULTS/<setting>/<arm>.json at
once (commit them: a rerun skips what is there); models, subsets and adapters live in --out.
Timings taken beside other work on the same 2 cores are marked by --shared-machine.

The report compares every method with the mean of the random subsets of its budget; per family on
the suite (the family's degradation, PASER's share, gap closed), per PASER cluster on Alpaca
(held-out records by their nearest pool record's cluster; favoured against starved clusters): those
tables read the subsets and scores in --out, which are not committed; where they are missing (a new
machine) the report prints the rest and names the files a table lacks. Its
summary table gives every arm's verdict by the recovery-cost experiment's registered rule
(docs/benchmarks.md), and below it the registered choice of the new method for alpaca4800-25.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from paser.config import config_with  # noqa: E402
from paser.data.pools import load_pool, write_jsonl  # noqa: E402
from paser.data.suite import generate_suite  # noqa: E402
from paser.evaluation import evaluate  # noqa: E402
from paser.evaluation.config import EvalConfig  # noqa: E402
from paser.evaluation.suite import gap_recovered  # noqa: E402
from paser.recovery import RecoverConfig, recover  # noqa: E402
from paser.selection.configs import EmbedConfig  # noqa: E402
from paser.selection.embedding import embed_texts, instruction_texts  # noqa: E402
from paser.selection.pipeline import run_selection  # noqa: E402
from paser.selection.scoring import twin_reference  # noqa: E402
from paser.selection.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"suite-25": ("suite", 0.25), "suite-15": ("suite", 0.15), "alpaca-25": ("alpaca", 0.25),
            "alpaca4800-25": ("alpaca", 0.25)}
WHOLE_POOL = {"alpaca4800-25"}  # the pool is every record outside the held-out ones
METHODS = ["paser", "loss_gap", "no_cost", "uniform", *[f"random-{s}" for s in range(5)], "longest", "shortest",
           "pruned_loss"]
# the recovery-cost experiment's strat sweep (suite-15): tau_c, tau_i, near-duplicate removal at 0.95,
# each with sampling seeds 0 and 1; ``strat`` alone is the configuration frozen from it (SampleConfig's defaults)
STRAT_CONFIGS = ("c0i0", "c0i0d", "c1i0d", "c0i1d", "c1i1d")
STRAT_SWEEP = [f"strat-{cfg}-{seed}" for cfg in STRAT_CONFIGS for seed in (0, 1)]
STRAT_SWEEP_SETTING = "suite-15"  # where the sweep ran; elsewhere its choice is the frozen strat
FROZEN_STRAT = "strat-c1i1d-0"  # the choice, as the other settings run it from the pinned commit
NEW_METHODS = ["strat", *STRAT_SWEEP, "adaptive", "rounds"]
STRAT_PER_CLUSTER = 16  # records scored per cluster when strat needs CDS but not every record's score
TOKW_STRENGTH = 0.5  # lambda of the @tokw arms, fixed in the registration
SELF_ANSWER_TOKENS = 128  # the longest dense answer of the @self arms, fixed in the registration
SUFFIXED = ("tokw", "self")  # recoveries run on the random subsets and PASER's: random-K@X, paser@X
# the adaptive arms' rounds as registered; ``rounds`` is the same with the shares frozen (step 0)
ADAPTIVE = {"rounds": 4, "probe_per_cluster": 8, "step": 1.0, "floor": 0.25}
BUDGETS = {"rec": 0.2, "tok": "0.2tok", "tok5": "0.05tok", "tok4": "0.04tok"}
BOOTSTRAP = 2000


def arms_of(setting: str) -> list[str]:
    """Every arm of a setting, in the order they run: references, the question (PASER against
    random), the other arms, the costly full pool last."""
    arms = ["dense", "none"]
    if setting in WHOLE_POOL:  # 4% of the tokens, the paper's LaMini ratio
        return arms + [f"tok4:{m}" for m in METHODS + NEW_METHODS]
    for unit in ("rec", "tok"):
        arms += [f"{unit}:{m}" for m in METHODS + (NEW_METHODS if unit == "tok" else [])]
    if SETTINGS[setting][0] == "alpaca":
        arms += [f"tok5:{m}" for m in METHODS]
    return arms + ["full"]


def prepare(setting: str, args, work: Path) -> dict:
    """The setting's pool file, evaluation config and twin (written once)."""
    kind, ratio = SETTINGS[setting]
    work.mkdir(parents=True, exist_ok=True)
    pool = work / "pool.jsonl"
    heldout = None
    if kind == "suite":
        if not pool.is_file():
            write_jsonl(pool, generate_suite(args.suite_pool, 0))
    else:
        heldout = work / "heldout.jsonl"
        if not pool.is_file():
            rows = [dict(r.fields) for r in load_pool(args.alpaca).records]
            order = np.random.default_rng(0).permutation(len(rows))
            end = args.alpaca_pool + args.alpaca_heldout
            kept = [*order[:args.alpaca_pool], *order[end:]] if setting in WHOLE_POOL else order[:args.alpaca_pool]
            write_jsonl(pool, [rows[i] for i in kept])
            write_jsonl(heldout, [rows[i] for i in order[args.alpaca_pool:end]])
    pruned = args.pruned or twin_reference(Settings.load(None, {"select": {"dense": args.dense, "prune_ratio": ratio}}))
    evaluation = EvalConfig(heldout=str(heldout) if heldout else None, suite_size=args.suite_heldout,
                            suite_exclude=[str(pool)], max_new_tokens=args.max_new_tokens, batch_size=16,
                            suite_accuracy_per_family=args.accuracy_per_family if kind == "suite" else 0,
                            divergence_from=args.dense)
    return {"kind": kind, "pool": pool, "pruned": pruned, "eval": evaluation}


def base_arm(arm: str) -> str:
    """``UNIT:METHOD`` of an arm written ``UNIT:METHOD[@OBJECTIVE][#SEED][~conv]``; an equal-compute
    arm ``UNIT:random-K=TARGET`` keeps its whole target (``paser@tokw`` is a target, not an objective)."""
    own, equal, target = arm.partition("=")
    return own.split("~")[0].split("#")[0].split("@")[0] + equal + target


def own_arm(arm: str) -> str:
    """The arm without the target of an equal-compute arm: what its own recovery is written as."""
    return arm.partition("=")[0]


def objective_of(arm: str) -> dict:
    """The recovery objective of ``ARM@OBJECTIVE``: ``distill`` (forward KL, temperature 1),
    ``distill-jsd`` (JSD) or ``distill-tN`` (forward KL at temperature N), ``tokw`` (token-weighted
    SFT: excess loss, lambda 0.5), ``self`` (SFT on the dense model's own answers); SFT without ``@``."""
    arm = own_arm(arm)
    if "@" not in arm:
        return {"objective": "sft"}
    name, *options = arm.split("@")[1].split("#")[0].split("~")[0].split("-")
    if name == "tokw":  # token-weighted SFT, as registered: excess loss, lambda 0.5
        if options:
            raise SystemExit(f"{arm}: @tokw takes no options")
        return {"objective": "sft", "token_weighting": TOKW_STRENGTH, "token_signal": "excess"}
    if name == "self":  # self-data distillation, as registered: the dense model's answers, 128 tokens at most
        if options:
            raise SystemExit(f"{arm}: @self takes no options")
        return {"objective": "sft", "responses": "dense", "answer_tokens": SELF_ANSWER_TOKENS}
    out: dict = {"objective": name}
    for option in options:
        if option == "jsd":
            out["divergence"] = "jsd"
        elif option.startswith("t") and option[1:].replace(".", "", 1).isdigit():
            out["temperature"] = float(option[1:])
        else:
            raise SystemExit(f"{arm}: unknown objective option {option!r} (jsd, tN)")
    return out


def select_arm(arm: str, setup: dict, work: Path, args) -> tuple[Path, float]:
    """The arm's subset and its selection's wall time. One run folder per setting, so every arm
    reuses the pool's tokens, clusters and scores (an arm's time is then its increment)."""
    unit, method = base_arm(arm).split(":") if ":" in arm else ("rec", arm)
    method, _, target = method.partition("=")  # random-K=METHOD: random at METHOD's total compute
    budget = (BUDGETS[unit] if not target else
              equal_compute_budget(load_rows(Path(args.results), setup["setting"]), unit, target))
    seed = int(method.split("-")[-1]) if method.split("-")[-1].isdigit() else 0  # random-K, strat[-CFG]-K
    sections = {"select": {"data": str(setup["pool"]), "dense": args.dense, "pruned": setup["pruned"],
                           "budget": budget, "out": str(work / "select"), "seed": seed, "progress": False,
                           "pictures": not args.smoke,  # a smoke run checks the plumbing, not the pictures
                           "method": {"loss_gap": "paser"}.get(method, method.split("-")[0])},
                "score": {"signal": "loss_gap" if method == "loss_gap" else "jsd"}}
    if method.startswith("strat"):
        sections |= strat_sections(method)
    if method in ("adaptive", "rounds"):
        sections["select"]["method"] = "adaptive"
        sections["adaptive"] = ADAPTIVE | ({"step": 0.0} if method == "rounds" else {})
    start = time.perf_counter()
    run = run_selection(Settings.load(None, sections))
    seconds = time.perf_counter() - start
    folder = work / "subsets"
    folder.mkdir(exist_ok=True)
    name = base_arm(arm).replace(":", "-")
    for file in ("selected.jsonl", "clusters.json", "scores.parquet", "manifest.json", "rounds.json"):
        if (run / file).is_file():  # rounds.json: an adaptive arm's plan, found beside its selected.jsonl
            shutil.copyfile(run / file, folder / f"{name}.{file}")
        else:  # a copy left by an earlier run of this arm's name must not pass for this run's
            (folder / f"{name}.{file}").unlink(missing_ok=True)
    return folder / f"{name}.selected.jsonl", seconds


def strat_sections(method: str) -> dict:
    """The ``sample`` and ``score`` settings of ``strat[-cCiId][-K]``: cC the CDS temperature, iI
    the IES temperature, d near-duplicate removal at cosine 0.95; without a configuration the
    frozen defaults. A per-cluster sample is scored when CDS is needed but not every score."""
    import re

    from paser.selection.configs import SampleConfig

    found = re.fullmatch(r"strat(?:-c([0-9.]+)i([0-9.]+)(d?))?(?:-[0-9]+)?", method)
    if found is None:
        raise SystemExit(f"{method}: not strat[-cCiI[d]][-K]")
    sample = (SampleConfig() if found.group(1) is None else
              SampleConfig(float(found.group(1)), float(found.group(2)), 0.95 if found.group(3) else "off"))
    per_cluster = STRAT_PER_CLUSTER if sample.needs_cds and not sample.needs_every_score else None
    # "off", not None: an override of None keeps the default
    return {"sample": dataclasses.asdict(sample) | {"dedup": sample.dedup or "off"},
            "score": {"signal": "jsd", "per_cluster": per_cluster}}


def recovery_config(arm: str, setup: dict, args) -> RecoverConfig:
    unit = arm.split(":")[0] if ":" in arm else "rec"
    seed = int(arm.split("#")[1].split("~")[0]) if "#" in own_arm(arm) else 0
    objective = objective_of(arm) | {"teacher": args.dense if "@" in own_arm(arm) else None}
    batch_tokens = None
    if unit.startswith("tok"):
        tokens = pd.read_parquet(setup["work"] / "select" / "tokens.parquet")["n_tokens"]
        batch_tokens = int(round(args.batch_size * tokens.mean()))
    if arm.endswith("~conv"):  # the convergence check: until the validation loss stops improving
        return config_with(RecoverConfig(), dict(
            epochs=args.conv_epochs, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
            micro_batch_tokens=args.micro_batch_tokens, batch_tokens=batch_tokens, learning_rate=args.learning_rate,
            max_steps=args.max_steps, val_size=0.1, eval_every=args.conv_eval_every, patience=args.conv_patience,
            seed=seed, progress=False, **objective))
    rounds = base_arm(arm).split(":")[-1] in ("adaptive", "rounds")  # the rounds fix their own steps
    return config_with(RecoverConfig(), dict(
        epochs=args.epochs, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        micro_batch_tokens=args.micro_batch_tokens, batch_tokens=batch_tokens, learning_rate=args.learning_rate,
        max_steps=None if rounds else args.max_steps, val_size=0, seed=seed, progress=False, **objective))


def trained_subset(setting: str, arm: str, setup: dict, args) -> tuple[Path, float]:
    """The records ``arm`` trains on and its selection's seconds. ``ARM@X`` (and its seeds) trains
    the subset ``ARM`` selected when that exists (its selection time as ``ARM`` recorded it): the
    same records whatever code selects now; else the arm selects."""
    work = setup["work"]
    base = base_arm(arm)
    made = work / "subsets" / f"{base.replace(':', '-')}.selected.jsonl"
    if "@" in own_arm(arm) and made.is_file():
        found = Path(args.results) / setting / f"{_file(base)}.json"
        return made, (json.loads(found.read_text()).get("selection_s", 0.0) if found.is_file() else 0.0)
    return select_arm(arm if arm != "full" else "rec:full", setup, work, args)


def self_steps(config: RecoverConfig, subset: Path, out: Path, setup: dict, args) -> RecoverConfig:
    """An @self arm at the plain arm's steps: the dense model's answers are generated first (into
    the recovery folder's cache, where ``recover`` finds them) and the step's tokens scaled so that
    each epoch has as many steps as SFT on the file's responses; the records are the same, the
    tokens are the answers'."""
    from paser.models.load import load_tokenizer
    from paser.recovery.dense_answers import answer_with_dense
    from paser.recovery.job import train_device
    from paser.recovery.losses import encode_for_training

    records = load_pool(str(subset)).records
    answered, _ = answer_with_dense(records, str(subset), config, out, False, train_device(config))
    tokenizer = load_tokenizer(setup["pruned"], False, args.dense)
    plain, mine = (sum(len(e.ids) for e in encode_for_training(tokenizer, r, config.prompt))
                   for r in (records, answered))
    per_epoch = max(1, round(plain / config.steps.batch_tokens))
    return config_with(config, {"batch_tokens": max(1, round(mine / per_epoch))})


def run_arm(setting: str, arm: str, setup: dict, args) -> dict:
    work = setup["work"]
    row: dict = {"setting": setting, "arm": arm, "machine": f"{platform.processor() or platform.machine()}, "
                 f"{os.cpu_count()} cores", "shared_machine": args.shared_machine,
                 "date": time.strftime("%Y-%m-%d"), "commit": _commit()}
    if arm in ("dense", "none"):
        model, adapter = (args.dense if arm == "dense" else setup["pruned"]), None
    else:
        subset, row["selection_s"] = trained_subset(setting, arm, setup, args)
        summary = json.loads(subset.with_name(subset.name.replace("selected.jsonl", "clusters.json")).read_text())
        row |= {k: summary[k] for k in ("budget", "budget_unit", "selected", "selected_tokens",
                                        "selected_response_tokens")}
        config = recovery_config(arm, setup, args)
        if config.data.responses == "dense" and config.steps.batch_tokens is not None:
            config = self_steps(config, subset, work / "recover" / _file(arm), setup, args)
        result = recover(setup["pruned"], str(subset), work / "recover" / _file(arm), config)
        done = json.loads((result.out / "recovery.json").read_text())
        row |= {"recovery_s": result.seconds, "steps": result.steps, "tokens_per_step": done["tokens_per_step"],
                "batch_unit": done["batch_unit"], "train_loss": [result.first_loss, result.last_loss]}
        manifest = json.loads(subset.with_name(subset.name.replace("selected.jsonl", "manifest.json")).read_text())
        row["compute"] = {"selection": manifest["compute"], "recovery": done["compute"]}
        if "adaptive" in done:  # every round's records, not the first round's alone
            rounds = done["adaptive"]["rounds"]
            row |= {"selected": sum(r["records"] for r in rounds), "selected_tokens": sum(r["tokens"] for r in rounds),
                    "adaptive": rounds}
        if done.get("token_weighting"):
            row["token_weighting"] = done["token_weighting"]
        if arm.endswith("~conv"):
            row |= {k: done[k] for k in ("planned_steps", "stopped_early", "best_step", "val_loss")}
        model, adapter = setup["pruned"], str(result.out / "adapter")
    start = time.perf_counter()
    ev = evaluate(model, adapter, work / "eval" / _file(arm), setup["eval"])
    row["eval_s"] = time.perf_counter() - start
    suite = ev["suite"]
    row["suite"] = {k: suite[k] for k in ("records", "generated", "removed_overlap")} | {
        "answer_nll_macro": suite["answer_nll"]["macro"], "answer_nll": suite["answer_nll"]["per_family"],
        "per_record": suite["answer_nll"]["per_record"]}
    if "accuracy" in suite:
        row["suite"] |= {"accuracy": suite["accuracy"], "accuracy_records": suite["accuracy_records"],
                         "accuracy_per_family": suite["per_family"]}
    if "response_nll" in ev:
        r = ev["response_nll"]
        row["heldout"] = {k: r[k] for k in ("nll", "records", "tokens", "per_record")}
    if "jsd_to_reference" in ev:
        row["jsd"] = jsd_summary(ev["jsd_to_reference"])
    return row


def jsd_summary(found: dict) -> dict:
    return {where: {k: v for k, v in found[where].items() if k in ("mean", "macro", "per_family", "per_record")}
            for where in ("heldout", "suite") if where in found}


def add_jsd(setting: str, results: Path, setup: dict, args, arms: list[str] | None = None) -> None:
    """The mean token JSD to the dense model for finished arms (of ``arms``, default all) that
    lack it, from their adapters."""
    from paser.evaluation import evaluate as run_evaluate

    for path in sorted((results / setting).glob("*.json")):
        row = json.loads(path.read_text())
        if "jsd" in row or (arms is not None and row["arm"] not in arms):
            continue
        arm = row["arm"]
        model = args.dense if arm == "dense" else setup["pruned"]
        adapter = None if arm in ("dense", "none") else str(setup["work"] / "recover" / _file(arm) / "adapter")
        if adapter is not None and not Path(adapter).is_dir():
            print(f"{setting} {arm}: no adapter at {adapter}; JSD left out", flush=True)
            continue
        start = time.perf_counter()
        config = dataclasses.replace(setup["eval"], suite_accuracy_per_family=0)
        row["jsd"] = jsd_summary(run_evaluate(model, adapter, None, config)["jsd_to_reference"])
        row["jsd_s"] = time.perf_counter() - start
        path.write_text(json.dumps(row))
        print(f"{setting} {arm}: JSD to dense added ({row['jsd_s']:.0f} s)", flush=True)


def add_compute(setting: str, results: Path, setup: dict, args) -> None:
    """The selection and recovery compute of finished arms that ran before the ledger existed: the
    selection re-run (its stages reused, deterministic) and ``recover`` on the finished folder (it
    trains nothing and counts the steps of its log)."""
    for path in sorted((results / setting).glob("*.json")):
        row = json.loads(path.read_text())
        arm = row["arm"]
        if "compute" in row or arm in ("dense", "none"):
            continue
        subset, _ = select_arm(arm if arm != "full" else "rec:full", setup, setup["work"], args)
        manifest = json.loads(subset.with_name(subset.name.replace("selected.jsonl", "manifest.json")).read_text())
        result = recover(setup["pruned"], str(subset), setup["work"] / "recover" / _file(arm),
                         recovery_config(arm, setup, args))
        if result.steps != row["steps"]:
            raise SystemExit(f"{setting} {arm}: its folder holds {result.steps} steps, its result {row['steps']}")
        done = json.loads((result.out / "recovery.json").read_text())
        row["compute"] = {"selection": manifest["compute"], "recovery": done["compute"]}
        path.write_text(json.dumps(row))
        print(f"{setting} {arm}: compute added", flush=True)


# ---------------------------------------------------------------- report


def _metric(row: dict, kind: str) -> float:
    return row["heldout"]["nll"] if kind == "alpaca" else row["suite"]["answer_nll_macro"]


def second_metric(row: dict, kind: str) -> float:
    """The setting's second view: the suite's macro answer NLL on Alpaca, accuracy on the suite
    (NaN where it was not generated)."""
    if kind == "alpaca":
        return row["suite"]["answer_nll_macro"]
    return row["suite"].get("accuracy", float("nan"))


def _per_record(row: dict, kind: str):
    """The arm's per-record values the metric is made of: (nll_sum, tokens) for held-out NLL, and
    (family, nll) for the suite's macro answer NLL."""
    if kind == "alpaca":
        return np.array(row["heldout"]["per_record"]["nll_sum"]), np.array(row["heldout"]["per_record"]["tokens"])
    return np.array(row["suite"]["per_record"]["family"]), np.array(row["suite"]["per_record"]["nll"])


def paired_bootstrap(arm: dict | list[dict], randoms: list[dict], kind: str, by: str = "record", seed: int = 0):
    """95% interval of (mean of ``arm`` - mean of the random arms) in the setting's metric,
    resampling the held-out records (per family, for the suite's macro average) or, with
    by="family", the families. ``arm`` is one arm or several (their mean). The statistics are
    ``paser compare``'s (paser.comparison.stats)."""
    from paser.comparison import stats

    arms = arm if isinstance(arm, list) else [arm]
    groups = stats.groups([*arms, *randoms], "heldout_nll" if kind == "alpaca" else "suite_nll")
    if by == "family":
        return stats.group_bootstrap(groups, len(arms), BOOTSTRAP, seed)
    return stats.paired_bootstrap(groups, len(arms), BOOTSTRAP, seed)


def _jsd(row: dict, kind: str) -> float | None:
    """The arm's mean token JSD to the dense model on the setting's held-out records."""
    where = "heldout" if kind == "alpaca" else "suite"
    return row.get("jsd", {}).get(where, {}).get("mean")


def _jsd_interval(arm: dict | list[dict], randoms: list[dict], kind: str, seed: int = 0) -> tuple[float, float]:
    """95% paired bootstrap interval over held-out records of (mean of ``arm`` - random mean) in
    mean JSD; ``arm`` is one arm or several."""
    arms = arm if isinstance(arm, list) else [arm]
    k = len(arms)
    where = "heldout" if kind == "alpaca" else "suite"
    values = np.stack([np.asarray(r["jsd"][where]["per_record"]["jsd"], dtype=float) for r in [*arms, *randoms]])
    rng = np.random.default_rng(seed)
    n = values.shape[1]
    diffs = [np.nanmean(values[:k, i], axis=1).mean() - np.nanmean(values[k:, i], axis=1).mean()
             for i in (rng.integers(0, n, n) for _ in range(BOOTSTRAP))]
    return tuple(np.percentile(diffs, [2.5, 97.5]))


def distill_lines(rows: dict, kind: str) -> list[str]:
    """Does distillation make the selection matter? Per budget unit: PASER minus the random mean
    under SFT and under distillation, on the same random seeds, in the metric and in JSD."""
    lines = []
    for unit in BUDGETS:
        seeds = [s for s in range(5) if f"{unit}:random-{s}@distill" in rows and f"{unit}:random-{s}" in rows]
        if f"{unit}:paser@distill" not in rows or f"{unit}:paser" not in rows or len(seeds) < 2:
            continue
        lines += ["", f"{unit}: distillation against SFT (random seeds {seeds}; lower is better, paired bootstrap "
                      "95% over held-out records)"]
        for suffix, label in (("", "SFT"), ("@distill", "distill")):
            arm = rows[f"{unit}:paser{suffix}"]
            randoms = [rows[f"{unit}:random-{s}{suffix}"] for s in seeds]
            values = [_metric(r, kind) for r in randoms]
            lo, hi = paired_bootstrap(arm, randoms, kind)
            diff = _metric(arm, kind) - statistics.mean(values)
            text = (f"- {label}: PASER {_metric(arm, kind):.4f}, random {statistics.mean(values):.4f} ± "
                    f"{statistics.stdev(values):.4f}; PASER minus random {diff:+.4f} [{lo:+.4f}, {hi:+.4f}]")
            if all(_jsd(r, kind) is not None for r in [arm, *randoms]):
                jlo, jhi = _jsd_interval(arm, randoms, kind)
                jsds = [_jsd(r, kind) for r in randoms]
                text += (f"; JSD to dense: PASER {_jsd(arm, kind):.4f}, random {statistics.mean(jsds):.4f}, "
                         f"PASER minus random {_jsd(arm, kind) - statistics.mean(jsds):+.4f} [{jlo:+.4f}, {jhi:+.4f}]")
            lines.append(text)
    return lines + variant_lines(rows, kind)


def variant_lines(rows: dict, kind: str) -> list[str]:
    """Distillation's defaults: each variant (``@distill-jsd``, ``@distill-tN``) against forward
    KL at temperature 1 (``@distill``) on the same random subsets, in the metric and in JSD."""
    lines = []
    variants = sorted({a.split("@")[1] for a in rows if "@distill-" in a and "#" not in a and "~" not in a})
    for unit in BUDGETS:
        for variant in variants:
            seeds = [s for s in range(5) if f"{unit}:random-{s}@{variant}" in rows
                     and f"{unit}:random-{s}@distill" in rows]
            if not seeds:
                continue
            new = [rows[f"{unit}:random-{s}@{variant}"] for s in seeds]
            base = [rows[f"{unit}:random-{s}@distill"] for s in seeds]
            lo, hi = paired_bootstrap(new, base, kind)
            mean_new, mean_base = (statistics.mean(_metric(r, kind) for r in g) for g in (new, base))
            jlo, jhi = _jsd_interval(new, base, kind)
            jsd_new, jsd_base = (statistics.mean(_jsd(r, kind) for r in g) for g in (new, base))
            lines.append(f"- {unit}: @{variant} against @distill (forward KL, T 1) on random seeds {seeds}: metric "
                         f"{mean_new:.4f} vs {mean_base:.4f}, difference {mean_new - mean_base:+.4f} [{lo:+.4f}, "
                         f"{hi:+.4f}]; JSD to dense {jsd_new:.4f} vs {jsd_base:.4f}, difference "
                         f"{jsd_new - jsd_base:+.4f} [{jlo:+.4f}, {jhi:+.4f}] (paired bootstrap 95% over held-out "
                         "records; lower is better)")
    return (["", "Distillation's defaults (same subsets, steps and batches):"] + lines) if lines else []


def random_arms(rows: dict, unit: str) -> list[dict]:
    """The SFT random arms of budget ``unit`` (``UNIT:random-K``, no @objective, #seed, ~conv or
    =METHOD)."""
    return [rows[a] for a in sorted(rows)
            if a.startswith(f"{unit}:random-") and a == base_arm(a) and compute_target(a) is None]


def compute_target(arm: str) -> str | None:
    """``UNIT:METHOD`` of an equal-compute arm ``UNIT:random-K=METHOD``; None for any other arm."""
    base = base_arm(arm)
    return f"{base.split(':')[0]}:{base.split('=', 1)[1]}" if "=" in base else None


def place(metric: float, values: list[float]) -> str:
    """Where ``metric`` lies against the random seeds' ``values`` (lower is better)."""
    return "below all" if metric < min(values) else "above all" if metric > max(values) else "inside"


def equal_compute_budget(rows: dict, unit: str, target: str) -> str:
    """The token budget of ``UNIT:random-K=TARGET``: the unit's budget times TARGET's selection +
    recovery compute over the mean of the unit's random arms' (``compute_ratio``). Recovery's
    compute grows with the tokens trained (token batches of one size, two epochs), so a random
    subset of that budget spends what TARGET spent in all."""
    name = f"{unit}:random-K={target}"
    if not str(BUDGETS[unit]).endswith("tok"):
        raise SystemExit(f"{name}: equal-compute arms take a token budget, not {unit}")
    if f"{unit}:{target}" not in rows:
        raise SystemExit(f"{name}: {unit}:{target} has not run on this setting; run it first")
    randoms = random_arms(rows, unit)
    ratio = compute_ratio([rows[f"{unit}:{target}"]], randoms) if randoms else None
    if ratio is None:
        raise SystemExit(f"{name}: needs {unit}:{target} and the unit's random arms with their compute ledgers")
    fraction = float(BUDGETS[unit].removesuffix("tok")) * ratio
    if fraction >= 1:
        raise SystemExit(f"{name}: {unit}:{target} spent {ratio:.2f}x random's compute, more than training on "
                         f"the whole pool ({fraction:.0%} of its tokens)")
    return f"{fraction:.6f}tok"


def equal_compute_lines(rows: dict, kind: str) -> list[str]:
    """Every method with ``UNIT:random-K=METHOD`` arms against them: the method's metric minus their
    mean, the paired bootstrap 95% interval over held-out records, where it lies against them, and
    the compute of each side (selection + recovery, TFLOP)."""
    groups: dict[str, list[dict]] = {}
    for arm in sorted(rows):
        if arm == base_arm(arm) and (target := compute_target(arm)) is not None:
            groups.setdefault(target, []).append(rows[arm])
    lines = []
    for target, matched in groups.items():
        method = rows.get(target)
        if method is None or len(matched) < 2:
            continue
        values = [_metric(r, kind) for r in matched]
        metric = _metric(method, kind)
        lo, hi = paired_bootstrap(method, matched, kind)
        spent = [total_flops(r) for r in matched]
        lines.append(f"- {target} {metric:.4f} against {len(matched)} random subsets at its compute "
                     f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} "
                     f"(records {'/'.join(str(r.get('selected')) for r in matched)}, steps "
                     f"{'/'.join(str(r.get('steps')) for r in matched)}): {metric - statistics.mean(values):+.4f} "
                     f"[{lo:+.4f}, {hi:+.4f}] over held-out records{_families_interval(method, matched, kind)}, "
                     f"{place(metric, values)}; compute {total_flops(method) / 1e12:.2f} TFLOP against "
                     f"{statistics.mean(spent) / 1e12:.2f} (mean)")
    return (["", "At equal total compute (selection + recovery; method minus the random subsets trained at "
             "its compute):"] + lines) if lines else []


def unit_name(unit: str) -> str:
    return "record budget" if unit == "rec" else f"{float(BUDGETS[unit].removesuffix('tok')):.0%} token budget"


def _families_interval(arm, randoms: list[dict], kind: str) -> str:
    if kind != "suite":
        return ""
    lo, hi = paired_bootstrap(arm, randoms, kind, by="family")
    return f"; over families [{lo:+.4f}, {hi:+.4f}]"


def welch_interval(a: list[float], b: list[float]) -> tuple[float, float]:
    """95% Welch t interval of mean(a) - mean(b), runs as samples: unlike the bootstrap over
    held-out records it counts the spread between training runs and between subsets."""
    from scipy import stats

    found = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return float(found.low), float(found.high)


def seed_lines(rows: dict, kind: str) -> list[str]:
    """Training noise beside subset noise: every arm retrained with recovery seeds (``ARM#K``, also
    ``ARM@OBJECTIVE#K``; the random subsets it is set against are SFT's, as in the verdict),
    its mean and sd over recovery seeds (seed 0 is ``ARM`` itself) beside the sd of the unit's
    random subsets, and the seed mean minus the random mean."""
    retrained: dict[str, list[int]] = {}  # ARM -> its recovery seeds, 0 being ARM itself
    for a in sorted(rows):
        if "#" in a and "~" not in a and "=" not in a:
            arm, seed = a.split("#")
            retrained.setdefault(arm, [0] * (arm in rows)).append(int(seed))
    lines = []
    for unit in BUDGETS:
        randoms = random_arms(rows, unit)
        mine_here = {arm: sorted(seeds) for arm, seeds in sorted(retrained.items()) if arm.startswith(f"{unit}:")}
        if len(randoms) < 2 or not mine_here:
            continue
        values = [_metric(r, kind) for r in randoms]
        lines += ["", f"{unit}: recovery seeds (the same subset retrained; random subsets "
                      f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} over {len(randoms)} subsets, "
                      "recovery seed 0; lower is better)"]
        for arm, seeds in mine_here.items():
            if len(seeds) < 2:
                continue
            runs = [rows[arm if s == 0 else f"{arm}#{s}"] for s in seeds]
            mine = [_metric(r, kind) for r in runs]
            lo, hi = paired_bootstrap(runs, randoms, kind)
            runs_lo, runs_hi = welch_interval(mine, values)
            lines.append(f"- {arm} over recovery seeds {seeds}: {statistics.mean(mine):.4f} ± "
                         f"{statistics.stdev(mine):.4f} ({', '.join(f'{v:.4f}' for v in mine)}); its mean minus the "
                         f"random mean {statistics.mean(mine) - statistics.mean(values):+.4f} (paired bootstrap 95% "
                         f"over held-out records [{lo:+.4f}, {hi:+.4f}]{_families_interval(runs, randoms, kind)}; "
                         f"over runs, Welch t 95% with the seeds and the random subsets as samples "
                         f"[{runs_lo:+.4f}, {runs_hi:+.4f}])")
    return lines


def strat_scored(config: str) -> tuple[int, str]:
    """What ``strat-CONFIG`` scores, as (rank, words), fewest first: the sweep's tie-break,
    read from the settings ``strat_sections`` gives the arm."""
    from paser.selection.configs import SampleConfig

    sections = strat_sections(f"strat-{config}")
    sample = SampleConfig(**sections["sample"])
    if sample.needs_every_score:
        return 2, "every record"
    if sample.needs_cds:
        return 1, f"{sections['score']['per_cluster']} records per cluster"
    return 0, "none"


def strat_choice_lines(rows: dict, kind: str, unit: str = "tok") -> list[str]:
    """The registered choice of the strat sweep: the configuration with the lowest mean of the
    primary metric over its two sampling seeds; one that scores fewer records wins when its mean
    is within half the random subsets' sd of the best. Printed once every configuration has both
    seeds; until then, what has finished."""
    randoms = random_arms(rows, unit)
    means = {}
    for config in STRAT_CONFIGS:
        runs = [rows[a] for a in (f"{unit}:strat-{config}-0", f"{unit}:strat-{config}-1") if a in rows]
        if runs:
            means[config] = [_metric(r, kind) for r in runs]
    if not means or len(randoms) < 2:
        return []
    sd = statistics.stdev(_metric(r, kind) for r in randoms)
    lines = ["", f"{unit}: the strat sweep (mean of the primary metric over sampling seeds 0 and 1; random "
                 f"subsets' sd {sd:.4f}, half of it {sd / 2:.4f}; lower is better)"]
    for config, values in means.items():
        lines.append(f"- strat-{config} (scores {strat_scored(config)[1]}): {statistics.mean(values):.4f} "
                     f"({', '.join(f'{v:.4f}' for v in values)})")
    if len(means) < len(STRAT_CONFIGS) or any(len(v) < 2 for v in means.values()):
        return lines + ["- choice: not yet (every configuration needs both seeds)"]
    best = min(statistics.mean(v) for v in means.values())
    near = [c for c, v in means.items() if statistics.mean(v) <= best + sd / 2]
    chosen = min(near, key=lambda c: (strat_scored(c)[0], statistics.mean(means[c])))
    return lines + [f"- choice by the registered rule: strat-{chosen} (within half the random sd of the best: "
                    f"{', '.join('strat-' + c for c in near)}; of those it scores the fewest records, then the "
                    "lowest mean)"]


def convergence_lines(rows: dict, kind: str) -> list[str]:
    """Does the ranking survive convergence? The ``ARM~conv`` arms (trained until their validation
    loss stopped improving, the best adapter kept): each one's metric and steps beside the same
    subset at the recipe's steps, and every other one (``paser@tokw~conv`` too) minus the mean of the
    converged SFT random arms, at convergence and at the recipe's steps on the same random subsets."""
    lines = []
    for unit in BUDGETS:
        conv = {a.removesuffix("~conv"): rows[a] for a in sorted(rows)
                if a.startswith(f"{unit}:") and a.endswith("~conv") and "#" not in a}
        if not conv:
            continue
        lines += ["", f"{unit}: trained until the validation loss stopped improving (`~conv`; lower is better)"]
        for arm, r in conv.items():
            fixed = f"; at {rows[arm]['steps']} steps {_metric(rows[arm], kind):.4f}" if arm in rows else ""
            how = "stopped early" if r.get("stopped_early") else "ran to the epoch limit"
            lines.append(f"- {arm}~conv: {_metric(r, kind):.4f} after {r['steps']} of {r.get('planned_steps')} "
                         f"planned steps ({how}; best validation loss {r.get('val_loss'):.4f} at step "
                         f"{r.get('best_step')}, the adapter kept){fixed}")
        randoms = [a for a in conv if a.split(":")[1].startswith("random-") and "@" not in a]
        if not randoms:
            continue
        for arm in (a for a in conv if a not in randoms):
            lo, hi = paired_bootstrap(conv[arm], [conv[a] for a in randoms], kind)
            diff = _metric(conv[arm], kind) - statistics.mean(_metric(conv[a], kind) for a in randoms)
            text = (f"- {arm} minus the converged random mean ({', '.join(randoms)}): {diff:+.4f} (paired bootstrap "
                    f"95% over held-out records [{lo:+.4f}, {hi:+.4f}]"
                    f"{_families_interval(conv[arm], [conv[a] for a in randoms], kind)})")
            if arm in rows and all(a in rows for a in randoms):
                same = [rows[a] for a in randoms]
                flo, fhi = paired_bootstrap(rows[arm], same, kind)
                fdiff = _metric(rows[arm], kind) - statistics.mean(_metric(a, kind) for a in same)
                text += f"; at the recipe's steps, the same subsets: {fdiff:+.4f} [{flo:+.4f}, {fhi:+.4f}]"
            lines.append(text)
    return lines


def family_table(setting: str, rows: dict, work: Path, families: pd.DataFrame, unit: str = "rec") -> list[str]:
    """Suite settings: per family, its degradation in the pool (mean JSD and loss gap of its
    records, and the CDS of the clusters they fall in, averaged over its records: what PASER's
    allocation sees), the records and tokens PASER gave it at budget ``unit``, its dense and pruned
    answer NLL, and PASER's answer NLL and gap closed against the mean of that unit's random arms.
    ``families``: the pool's ``id`` and ``family`` columns (None when the pool file is not here)."""
    scores_file = work / "subsets" / f"{unit}-paser.scores.parquet"
    if f"{unit}:paser" not in rows:
        return []
    if families is None or not scores_file.is_file():
        return not_here("Per family", setting, unit, [work / "pool.jsonl", scores_file])
    if stale := not_trained("Per family", setting, unit, work, rows, [f"{unit}:paser"]):
        return stale
    scores = pd.read_parquet(scores_file).merge(families, on="id")
    summary = json.loads(scores_file.with_name(scores_file.name.replace("scores.parquet", "clusters.json")).read_text())
    scores["cds"] = scores["cluster"].map({c["cluster"]: c["cds"] for c in summary["clusters"]})
    randoms = random_arms(rows, unit)
    dense, none = rows.get("dense"), rows.get("none")
    if not randoms or dense is None or none is None:
        return []
    lines = ["", f"Per family ({setting}, {unit_name(unit)}): degradation in the pool, PASER's share, gap closed",
             "", "| family | mean JSD | mean loss gap | CDS of its clusters | PASER records | PASER tokens | "
             "answer NLL dense | answer NLL pruned | PASER minus random (answer NLL) | gap closed PASER | "
             "gap closed random (mean) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for family, g in scores.groupby("family"):
        chosen = g[g["status"] == "selected"]
        d, p = dense["suite"]["answer_nll"][family], none["suite"]["answer_nll"][family]
        nll = rows[f"{unit}:paser"]["suite"]["answer_nll"][family]
        mine = gap_recovered(d, p, nll)
        rand = statistics.mean(gap_recovered(d, p, r["suite"]["answer_nll"][family]) or 0.0 for r in randoms)
        versus = nll - statistics.mean(r["suite"]["answer_nll"][family] for r in randoms)
        lines.append(f"| {family} | {g['jsd'].mean():.4f} | {g['loss_gap'].mean():.3f} | {g['cds'].mean():.4f} | "
                     f"{len(chosen)} | "
                     f"{int(chosen['n_tokens'].sum())} | {d:.3f} | {p:.3f} | {versus:+.3f} | "
                     f"{'' if mine is None else f'{mine:.1%}'} | {rand:.1%} |")
    return lines


def not_here(table: str, setting: str, unit: str, needed: list[Path]) -> list[str]:
    """The line that stands for a table whose inputs live in the work folder (``--out``) and are
    not on this machine: the arm JSONs are committed, the subsets and scores are not."""
    missing = ", ".join(str(p) for p in needed if not p.is_file())
    return ["", f"{table} ({setting}, {unit_name(unit)}): not printed, the work folder lacks {missing} "
                f"(running the arms {unit}:paser and {unit}:random-K with this --out writes their subsets again)"]


def not_trained(table: str, setting: str, unit: str, work: Path, rows: dict, arms: list[str]) -> list[str]:
    """The line that stands for a table whose subsets in the work folder are not the ones the arms
    trained (their records and tokens differ from the arm JSONs'): a subset selected again, after
    a change of machine, from scores that came out differently. Empty when every one matches."""
    off = []
    for arm in arms:
        row = rows[arm]
        scores = pd.read_parquet(work / "subsets" / f"{_file(arm)}.scores.parquet", columns=["status", "n_tokens"])
        chosen = scores.loc[scores["status"] == "selected", "n_tokens"]
        if "selected" in row and (len(chosen), int(chosen.sum())) != (row["selected"], row.get("selected_tokens")):
            off.append(f"{_file(arm)} has {len(chosen)} records and {int(chosen.sum()):,} tokens, the arm trained "
                       f"{row['selected']} and {row.get('selected_tokens', 0):,}")
    if not off:
        return []
    return ["", f"{table} ({setting}, {unit_name(unit)}): not printed, the work folder's subsets are not the ones "
                f"the arms trained ({'; '.join(off)}; selected again since the arms ran)"]


def _restrict(row: dict, idx: np.ndarray) -> dict:
    """An Alpaca arm's held-out per-record values on records ``idx`` only (for a group's bootstrap)."""
    per = row["heldout"]["per_record"]
    return {"heldout": {"per_record": {k: list(np.asarray(per[k])[idx]) for k in ("nll_sum", "tokens")}}}


def heldout_nll(row: dict, idx: np.ndarray) -> float:
    """Held-out response NLL of an Alpaca arm over records ``idx`` (summed NLL over summed tokens)."""
    sums, tokens = _per_record(row, "alpaca")
    return float(sums[idx].sum() / tokens[idx].sum())


def cluster_lines(paser: dict, randoms: list[dict], where: np.ndarray, cds: dict,
                  paser_tokens: dict, random_tokens: dict) -> list[str]:
    """Per PASER cluster: CDS, held-out records (``where``: each held-out record's cluster), tokens
    PASER and (mean) the random subsets put in it, and PASER minus the random mean on its held-out
    records; then the *favoured* clusters (more PASER tokens than the random mean) against the
    *starved* ones, each with a paired bootstrap 95% interval over its held-out records."""
    lines = ["| cluster | CDS | held-out records | PASER tokens | random tokens (mean) | "
             "PASER minus random (held-out NLL) |", "|---:|---:|---:|---:|---:|---:|"]
    favoured = []
    for c in sorted(cds, key=lambda c: -cds[c]):
        idx = np.flatnonzero(where == c)
        mine, theirs = paser_tokens.get(c, 0), random_tokens.get(c, 0.0)
        if mine > theirs:
            favoured.append(c)
        versus = "" if not len(idx) else \
            f"{heldout_nll(paser, idx) - statistics.mean(heldout_nll(r, idx) for r in randoms):+.4f}"
        lines.append(f"| {c} | {cds[c]:.4f} | {len(idx)} | {mine} | {theirs:.1f} | {versus} |")
    lines.append("")
    for name, group in (("favoured", favoured), ("starved", [c for c in cds if c not in favoured])):
        idx = np.flatnonzero(np.isin(where, group))
        if not len(idx):
            lines.append(f"- {name} clusters {sorted(group)}: no held-out record")
            continue
        diff = heldout_nll(paser, idx) - statistics.mean(heldout_nll(r, idx) for r in randoms)
        lo, hi = paired_bootstrap(_restrict(paser, idx), [_restrict(r, idx) for r in randoms], "alpaca")
        lines.append(f"- {name} clusters {sorted(group)} ({len(idx)} held-out records): PASER minus the random "
                     f"mean {diff:+.4f} (paired bootstrap 95% over their held-out records [{lo:+.4f}, {hi:+.4f}])")
    return lines


def nearest_pool_records(work: Path) -> pd.Series:
    """Each Alpaca held-out record's nearest pool record (its id), cosine over the selection's
    embeddings, the held-out instructions embedded by the same (default) model. Computed once per
    report: every budget's PASER subset maps these ids to its own clusters."""
    pool_ids = pd.read_parquet(work / "select" / "pool.parquet", columns=["id"])["id"]
    pool = np.load(work / "select" / "embeddings.npy")
    texts = instruction_texts(load_pool(work / "heldout.jsonl").records)
    held = embed_texts(texts, EmbedConfig(), cache_dir=work / "embed-cache")
    return pool_ids.iloc[(held @ pool.T).argmax(1)]


def cluster_table(setting: str, rows: dict, work: Path, unit: str, nearest: pd.Series | None) -> list[str]:
    """Alpaca: where PASER's allocation helps, per cluster of its subset at budget ``unit``
    (``cluster_lines``); ``nearest``: ``nearest_pool_records`` (None when the pool's embeddings are
    not here)."""
    scores_file = work / "subsets" / f"{unit}-paser.scores.parquet"
    randoms = random_arms(rows, unit)
    if f"{unit}:paser" not in rows or not randoms:
        return []
    files = [scores_file, *(work / "subsets" / f"{_file(r['arm'])}.scores.parquet" for r in randoms)]
    if nearest is None or not all(f.is_file() for f in files):
        needed = [work / "select" / "embeddings.npy", work / "select" / "pool.parquet", work / "heldout.jsonl"]
        return not_here("Per cluster", setting, unit, needed + files)
    if stale := not_trained("Per cluster", setting, unit, work, rows, [f"{unit}:paser", *(r["arm"] for r in randoms)]):
        return stale
    scores = pd.read_parquet(scores_file, columns=["id", "cluster", "n_tokens", "status"]).set_index("id")
    summary = json.loads(scores_file.with_name(f"{unit}-paser.clusters.json").read_text())

    def tokens_per_cluster(name: str) -> pd.Series:
        chosen = pd.read_parquet(work / "subsets" / f"{name}.scores.parquet", columns=["id", "status"])
        return scores.loc[chosen.loc[chosen["status"] == "selected", "id"]].groupby("cluster")["n_tokens"].sum()

    paser_tokens = {int(c): int(t) for c, t in tokens_per_cluster(f"{unit}-paser").items()}
    per_random = [tokens_per_cluster(_file(r["arm"])) for r in randoms]
    random_tokens = {int(c): statistics.mean(float(t.get(c, 0)) for t in per_random)
                     for c in set().union(*(t.index for t in per_random))}
    where = scores["cluster"].loc[nearest].to_numpy()
    return ["", f"Per cluster ({setting}, {unit_name(unit)}): held-out records by the PASER cluster of their "
                "nearest pool record, PASER against the random mean", "",
            *cluster_lines(rows[f"{unit}:paser"], randoms, where,
                           {c["cluster"]: c["cds"] for c in summary["clusters"]}, paser_tokens, random_tokens)]


def comparisons(rows: dict, kind: str):
    """Per budget unit with at least two random seeds: (unit, (random mean, sd, seeds), one dict
    per other SFT method that ran: its arm, metric, difference from the random mean, paired
    bootstrap 95% intervals over held-out records and (suite) over families, and where it lies
    against the random seeds: "below all", "inside" or "above all")."""
    for unit in BUDGETS:
        randoms = random_arms(rows, unit)
        if len(randoms) < 2:
            continue
        values = [_metric(r, kind) for r in randoms]
        found = []
        candidates = [(f"{unit}:{m}", rows.get(f"{unit}:{m}")) for m in METHODS + NEW_METHODS
                      if not m.startswith("random-")]
        for suffix in SUFFIXED:  # on the random subsets the mean over them is the arm
            repeats = [rows[f"{unit}:random-{k}@{suffix}"] for k in range(5) if f"{unit}:random-{k}@{suffix}" in rows]
            if repeats:
                candidates.append((f"{unit}:random@{suffix} ({len(repeats)} subsets)", repeats))
            candidates.append((f"{unit}:paser@{suffix}", rows.get(f"{unit}:paser@{suffix}")))
        if unit == "tok":  # the whole pool beside the 20% subsets: what training on everything buys, at its cost
            candidates.append(("full", rows.get("full")))
        for name, arm in candidates:
            if not arm:
                continue
            group = arm if isinstance(arm, list) else [arm]
            metric = statistics.mean(_metric(r, kind) for r in group)
            found.append({"arm": name, "metric": metric, "diff": metric - statistics.mean(values),
                          "records": paired_bootstrap(arm, randoms, kind),
                          "families": paired_bootstrap(arm, randoms, kind, by="family") if kind == "suite" else None,
                          "place": place(metric, values), "jsd": jsd_difference(group, randoms, kind),
                          "compute": compute_ratio(group, randoms)})
            found[-1]["verdict"] = verdict(found[-1], rows, name, arm, values, kind)
        yield unit, (statistics.mean(values), statistics.stdev(values), len(values)), found


def _reading(compared: dict) -> str:
    """Rule (a) and (b) on one comparison: "worse" when the paired interval lies above zero,
    "candidate" when the value is below every random seed and the interval below zero, else "level"."""
    lo, hi = compared["records"]
    if lo > 0:
        return "worse"
    return "candidate" if compared["place"] == "below all" and hi < 0 else "level"


def verdict(compared: dict, rows: dict, name: str, arm, values: list[float], kind: str) -> str:
    """The registered decision rule on one comparison: (a) below every random seed, (b) the paired
    95% interval over held-out records below zero, (c) retrained with recovery seeds 1 and 2
    (``ARM#1``, ``ARM#2``) the three-seed mean still below the random mean; for the mean over the
    random subsets of a recovery (``random@X``) the five subsets are the repeats, and it is "pending"
    until all five have run. "worse" when the interval lies above zero, "level" when neither.
    ``full`` (the whole pool, more tokens and steps) is a reference beside the 20% subsets, not
    judged."""
    if name == "full":
        return "reference (the whole pool, not at equal tokens)"
    if isinstance(arm, list) and len(arm) < 5:  # the repeats are not all in: no verdict yet, whichever way
        return f"pending: {len(arm)} of 5 subsets ({_reading(compared)} so far)"
    reading = _reading(compared)
    if reading != "candidate":
        return reading
    if isinstance(arm, list):
        return "beats random"
    missing = [f"#{k}" for k in (1, 2) if f"{name}#{k}" not in rows]
    if missing:
        return f"candidate: recovery seeds {', '.join(missing)} pending"
    three = statistics.mean(_metric(rows[a], kind) for a in (name, f"{name}#1", f"{name}#2"))
    if three < statistics.mean(values):
        return "beats random"
    return f"not confirmed: mean over recovery seeds 0-2 {three:.4f}, not below the random mean"


def jsd_difference(group: list[dict], randoms: list[dict], kind: str):
    """(mean JSD to dense of ``group`` minus the random mean, its paired 95% interval), or None
    when some arm lacks the JSD."""
    if not all(_jsd(r, kind) is not None for r in [*group, *randoms]):
        return None
    diff = statistics.mean(_jsd(r, kind) for r in group) - statistics.mean(_jsd(r, kind) for r in randoms)
    return diff, _jsd_interval(group, randoms, kind)


def total_flops(row: dict) -> float | None:
    """An arm's selection + recovery FLOPs by paser's ledger (None for arms run before it)."""
    found = row.get("compute")
    return None if found is None else found["selection"]["flops_total"] + found["recovery"]["flops_total"]


def compute_ratio(group: list[dict], randoms: list[dict]) -> float | None:
    """The mean selection + recovery compute of ``group`` over that of the random arms."""
    mine, theirs = [total_flops(r) for r in group], [total_flops(r) for r in randoms]
    if None in mine or None in theirs:
        return None
    return statistics.mean(mine) / statistics.mean(theirs)


def load_rows(results: Path, setting: str) -> dict:
    """The finished arms of a setting, by arm name."""
    rows = {}
    for path in sorted((results / setting).glob("*.json")):
        row = json.loads(path.read_text())
        rows[row["arm"]] = row
    return rows


def compare_all(results: Path) -> dict:
    """Every setting's finished arms and comparisons, computed once for the summary and the
    per-setting reports: setting -> (rows, list of ``comparisons``)."""
    found = {}
    for setting, (kind, _) in SETTINGS.items():
        rows = load_rows(results, setting)
        found[setting] = rows, list(comparisons(rows, kind))
    return found


def arm_label(setting: str, arm: str) -> str:
    """An arm as the report names it: the sweep's choice, run on another setting, is the frozen strat."""
    if setting != STRAT_SWEEP_SETTING and arm.split(":")[-1] == FROZEN_STRAT:
        return f"{arm} (strat, frozen)"
    return arm


def sweep_or_verdict(setting: str, compared: dict) -> str:
    """The rule's verdict, except for the strat sweep's arms on the sweep's setting: they choose the
    configuration that the other settings test, so none of them is judged where it was chosen."""
    if setting == STRAT_SWEEP_SETTING and compared["arm"].split(":")[-1] in STRAT_SWEEP:
        return "sweep arm (chooses the frozen strat; judged on the other settings)"
    return compared["verdict"]


FOURTH_SETTING = "alpaca4800-25"  # where only the best new method runs beside random and paser
NEW_CANDIDATES = ("strat", "random@tokw", "paser@tokw", "adaptive", "rounds", "random@self", "paser@self")


def new_method(arm: str) -> str | None:
    """The candidate (``NEW_CANDIDATES``) a 20%-token comparison stands for, or None for paser,
    full, the strat sweep's other arms and a mean over fewer than the five random subsets."""
    base, _, count = arm.partition(" (")  # "tok:random@tokw (5 subsets)"
    if not base.startswith("tok:") or (count and count != "5 subsets)"):
        return None
    method = base.split(":", 1)[1]
    method = "strat" if method == FROZEN_STRAT else method
    return method if method in NEW_CANDIDATES else None


def fourth_setting_choice_lines(compared: dict) -> list[str]:
    """The registered choice of the new method that runs on the fourth setting: the lowest mean of
    (method minus the random mean) over the other three settings at the 20% token budget, once every
    candidate has run on all three. The frozen strat's value on suite-15 is the sweep's arm of the
    same configuration and seed (there a choice, not a test)."""
    others = [s for s in SETTINGS if s != FOURTH_SETTING]
    diffs: dict[str, dict[str, float]] = {}
    random_mean: dict[str, float] = {}
    for setting in others:
        for unit, (mean, _, _), found in compared.get(setting, (None, []))[1]:
            if unit == "tok":
                random_mean[setting] = mean
            for c in found if unit == "tok" else []:
                if (method := new_method(c["arm"])) is not None:
                    diffs.setdefault(method, {})[setting] = c["diff"]
    if not diffs:
        return []
    lines = ["", f"## The new method for {FOURTH_SETTING}", "",
             f"Method minus the random mean at the 20% token budget on {', '.join(others)} (random@X: the mean over "
             "all five subsets), and their mean (the registered choice: the lowest mean, once every method has run "
             "on all three; lower is better):", ""]
    for method in NEW_CANDIDATES:
        found = diffs.get(method, {})
        cells = ", ".join(f"{s} {found[s]:+.4f}" if s in found else f"{s} not run" for s in others)
        mean = f"mean {statistics.mean(found.values()):+.4f}" if len(found) == len(others) else "mean: not yet"
        lines.append(f"- {method}: {cells}; {mean}")
    missing = [m for m in NEW_CANDIDATES if len(diffs.get(m, {})) < len(others)]
    complete = [m for m in diffs if m not in missing]
    chosen = min(complete, key=lambda m: statistics.mean(diffs[m].values()), default=None)
    if not missing:
        return lines + [f"- choice by the registered rule: {chosen}"]
    # every metric here is an NLL, never below zero, so a method's difference on a setting it has
    # not run is at least minus that setting's random mean: a mean that bound keeps above the best
    # complete one cannot change the choice
    not_yet = [f"- choice: not yet ({', '.join(missing)} not run on every setting)"]
    if chosen is None or any(s not in random_mean for s in others):
        return lines + not_yet
    floors = {m: statistics.mean(diffs.get(m, {}).get(s, -random_mean[s]) for s in others) for m in missing}
    best = statistics.mean(diffs[chosen].values())
    if any(floor <= best for floor in floors.values()):
        return lines + not_yet
    bounds = ", ".join(f"{m}'s at least {floor:+.4f}" for m, floor in floors.items())
    return lines + [f"- choice by the registered rule: {chosen} (before {', '.join(missing)} ran on every setting: "
                    f"with the metric never below zero, their means cannot fall below {best:+.4f}; {bounds})"]


def summary(compared: dict) -> str:
    """One table over every setting and budget unit (``compare_all``'s output): each method minus
    the mean of the random seeds (SFT, the recipe's steps), the view the verdicts are read from."""
    lines = ["## Summary: every method minus the random mean (SFT, the recipe's steps; lower is better)", "",
             "| setting | budget | steps | random (mean ± sd, seeds) | arm | metric | minus random | 95% over "
             "held-out records | 95% over families | against the random seeds | JSD to dense minus random [95%] | "
             "compute (selection + recovery) / random's | verdict (the registered rule) |",
             "|---|---|---:|---|---|---:|---:|---|---|---|---|---:|---|"]
    for setting, (rows, compared_here) in compared.items():
        for unit, (mean, sd, n), found in compared_here:
            steps = "/".join(sorted({str(r.get("steps")) for r in random_arms(rows, unit)}))
            for c in found:
                families = "" if c["families"] is None else f"[{c['families'][0]:+.4f}, {c['families'][1]:+.4f}]"
                jsd = ("" if c.get("jsd") is None else
                       f"{c['jsd'][0]:+.4f} [{c['jsd'][1][0]:+.4f}, {c['jsd'][1][1]:+.4f}]")
                ratio = "" if c.get("compute") is None else f"{c['compute']:.2f}"
                lines.append(f"| {setting} | {unit_name(unit)} | {steps} | {mean:.4f} ± {sd:.4f} ({n}) | "
                             f"{arm_label(setting, c['arm'])} | {c['metric']:.4f} | {c['diff']:+.4f} | "
                             f"[{c['records'][0]:+.4f}, {c['records'][1]:+.4f}] | {families} | {c['place']} | "
                             f"{jsd} | {ratio} | {sweep_or_verdict(setting, c)} |")
    return "\n".join(lines) + "\n"


def report(setting: str, work: Path, rows: dict, compared: list) -> str:
    """The setting's printed block from its finished arms and their ``comparisons``."""
    kind = SETTINGS[setting][0]
    if not {"dense", "none"} <= set(rows):
        return f"## {setting}\n\n(references not finished yet)\n"
    order = [a for a in arms_of(setting) if a in rows] + sorted(a for a in rows if a not in arms_of(setting))
    dense, none = _metric(rows["dense"], kind), _metric(rows["none"], kind)
    name = "held-out response NLL" if kind == "alpaca" else "suite answer NLL (macro)"
    second = "suite answer NLL (macro)" if kind == "alpaca" else "answer-found accuracy"
    held = rows["none"]["suite"]
    accuracy = (f"; accuracy on {held['accuracy_records']} of them (the first of each family)"
                if "accuracy_records" in held else "")
    lines = [f"## {setting}", "", f"{name}: dense {dense:.4f}, pruned {none:.4f}; suite held-out "
             f"{held['records']} records ({held['removed_overlap']} of {held['generated']} removed as in the "
             f"pool){accuracy}", "",
             f"| arm | {name} | gap closed | JSD to dense | {second} | records | tokens | tokens/record | steps | "
             "tokens/step | TFLOP selection | TFLOP recovery | selection s | recovery s | eval s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in order:
        r = rows[arm]
        gap = gap_recovered(dense, none, _metric(r, kind))
        jsd = _jsd(r, kind)
        per_record = f"{r['selected_tokens'] / r['selected']:.1f}" if r.get("selected") else ""
        flops = r.get("compute", {})
        tflop = {part: f"{flops[part]['flops_total'] / 1e12:.2f}" if part in flops else ""
                 for part in ("selection", "recovery")}
        lines.append(f"| {arm} | {_metric(r, kind):.4f} | {'' if gap is None else f'{gap:.1%}'} | "
                     f"{'' if jsd is None else f'{jsd:.4f}'} | {second_metric(r, kind):.3f} | "
                     f"{r.get('selected', '')} | {r.get('selected_tokens', '')} | {per_record} | "
                     f"{r.get('steps', '')} | "
                     f"{r['tokens_per_step']['mean'] if 'tokens_per_step' in r else ''} | "
                     f"{tflop['selection']} | {tflop['recovery']} | "
                     f"{r.get('selection_s', 0):.1f} | {r.get('recovery_s', 0):.1f} | {r['eval_s']:.1f} |")
    for unit, (mean, sd, n), found in compared:
        lines += ["", f"{unit}: random {mean:.4f} ± {sd:.4f} (mean ± sd over {n} seeds)"]
        for c in found:
            families = "" if c["families"] is None else f"; over families [{c['families'][0]:+.4f}, " \
                                                         f"{c['families'][1]:+.4f}]"
            lines.append(f"- {arm_label(setting, c['arm'])} minus the random mean: {c['diff']:+.4f} (paired "
                         f"bootstrap 95% over held-out records [{c['records'][0]:+.4f}, {c['records'][1]:+.4f}]"
                         f"{families}; lower is better)")
    lines += (seed_lines(rows, kind) + equal_compute_lines(rows, kind) + convergence_lines(rows, kind)
              + distill_lines(rows, kind))
    if setting == STRAT_SWEEP_SETTING:
        lines += strat_choice_lines(rows, kind)
    if kind == "suite":
        pool = work / "pool.jsonl"
        families = (pd.DataFrame([r.fields for r in load_pool(pool).records])[["id", "family"]]
                    if pool.is_file() else None)
        for unit in ("rec", "tok"):
            lines += family_table(setting, rows, work, families, unit)
    else:
        here = all((work / f).is_file() for f in ("select/embeddings.npy", "select/pool.parquet", "heldout.jsonl"))
        nearest = nearest_pool_records(work) if here else None
        for unit in ("tok", "rec", "tok5", "tok4"):
            lines += cluster_table(setting, rows, work, unit, nearest)
    shared = sorted({r["date"] for r in rows.values() if r.get("shared_machine")})
    spent = sum(r.get(k, 0.0) for r in rows.values() for k in ("selection_s", "recovery_s", "eval_s"))
    lines += ["", f"Time recorded by the arms: {spent / 60:.1f} min"
                  + (f" (some taken beside other work on the same cores, on {', '.join(shared)})" if shared else "")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--arms", nargs="+", default=None, help="arms to run, in this order (default: all)")
    ap.add_argument("--out", default="runs/decisive", help="work folder: subsets, adapters, evaluations")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "decisive"),
                    help="one JSON per finished arm (commit them) and results.md")
    ap.add_argument("--dense", default="smollm2-135m-instruct")
    ap.add_argument("--pruned", default=None, help="a pruned model instead of paser's twin (tests)")
    ap.add_argument("--alpaca", default=str(ROOT.parent / "shared" / "data" / "alpaca_5000.json"))
    ap.add_argument("--suite-pool", type=int, default=1000)
    ap.add_argument("--suite-heldout", type=int, default=480)
    ap.add_argument("--alpaca-pool", type=int, default=1000)
    ap.add_argument("--alpaca-heldout", type=int, default=200)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-tokens", type=int, default=None,
                    help="padded tokens per forward pass (records sorted by length; speed only, see RecoverConfig)")
    ap.add_argument("--learning-rate", type=float, default=3e-4)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--conv-epochs", type=float, default=10.0, help="~conv arms: most epochs")
    ap.add_argument("--conv-eval-every", type=int, default=5, help="~conv arms: steps between validation losses")
    ap.add_argument("--conv-patience", type=int, default=3, help="~conv arms: evaluations without improvement")
    ap.add_argument("--accuracy-per-family", type=int, default=10,
                    help="suite records per family whose answers are generated for accuracy")
    ap.add_argument("--shared-machine", action="store_true", help="mark the timings as taken beside other work")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and 2 steps per arm, for a quick check")
    ap.add_argument("--report-only", action="store_true", help="write results.md from the finished arms, run none")
    ap.add_argument("--add-jsd", action="store_true", help="compute the JSD to the dense model for finished arms "
                    "(of --arms, and the references) that lack it, then run the arms asked for")
    ap.add_argument("--add-compute", action="store_true", help="record the selection and recovery compute of "
                    "finished arms that lack it (from their run and recovery folders), then run the arms asked for")
    args = ap.parse_args(argv)
    if args.smoke:
        args.suite_pool, args.suite_heldout, args.alpaca_pool, args.alpaca_heldout = 60, 36, 60, 12
        args.max_steps, args.max_new_tokens, args.accuracy_per_family = 2, 4, 2
    results, out = Path(args.results), Path(args.out)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; settings "
          f"{' '.join(args.settings)}", flush=True)
    for setting in [] if args.report_only else args.settings:
        known = arms_of(setting)
        wanted = args.arms or known
        unknown = [a for a in wanted if base_arm(a).split("=")[0] not in known
                   or (compute_target(a) is not None and base_arm(compute_target(a)) not in known)]
        if unknown:
            raise SystemExit(f"{setting}: unknown arm(s) {unknown}; known: {known} (ARM#K for recovery seed K)")
        todo = [a for a in ("dense", "none", *wanted) if not (results / setting / f"{_file(a)}.json").is_file()]
        if not todo and not args.add_jsd and not args.add_compute:
            continue
        setup = prepare(setting, args, out / setting) | {"work": out / setting, "setting": setting}
        if args.add_jsd:
            add_jsd(setting, results, setup, args, ["dense", "none", *args.arms] if args.arms else None)
        if args.add_compute:
            add_compute(setting, results, setup, args)
        for arm in dict.fromkeys(todo):
            row = run_arm(setting, arm, setup, args)
            (results / setting).mkdir(parents=True, exist_ok=True)
            (results / setting / f"{_file(arm)}.json").write_text(json.dumps(row))
            shown = row.get("heldout", {}).get("nll", row["suite"]["answer_nll_macro"])
            print(f"{setting} {arm}: metric {shown:.4f}, records {row.get('selected', '')}, tokens "
                  f"{row.get('selected_tokens', '')}, steps {row.get('steps', '')}, recovery "
                  f"{row.get('recovery_s', 0):.0f} s, eval {row['eval_s']:.0f} s", flush=True)
    # every setting with finished arms, not only those run now
    compared = compare_all(results)
    head = summary(compared) + "".join(line + "\n" for line in fourth_setting_choice_lines(compared))
    text = "\n".join([head] + [report(s, out / s, *compared[s]) for s in SETTINGS if (results / s).is_dir()])
    (results / "results.md").write_text(text)
    print(text)


def _commit() -> str | None:
    """The commit of the code that ran the arm (None outside a git checkout)."""
    import subprocess

    found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if found.returncode != 0:
        return None
    return found.stdout.strip()


def _file(arm: str) -> str:
    return arm.replace(":", "-").replace("#", "-seed").replace("~", "-").replace("@", "-").replace("=", "-eq-")


if __name__ == "__main__":
    sys.exit(main())
