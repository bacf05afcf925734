"""Recovery's wall time per optimizer step on the real pruned SmolLM2, three ways in one process.

    python bench/recovery_speed.py                  # 8 steps of each, Alpaca records, 20% token subset
    python bench/recovery_speed.py --steps 4 --records 200

The same subset and step plan (token batches of 8 x the pool's mean record tokens, the decisive
experiment's recipe) trained by ``paser recover`` three ways:
- ``before``: the vocabulary head at every position of every forward pass and each step's records
  in their plan order (the recovery paser ran before this benchmark was written, rebuilt here by
  turning off the two changes below);
- ``head``: the head only at the labelled (response) positions, records sorted by length inside
  each step (``micro_batch_tokens`` unset: 8 records a pass);
- ``head + 768``: the same with at most 768 padded tokens per forward pass.
Prints the wall time of each whole ``recover`` call (loading the model, about 2 s, included), per
step, the ratio to ``before`` and peak RSS.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alpaca", default=str(ROOT.parent / "shared" / "data" / "alpaca_5000.json"))
    ap.add_argument("--records", type=int, default=1000, help="pool records (a seeded sample of the file)")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)

    import paser
    import paser.recovery.job as job
    import paser.recovery.losses as losses
    from paser.data.pools import load_pool, write_jsonl
    from paser.selection.scoring import twin_reference
    from paser.selection.settings import Settings

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    work = Path(tempfile.mkdtemp(prefix="paser-recovery-speed-"))
    rows = [dict(r.fields) for r in load_pool(args.alpaca).records]
    order = np.random.default_rng(0).permutation(len(rows))[:args.records]
    write_jsonl(work / "pool.jsonl", [rows[i] for i in order])
    pruned = twin_reference(Settings.load(None, {"select": {"prune_ratio": 0.25}}))
    select = {"data": str(work / "pool.jsonl"), "pruned": pruned, "budget": "0.2tok", "method": "random",
              "out": str(work / "sel"), "progress": False}
    run = paser.select(select=select).out
    mean = pd.read_parquet(run / "tokens.parquet")["n_tokens"].mean()
    base = dict(epochs=2, batch_size=8, micro_batch_size=8, batch_tokens=int(round(8 * mean)), learning_rate=3e-4,
                val_size=0, max_steps=args.steps, progress=False)
    keep_split, keep_cut = losses.body_and_head, job.micro_batches

    def before_head(model):  # the full logits, as before
        return None, None

    def plan_order(steps, micro, world, lengths=None, max_tokens=None):  # a step's records in plan order
        return keep_cut(steps, micro, world)

    results = {}
    for name, patch, extra in (("before", True, {}), ("head", False, {}),
                               ("head + 768", False, {"micro_batch_tokens": 768})):
        losses.body_and_head, job.micro_batches = (before_head, plan_order) if patch else (keep_split, keep_cut)
        out = work / name.replace(" ", "")
        start = time.perf_counter()
        paser.recover(model=pruned, data=run / "selected.jsonl", out=out, **(base | extra))
        log = pd.read_json(out / "train_log.jsonl", lines=True)
        seconds = time.perf_counter() - start
        results[name] = seconds
        print(f"{name:>11}: {args.steps} steps in {seconds:.1f} s ({seconds / args.steps:.2f} s/step; loss "
              f"{log['loss'].iloc[0]:.3f} -> {log['loss'].iloc[-1]:.3f})", flush=True)
    losses.body_and_head, job.micro_batches = keep_split, keep_cut
    for name, seconds in results.items():
        print(f"{name:>11}: {results['before'] / seconds:.2f}x the speed of before")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:.2f} GB")


if __name__ == "__main__":
    sys.exit(main())
