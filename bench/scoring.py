"""Degradation scoring on the real SmolLM2 pair: paser's batched scorer vs a per-sample scorer.

    python bench/scoring.py --records 1000 --baseline-records 1000

Records: the first N of ../shared/data/alpaca_5000.json (read at run time, never copied). The
pruned model is paser's 25% twin of SmolLM2-135M-Instruct (made once, cached). The baseline runs
each model once per sample, unbatched, with full logits: the plain definition of the score.
Both run in this process, on the same records; the script prints samples per second, peak RSS,
the speed ratio, and the largest score difference.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from memory import PeakRSS  # noqa: E402

from paser.data.pools import load_pool  # noqa: E402
from paser.models.load import load_pair  # noqa: E402
from paser.selection.configs import ScoreConfig  # noqa: E402
from paser.selection.degradation import encode_records  # noqa: E402
from paser.selection.passes import score_shard, score_unbatched  # noqa: E402
from paser.selection.scoring import twin_reference  # noqa: E402
from paser.selection.settings import Settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "../shared/data/alpaca_5000.json"))
    ap.add_argument("--records", type=int, default=1000)
    ap.add_argument("--baseline-records", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    records = load_pool(args.data).records[:args.records]
    pruned_ref = twin_reference(Settings())
    dense, pruned = load_pair("smollm2-135m-instruct", pruned_ref, dtype=args.dtype)
    cfg = ScoreConfig(batch_size=args.batch_size, dtype=args.dtype)
    n_tokens = sum(len(e.ids) for e in encode_records(dense.tokenizer, records, cfg.prompt))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, dtype {args.dtype}")
    print(f"records: {len(records)} from {args.data} ({n_tokens} prompt+response tokens, cutoff {cfg.prompt.cutoff})")

    with PeakRSS() as mem:
        start = time.perf_counter()
        batched = score_shard(dense.model, pruned.model, dense.tokenizer, records, cfg)["jsd"].to_numpy()
        t_batched = time.perf_counter() - start
    print(f"paser batched: {len(records) / t_batched:.2f} samples/s, {n_tokens / t_batched:.0f} tokens/s, "
          f"{t_batched:.1f} s, peak RSS {mem.peak_mb:.0f} MB (+{mem.peak_mb - mem.start_mb:.0f} MB)")

    base = records[:args.baseline_records]
    with PeakRSS() as mem:
        start = time.perf_counter()
        reference = score_unbatched(dense.model, pruned.model, dense.tokenizer, base, cfg)
        t_base = time.perf_counter() - start
    print(f"per-sample:    {len(base) / t_base:.2f} samples/s, {t_base:.1f} s, peak RSS {mem.peak_mb:.0f} MB "
          f"(+{mem.peak_mb - mem.start_mb:.0f} MB)")
    speed = (len(records) / t_batched) / (len(base) / t_base)
    diff = np.nanmax(np.abs(batched[:len(base)] - reference))
    print(f"speed ratio (batched / per-sample): {speed:.2f}x")
    print(f"max |score difference| over {len(base)} records: {diff:.2e} ({'within' if diff <= 1e-4 else 'ABOVE'} 1e-4)")


if __name__ == "__main__":
    main()
