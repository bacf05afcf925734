"""The held-out capability suite: records of another seed than the pool's with the pool's prompts
removed, each family's answer NLL and answer-found accuracy, and the share of each family's
dense-vs-pruned gap a model closed.

    python -c "from paser.evaluation.suite import gap_recovered; print(gap_recovered(2.0, 4.0, 3.0))"
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from paser.data.pools import load_pool
from paser.data.suite import suite_pool
from paser.errors import DataError
from paser.evaluation.metrics import (
    answer_found,
    input_tokens,
    normalise_answer,
    response_token_nll,
    token_stats,
)
from paser.models.generate import generate_answers
from paser.progress import announce


def pool_prompts(source: str) -> set[tuple[str, str]]:
    """The (instruction, input) pairs of a pool: ``embedded`` (the embedded default pool), a
    ``paser select`` run folder, or an instruction file."""
    from paser.selection.runfolder import read_run_pool

    if source == "embedded":
        records = suite_pool(1000, 0).records
    elif (Path(source) / "pool.parquet").is_file():
        records = read_run_pool(Path(source))
    else:
        records = load_pool(source).records
    return {(r.instruction, r.input) for r in records}


def held_out_suite(size: int, seed: int, exclude: list[str]) -> tuple[list, dict]:
    """``size`` suite records of ``seed`` minus those whose prompt occurs in a pool of ``exclude``,
    and what was removed."""
    records = suite_pool(size, seed).records
    seen: set[tuple[str, str]] = set()
    for source in exclude:
        seen |= pool_prompts(source)
    kept = [r for r in records if (r.instruction, r.input) not in seen]
    if not kept:
        raise DataError(f"every one of the {size} evaluation-suite records (seed {seed}) occurs in {exclude}; "
                        "raise suite_size or change suite_seed")
    return kept, {"generated": len(records), "removed_overlap": len(records) - len(kept), "excluded_from": exclude}


def answer_nll(model, tokenizer, records, template: str = "alpaca", cutoff: int = 256, batch_size: int = 8) -> dict:
    """Per family: the mean over its records of each expected answer's mean token NLL given the
    prompt; the macro average over families."""
    return _answer_summary(records, *response_token_nll(model, tokenizer, records, template, cutoff, batch_size))


def _by_family(records, values) -> dict[str, float]:
    families: dict[str, list[float]] = {}
    for record, value in zip(records, values):
        families.setdefault(record.fields["family"], []).append(float(value))
    return {f: float(np.nanmean(v)) for f, v in sorted(families.items())}


def _answer_summary(records, sums: np.ndarray, counts: np.ndarray) -> dict:
    per_record = sums / np.maximum(counts, 1)
    per_family = _by_family(records, per_record)
    return {"per_family": per_family, "macro": float(np.mean(list(per_family.values()))),
            "records_per_family": dict(sorted(Counter(r.fields["family"] for r in records).items())),
            "per_record": {"id": [r.id for r in records], "family": [r.fields["family"] for r in records],
                           "nll": per_record.tolist()}}


def jsd_summary(records, values: np.ndarray) -> dict:
    """The mean token JSD per record, their mean, and per family for suite records."""
    out = {"records": len(records), "mean": float(np.nanmean(values)),
           "per_record": {"id": [r.id for r in records], "jsd": values.tolist()}}
    if records and "family" in records[0].fields:
        out["per_family"] = _by_family(records, values)
        out["macro"] = float(np.mean(list(out["per_family"].values())))
    return out


def suite_accuracy(model, tokenizer, size: int, seed: int, template: str = "alpaca", max_new_tokens: int = 48,
                   batch_size: int = 8, exclude: list[str] | None = None, cutoff: int = 256,
                   accuracy_per_family: int | None = None, reference=None) -> dict:
    """Answer NLL per family on the held-out suite (``size`` generated records of ``seed`` minus
    those whose prompt occurs in a pool of ``exclude``), and answer-found accuracy per family (and
    overall) on all of them or on the first ``accuracy_per_family`` of each family. Given a
    ``reference`` model, also the answers' mean token JSD to it (``jsd``), from the same pass."""
    records, held = held_out_suite(size, seed, exclude or [])
    sums, counts, jsd = token_stats(model, tokenizer, records, template, cutoff, batch_size, reference)
    result = {"records": len(records), "seed": seed, **held, "answer_nll": _answer_summary(records, sums, counts),
              "compute": {"tokens": input_tokens(tokenizer, records, template, cutoff),
                          "positions": int(counts.sum())}}
    if jsd is not None:
        result["jsd"] = jsd_summary(records, jsd)
    if accuracy_per_family is not None:
        by_family: dict[str, list] = {}
        for r in records:
            by_family.setdefault(r.fields["family"], []).append(r)
        records = [r for r in records if by_family[r.fields["family"]].index(r) < accuracy_per_family]
    if not records:
        return result
    announce(f"generating answers to {len(records)} suite records ({max_new_tokens} tokens at most)")
    answers = generate_answers(model, tokenizer, records, template, max_new_tokens, batch_size,
                               result["compute"].setdefault("generation", {}))
    per_family: dict[str, list[bool]] = {}
    exact = []
    examples = []
    for record, answer in zip(records, answers):
        ok = answer_found(record.response, answer)
        exact.append(normalise_answer(answer) == normalise_answer(record.response))
        per_family.setdefault(record.fields["family"], []).append(ok)
        if len(examples) < 24:
            examples.append({"id": record.id, "expected": record.response, "answer": answer, "found": ok})
    flat = [ok for oks in per_family.values() for ok in oks]
    return result | {"accuracy_records": len(flat), "accuracy": sum(flat) / len(flat),
                     "exact_match": sum(exact) / len(exact),
                     "per_family": {f: sum(oks) / len(oks) for f, oks in sorted(per_family.items())},
                     "examples": examples}


def read_reference(path: str) -> dict:
    """A saved evaluation (eval.json, or the folder holding it)."""
    file = Path(path) / "eval.json" if Path(path).is_dir() else Path(path)
    try:
        return json.loads(file.read_text())
    except OSError as err:
        raise DataError(f"{file}: cannot read the reference evaluation: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{file}: not an eval.json ({err.msg} at line {err.lineno})") from None


def suite_gap_closed(suite: dict, dense: dict, pruned: dict, where: tuple[str, str] = ("dense", "pruned")) -> dict:
    """The share of each family's dense-vs-pruned answer-NLL gap that ``suite`` closed, and of the
    macro average's gap; the references must come from the same held-out suite."""
    for ref, name in ((dense, where[0]), (pruned, where[1])):
        if "answer_nll" not in (ref or {}):
            raise DataError(f"{name}: its evaluation has no suite answer NLL (evaluate it with suite_size > 0)")
        if (ref["seed"], ref["records"], ref["generated"]) != (suite["seed"], suite["records"], suite["generated"]):
            raise DataError(f"{name}: evaluated on another suite (seed {ref['seed']}, {ref['records']} records "
                            f"of {ref['generated']}) than this one (seed {suite['seed']}, {suite['records']} "
                            f"of {suite['generated']}); use the same suite_size, suite_seed and suite_exclude")
    d, p, m = dense["answer_nll"], pruned["answer_nll"], suite["answer_nll"]
    return {"per_family": {f: gap_recovered(d["per_family"][f], p["per_family"][f], v)
                           for f, v in m["per_family"].items()},
            "macro": gap_recovered(d["macro"], p["macro"], m["macro"]),
            "dense_macro": d["macro"], "pruned_macro": p["macro"]}


def gap_recovered(dense: float, pruned: float, recovered: float) -> float | None:
    """Share of the dense-vs-pruned gap that recovery closed (1: back to dense; negative: worse)."""
    if dense == pruned:
        return None
    return (recovered - pruned) / (dense - pruned) + 0.0  # + 0.0: no "-0.0%" when nothing changed
