"""Start-up of the `paser` command and of `import paser`: wall time and peak memory of fresh processes.

    python bench/startup.py              # 5 runs of each, the fastest reported

Each case runs in a new Python process (what a user's shell does), timed from the outside; peak
RSS is the process's own maximum resident set (``ru_maxrss`` of the finished child). The baseline
is a process importing what ``paser --help`` imported before the configs held no algorithm code:
the selection pipeline, recovery, evaluation and comparison modules (torch, transformers,
scikit-learn, the trainer). The ratio is each case against it.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

CASES = {
    "paser --help": [sys.executable, "-m", "paser.cli", "--help"],
    "paser select --help": [sys.executable, "-m", "paser.cli", "select", "--help"],
    "import paser": [sys.executable, "-c", "import paser"],
    "baseline: the algorithm modules": [sys.executable, "-c", "import paser.selection.pipeline, paser.recovery.entry, "
                                        "paser.evaluation.entry, paser.comparison.runner"],
}


def measure(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one fresh process, read with wait4 so each child is counted alone."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {os.waitstatus_to_exitcode(status)})")
    return seconds, usage.ru_maxrss / 1024  # kB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d')}; python {platform.python_version()}; fastest of {args.runs}", flush=True)
    results = {}
    for name, argv in CASES.items():
        runs = [measure(argv) for _ in range(args.runs)]
        results[name] = (min(s for s, _ in runs), max(m for _, m in runs))
    base = results["baseline: the algorithm modules"][0]
    for name, (seconds, peak) in results.items():
        print(f"  {name:34s} {seconds:6.2f} s  peak RSS {peak:6.0f} MB  ({seconds / base:.2f}x the baseline's time)")


if __name__ == "__main__":
    main()
