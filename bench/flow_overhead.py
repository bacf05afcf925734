"""Prefect's overhead: the default selection through the flow vs the same stages called directly.

    python bench/flow_overhead.py                  # the embedded default (1,000 suite records)
    python bench/flow_overhead.py --suite-size 200 # quicker

Both arms run in this process on fresh run folders with the same settings (the pruned twin and
the converted GGUF are made first, outside the timings). Direct: ``paser.select`` in this process.
Flow: ``paser.select(flow=True)`` through ``paser/flows/selection.py``, whose first call also starts Prefect's
temporary API server. Then each arm re-selects at another budget on its own folder (every stage
reused: the flow finds them in Prefect's cache). Prints wall times, the flow/direct ratio, the
overhead in seconds, and peak RSS including child processes (the Prefect server).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import PeakRSS  # noqa: E402

import paser  # noqa: E402
from paser.selection.scoring import twin_reference  # noqa: E402
from paser.selection.settings import Settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite-size", type=int, default=1000)
    ap.add_argument("--reselect-budget", default="50")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="paser-flow-bench-"))
    overrides = {"select": {"suite_size": args.suite_size, "progress": False}}
    twin_reference(Settings.load(None, overrides))  # made (or found) outside the timings
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"suite {args.suite_size} records; run folders under {root}")

    results = {}
    for arm in ("direct", "flow"):
        out = str(root / arm)
        for phase, budget in (("select", None), ("reselect", args.reselect_budget)):
            s = overrides | {"select": overrides["select"] | {"out": out}}
            with PeakRSS(children=True) as mem:
                start = time.perf_counter()
                paser.select(budget=budget, flow=arm == "flow", **s)
                seconds = time.perf_counter() - start
            results[arm, phase] = seconds
            print(f"{arm:6s} {phase:8s}: {seconds:7.1f} s, peak RSS {mem.peak_mb:.0f} MB (with children)")
    same = (root / "direct" / "selected.jsonl").read_text() == (root / "flow" / "selected.jsonl").read_text()
    for phase in ("select", "reselect"):
        d, f = results["direct", phase], results["flow", phase]
        print(f"{phase}: flow/direct = {f / d:.3f}x, overhead {f - d:+.1f} s")
    print(f"identical selections: {same}")


if __name__ == "__main__":
    main()
