"""Where a comparison's compute went: each finished arm's selection FLOPs by stage (embedding,
scoring), its recovery FLOPs, its total against the mean of its budget's random subsets (the
baseline, read from the same folder), and the held-out records its evaluation kept.

    python bench/compare_compute.py bench/results/suite20k-claim

Reads the folder's ``compare.json`` and its arms' JSON (``arms/*.json``, written by ``paser
compare``); runs no model.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from paser.comparison.arms import parse_arm


def tflop(part: dict | None) -> float:
    return (part or {}).get("flops_total", 0.0) / 1e12


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a paser compare output folder (with arms/)")
    args = parser.parse_args(argv)
    rows = {}
    for file in sorted((args.folder / "arms").glob("*.json")):
        found = json.loads(file.read_text())
        rows[found["arm"]] = found
    totals = {name: tflop(r.get("compute", {}).get("selection")) + tflop(r.get("compute", {}).get("recovery"))
              for name, r in rows.items() if r.get("compute")}
    budgets = json.loads((args.folder / "compare.json").read_text())["compare"]["budgets"]
    arms = {name: parse_arm(name, budgets) for name in rows}
    print(f"{args.folder}: {len(rows)} arms")
    print("| arm | budget | steps | selection TFLOP (by stage) | recovery TFLOP | total | / random's mean |"
          " held-out suite records (removed: prompt in the pool) |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        arm = arms[name]
        held = r.get("suite") or {}
        suite = f"{held['records']} ({held.get('removed_overlap', 0)} removed)" if held else ""
        if name not in totals:
            print(f"| {name} | | | | | | | {suite} |")
            continue
        selection = r["compute"].get("selection") or {}
        stages = ", ".join(f"{k} {v / 1e12:.2f}" for k, v in (selection.get("flops_by_stage") or {}).items())
        randoms = [totals[n] for n in totals if arms[n].is_random and arms[n].budget == arm.budget
                   and arms[n].at_compute_of is None]
        ratio = f"{totals[name] / statistics.mean(randoms):.2f}x" if randoms else ""
        print(f"| {name} | {r.get('budget_name', arm.budget)} ({r.get('budget_unit', '')}) | {r.get('steps', '')} | "
              f"{tflop(selection):.2f}{f' ({stages})' if stages else ''} | {tflop(r['compute'].get('recovery')):.2f} | "
              f"{totals[name]:.2f} | {ratio} | {suite} |")


if __name__ == "__main__":
    main()
