"""Reading a run folder's pool for its texts alone (token counts, embeddings, scoring) against
reading it whole, records' own fields included.

    python bench/pool_read.py                          # 500,000 records written first (LaMini layout)
    python bench/pool_read.py --run DIR                # an existing run folder's pool.parquet
                                                       # (e.g. bench/lamini_scale.py --work W: W/run)

The records are those ``bench/lamini_scale.py`` writes (real Alpaca records, numbered), stored by
paser's data stage. Then ``read_run_pool(run, fields=False)`` (what the token, embedding and
scoring stages read now) and ``read_run_pool(run)`` (what they read before: the table with every
record's fields, each parsed from JSON), each in a fresh Python process started by this one, one
after the other: memory freed by one read stays with its process's allocator, so two reads in one
process would not show their peaks apart. Printed for each: wall time, the process's peak RSS
(sampled) and its RSS before the read; then the ratios, and whether the records are the same but
for ``fields`` (every 1,000th compared).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import PeakRSS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def stored_pool(records: int, alpaca: str, work: Path) -> Path:
    """A run folder whose data stage stored ``records`` LaMini-layout records."""
    from lamini_scale import write_realistic_pool

    from paser.selection import pipeline
    from paser.selection.settings import Settings

    write_realistic_pool(work / "pool.jsonl", alpaca, records)
    settings = Settings.load(None, {"select": {"data": str(work / "pool.jsonl"), "method": "random",
                                              "out": str(work / "run"), "progress": False}})
    run = pipeline.run_folder(settings)
    pipeline.stage_data(settings, run)
    return run


def read(run: Path, fields: bool) -> dict:
    """One read in this process: seconds, peak and starting RSS (MB), and a sample of the records."""
    from paser.selection import runfolder

    with PeakRSS(interval=0.05) as mem:
        start = time.perf_counter()
        records = runfolder.read_run_pool(run, fields=fields)
        seconds = time.perf_counter() - start
    step = max(1, len(records) // 1000)
    sample = [dataclasses.asdict(dataclasses.replace(r, fields=None)) for r in records[::step]]
    return {"records": len(records), "seconds": seconds, "peak_mb": mem.peak_mb, "start_mb": mem.start_mb,
            "sample": sample}


def in_child(run: Path, fields: bool) -> dict:
    """``read`` in a fresh process (this script with --child)."""
    out = subprocess.run([sys.executable, __file__, "--run", str(run), "--child", "whole" if fields else "texts"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=None, help="a run folder holding pool.parquet (default: write one)")
    ap.add_argument("--records", type=int, default=500_000)
    ap.add_argument("--alpaca", default=str(ROOT.parent / "shared" / "data" / "alpaca_5000.json"))
    ap.add_argument("--child", choices=["texts", "whole"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(read(Path(args.run), fields=args.child == "whole")))
        return
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    work = None
    if args.run is None:
        work = Path(tempfile.mkdtemp(prefix="paser-pool-read-"))
        run = stored_pool(args.records, args.alpaca, work)
    else:
        run = Path(args.run)
    size = (run / "pool.parquet").stat().st_size / 2**20
    texts, whole = in_child(run, fields=False), in_child(run, fields=True)
    print(f"{texts['records']:,} records, pool.parquet {size:,.0f} MB")
    for name, found in (("texts alone (fields=False)", texts), ("whole records (baseline)", whole)):
        print(f"  {name:<28} {found['seconds']:7.1f} s   peak RSS {found['peak_mb']:7.0f} MB "
              f"(before the read {found['start_mb']:.0f} MB)")
    grown = [f["peak_mb"] - f["start_mb"] for f in (texts, whole)]
    print(f"  ratio, baseline / texts alone: time {whole['seconds'] / texts['seconds']:.2f}x, growth of RSS "
          f"{grown[1] / max(grown[0], 1):.2f}x ({grown[1]:.0f} against {grown[0]:.0f} MB); records the same but "
          f"for their fields: {texts['sample'] == whole['sample']}")
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
