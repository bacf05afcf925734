"""A pool of LaMini-instruction's size through paser's CPU stages, stage by stage, with embeddings given.

    python bench/lamini_scale.py                     # 2,585,615 records, LaMini-instruction's count
    python bench/lamini_scale.py --records 20000     # a quick try
    python bench/lamini_scale.py --stop-after data   # the inputs and the data stage only
    python bench/lamini_scale.py --records 52002 --per-cluster 16   # CDS from 16 scored records per cluster

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

With ``--per-cluster M`` the selection tilts the cluster shares by CDS (``--cds-temperature 1``) and
scores only a seeded M records per cluster with the bundled model and its paser-pruned twin
(``score.per_cluster``); two more stages are timed (the twin, made once and cached, and the
scoring), and the scoring's FLOPs from the run's ledger (manifest.json) are set against a full
scoring pass over every record of the pool counted by the same rule (``paser.ledger``: both models
over every record's prompt + response tokens, the head at its response tokens): the ratio the
per-cluster sample saves, counted, not run.
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
from collections import Counter
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


def print_scoring_share(run: Path) -> None:
    """The sampled scoring's FLOPs (the run's ledger) against a full pass over the pool by the same rule."""
    from paser.ledger import forward_flops, human

    ledger = json.loads((run / "manifest.json").read_text())["compute"]
    sampled = ledger["flops_by_stage"]["score"]
    models = json.loads((run / "models.json").read_text())
    pool = pd.read_parquet(run / "tokens.parquet", columns=["n_tokens", "n_response"])
    tokens, positions = int(pool["n_tokens"].sum()), int(pool["n_response"].sum())
    full = sum(forward_flops(models[m]["flop_params"]["body"], models[m]["flop_params"]["head"], tokens, positions)
               for m in ("dense", "pruned"))
    scores = pd.read_parquet(run / "degradation.parquet", columns=["n_prompt", "n_response", "n_scored"])
    scored_tokens = int((scores["n_prompt"] + scores["n_response"]).sum())
    print(f"  scored {len(scores):,} of {len(pool):,} records ({scored_tokens:,} of {tokens:,} tokens; "
          f"head positions {scores['n_scored'].sum():,}, their response tokens {scores['n_response'].sum():,})",
          flush=True)
    print(f"  scoring {human(sampled)} (the ledger) against a full pass {human(full)} (the same rule, counted): "
          f"{sampled / full:.2%} of it", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=LAMINI_RECORDS)
    ap.add_argument("--alpaca", default=str(ROOT.parent / "shared" / "data" / "alpaca_5000.json"))
    ap.add_argument("--work", default=None, help="folder for the pool, embeddings and run (default: a temp folder)")
    ap.add_argument("--stop-after", choices=["data", "tokens"], default=None,
                    help="end after this stage (to measure the first stages again without the clustering)")
    ap.add_argument("--per-cluster", type=int, default=None, metavar="M",
                    help="tilt the shares by CDS, scored on a seeded M records per cluster (the bundled pair)")
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

    tilted = args.per_cluster is not None
    settings = Settings.load(None, {
        "select": {"data": str(work / "pool.jsonl"), "budget": "0.04tok", "method": "strat", "out": str(work / "run"),
                   "progress": False},
        # stratified random, or shares tilted by CDS from a sample per cluster
        "sample": {"cds_temperature": 1.0 if tilted else 0.0, "ies_temperature": 0.0, "dedup": "off"},
        "score": {"per_cluster": args.per_cluster},
        "embed": {"precomputed": str(work / "embeddings.npz")}})
    shutil.rmtree(work / "run", ignore_errors=True)  # every stage measured, none reused from an earlier run
    run = pipeline.run_folder(settings)
    timed("data (read, validate, store)", lambda: pipeline.stage_data(settings, run))
    ids = pd.read_parquet(run / "pool.parquet", columns=["id"])["id"].tolist()
    reasons = Counter(r["reason"] for r in json.loads((run / "data.json").read_text())["rejected"])
    print(f"  kept {len(ids):,} records; set aside: "
          f"{', '.join(f'{n:,} ({why})' for why, n in reasons.items()) or 'none'}", flush=True)
    if args.stop_after == "data":
        return
    np.savez(work / "embeddings.npz", ids=np.asarray(ids, dtype=str), embeddings=x)  # in the pool's order
    del x, ids
    timed("tokens (the dense tokenizer)", lambda: pipeline.stage_tokens(settings, run))
    if args.stop_after == "tokens":
        return
    pipeline.resolve_run_budget(settings, run)
    timed("embed (the given file)", lambda: pipeline.stage_embed(settings, run))
    timed("clusters (neighbours, map, K)", lambda: pipeline.stage_cluster(settings, run))
    if tilted:
        twin = timed("twin (paser prune, cached)", lambda: pipeline.stage_twin(settings, run))
        timed(f"score ({args.per_cluster} records per cluster)", lambda: pipeline.stage_score(settings, run, twin))
    timed(f"select (strat, CDS temperature {settings.sample.cds_temperature:g})",
          lambda: pipeline.stage_select(settings, run))
    timed("report", lambda: write_report(settings, run))
    fit = json.loads((run / "cluster_fit.json").read_text())
    chosen = json.loads((run / "clusters.json").read_text())
    print(f"  K {fit['k']}; selected {chosen['selected']:,} records, {chosen['selected_tokens']:,} of "
          f"{chosen['budget']:,} budget tokens", flush=True)
    if tilted:
        print_scoring_share(run)
    largest = max((f for f in run.iterdir() if f.is_file()), key=lambda f: f.stat().st_size)
    start = time.perf_counter()
    readers = {".npy": np.load, ".npz": lambda f: dict(np.load(f)), ".parquet": pd.read_parquet}
    readers.get(largest.suffix, Path.read_bytes)(largest)
    print(f"  largest file written: {largest.name}, {largest.stat().st_size / 2**20:.0f} MB, read back in "
          f"{time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
