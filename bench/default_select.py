"""The embedded default's ``paser select``, in this process and through Prefect (``--flow``), each a
fresh process on a fresh run folder (the twin and the converted GGUF cached beforehand).

    python bench/default_select.py

Prints each run's wall time and peak RSS (the finished child's ``ru_maxrss``, children included),
the in-process run against the flow (the baseline, run in the same invocation), and whether the two
``selected.jsonl`` are the same bytes.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path


def run(out: Path, *flags: str) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "paser.cli", "--quiet", "select", "--out", str(out), *flags], check=True,
                   env=os.environ | {"HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return seconds, max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024 ** 2


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="paser-default-select-"))
    print(f"# python bench/default_select.py  ({platform.node()}, {os.cpu_count()} cores, {date.today()})")
    flow_s, flow_gb = run(root / "flow", "--flow")
    here_s, here_gb = run(root / "here")
    print(f"through the flow: {flow_s:.1f} s, peak RSS {flow_gb:.2f} GB")
    print(f"in this process:  {here_s:.1f} s, peak RSS {here_gb:.2f} GB  ({here_s / flow_s:.2f}x the flow's time)")
    same = (root / "flow" / "selected.jsonl").read_bytes() == (root / "here" / "selected.jsonl").read_bytes()
    print(f"identical selected.jsonl: {same}")


if __name__ == "__main__":
    main()
