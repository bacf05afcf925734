"""Token budgets end to end: `paser select` at 20% of the records vs 20% of the tokens.

    python bench/token_budget.py                     # the embedded default (1,000 suite records)
    python bench/token_budget.py --alpaca 500        # the first 500 records of ../shared/data/alpaca_5000.json
    python bench/token_budget.py --suite-size 200    # quicker

Both arms run ``paser.select`` (through the Prefect flow, as the CLI does) in this process on
fresh run folders with the same settings; the pruned twin, the converted GGUF and Prefect's
temporary server (a 24-record warm-up selection) are made first, outside the timings. The record
arm is the baseline. Prints each arm's wall time, peak RSS (children included: Prefect's server),
scoring stage time, the selection in records, tokens and response tokens against the budget, the
unspent rest against the longest record, and the token/record wall-time ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd  # noqa: E402
from memory import PeakRSS  # noqa: E402

import paser  # noqa: E402
from paser.selection.scoring import twin_reference  # noqa: E402
from paser.selection.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite-size", type=int, default=1000)
    ap.add_argument("--alpaca", type=int, default=None, help="use the first N Alpaca records instead of the suite")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "alpaca_5000.json"))
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="paser-token-bench-"))
    select: dict = {"suite_size": args.suite_size, "progress": False}
    if args.alpaca:
        pool = root / f"alpaca{args.alpaca}.json"
        pool.write_text(json.dumps(json.loads(Path(args.data).read_text())[:args.alpaca]))
        select = {"data": str(pool), "progress": False}
    twin_reference(Settings.load(None, {"select": select}))  # made (or found) outside the timings
    # Prefect's temporary server starts on the first flow of the process: start it outside the timings
    paser.select(budget="4", out=str(root / "warm-up"), flow=True, select={"suite_size": 24, "progress": False})
    what = f"first {args.alpaca} Alpaca records" if args.alpaca else f"suite {args.suite_size} records"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {what}; "
          f"run folders under {root}")
    seconds = {}
    for arm, budget in (("records", "0.2"), ("tokens", "0.2tok")):
        out = root / arm
        with PeakRSS(children=True) as mem:
            start = time.perf_counter()
            paser.select(budget=budget, out=str(out), flow=True, select=select)
            seconds[arm] = time.perf_counter() - start
        c = json.loads((out / "clusters.json").read_text())
        score = json.loads((out / "timings.json").read_text())["score"]["seconds"]
        longest = max(json.loads(line)["paser_tokens"] for line in (out / "selected.jsonl").open())
        pool_longest = int(pd.read_parquet(out / "tokens.parquet")["n_tokens"].max())
        print(f"budget {budget:>7s}: {seconds[arm]:6.1f} s wall, peak RSS {mem.peak_mb:5.0f} MB, score stage "
              f"{score:6.1f} s; selected {c['selected']} records, {c['selected_tokens']} tokens "
              f"({c['selected_response_tokens']} response) of a budget of {c['budget']} {c['budget_unit']}")
        if arm == "tokens":
            print(f"  unspent {c['budget'] - c['selected_tokens']} tokens; longest record in the pool "
                  f"{pool_longest}, in the selection {longest}")
    print(f"tokens/records wall time: {seconds['tokens'] / seconds['records']:.3f}x")


if __name__ == "__main__":
    main()
