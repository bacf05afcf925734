"""A pool of LaMini-instruction's size through paser's CPU stages, stage by stage, with embeddings given.

    python bench/lamini_scale.py                     # 2,585,615 records, LaMini-instruction's count
    python bench/lamini_scale.py --records 20000     # a quick try
    python bench/lamini_scale.py --stop-after data   # the inputs and the data stage only

Writes a LaMini-layout JSONL (``instruction``, ``response``) of N records, each a real record of
``../shared/data/alpaca_5000.json`` (its instruction and input, with the row's number appended so
that no two instructions are equal, and its output) drawn as ``bench/realistic_pool.py`` draws its
rows, and beside it those rows' generated embeddings (.npz with the pool's ids): the embeddings a
GPU job would have made. Then ``paser select --method strat --cds-temperature 0 --ies-temperature 0
--dedup off --embeddings FILE --budget 0.04tok`` (stratified random: no model scores anything, the
tokenizer only counts) runs stage by stage in one
process: reading the pool, counting tokens, taking the embeddings, the clusters (neighbours,
diffusion map, K), the selection and the report. Printed per stage: wall time and the process's
peak RSS; then the largest file paser wrote into the run folder and the time to read it back.
Writing the inputs is not timed as a stage. No baseline: this measures whether a pool of this size
goes through at all, and what each stage costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from memory import PeakRSS  # noqa: E402
from realistic_pool import calibrate, real_rows  # noqa: E402

LAMINI_RECORDS = 2_585_615
ROOT = Path(__file__).resolve().parents[1]


def write_pool(path: Path, alpaca: str, parents: np.ndarray) -> None:
    """The JSONL: row i is real record parents[i], its instruction numbered."""
    real = json.loads(Path(alpaca).read_text())
    with path.open("w") as out:
        for i, p in enumerate(parents):
            r = real[int(p)]
            instruction = f"{r['instruction']}\n{r['input']}" if r.get("input") else r["instruction"]
            out.write(json.dumps({"instruction": f"{instruction} (#{i})", "response": r["output"]},
                                 ensure_ascii=False) + "\n")


def write_realistic_pool(path: Path, alpaca: str, records: int) -> np.ndarray:
    """The JSONL of ``records`` rows drawn as ``bench/realistic_pool.py`` draws them (seed 1); returns
    their generated embeddings, in the file's order."""
    real, families = real_rows(alpaca)
    x, parents = calibrate(real, families).draw(records, seed=1)
    write_pool(path, alpaca, parents)
    return x


def timed(name: str, fn):
    with PeakRSS(interval=0.1) as mem:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    print(f"  {name:<34} {seconds:8.1f} s   peak RSS {mem.peak_mb:8.0f} MB", flush=True)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=LAMINI_RECORDS)
    ap.add_argument("--alpaca", default=str(ROOT.parent / "shared" / "data" / "alpaca_5000.json"))
    ap.add_argument("--work", default=None, help="folder for the pool, embeddings and run (default: a temp folder)")
    ap.add_argument("--stop-after", choices=["data", "tokens"], default=None,
                    help="end after this stage (to measure the first stages again without the clustering)")
    args = ap.parse_args(argv)

    from paser.selection import pipeline
    from paser.selection.report import write_report
    from paser.selection.settings import Settings

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d')}; {args.records:,} records", flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="paser-lamini-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    x = write_realistic_pool(work / "pool.jsonl", args.alpaca, args.records)
    print(f"  inputs written in {time.perf_counter() - start:.0f} s (not a stage): pool.jsonl "
          f"{(work / 'pool.jsonl').stat().st_size / 2**30:.2f} GB", flush=True)

    settings = Settings.load(None, {
        "select": {"data": str(work / "pool.jsonl"), "budget": "0.04tok", "method": "strat", "out": str(work / "run"),
                   "progress": False},
        "sample": {"cds_temperature": 0.0, "ies_temperature": 0.0, "dedup": "off"},  # stratified random
        "embed": {"precomputed": str(work / "embeddings.npz")}})
    shutil.rmtree(work / "run", ignore_errors=True)  # every stage measured, none reused from an earlier run
    run = pipeline.run_folder(settings)
    timed("data (read, validate, store)", lambda: pipeline.stage_data(settings, run))
    if args.stop_after == "data":
        return
    ids = pd.read_parquet(run / "pool.parquet", columns=["id"])["id"].tolist()
    np.savez(work / "embeddings.npz", ids=np.asarray(ids, dtype=str), embeddings=x)  # in the pool's order
    del x, ids
    timed("tokens (the dense tokenizer)", lambda: pipeline.stage_tokens(settings, run))
    if args.stop_after == "tokens":
        return
    pipeline.resolve_run_budget(settings, run)
    timed("embed (the given file)", lambda: pipeline.stage_embed(settings, run))
    timed("clusters (neighbours, map, K)", lambda: pipeline.stage_cluster(settings, run))
    timed("select (strat, temperature 0)", lambda: pipeline.stage_select(settings, run))
    timed("report", lambda: write_report(settings, run))
    fit = json.loads((run / "cluster_fit.json").read_text())
    chosen = json.loads((run / "clusters.json").read_text())
    print(f"  K {fit['k']}; selected {chosen['selected']:,} records, {chosen['selected_tokens']:,} of "
          f"{chosen['budget']:,} budget tokens", flush=True)
    largest = max((f for f in run.iterdir() if f.is_file()), key=lambda f: f.stat().st_size)
    start = time.perf_counter()
    readers = {".npy": np.load, ".npz": lambda f: dict(np.load(f)), ".parquet": pd.read_parquet}
    readers.get(largest.suffix, Path.read_bytes)(largest)
    print(f"  largest file written: {largest.name}, {largest.stat().st_size / 2**20:.0f} MB, read back in "
          f"{time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
