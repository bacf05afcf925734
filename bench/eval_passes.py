"""Evaluation with a reference model: one pass of the evaluated model (NLL and JSD together) vs two.

    python bench/eval_passes.py --records 200

`paser evaluate --divergence-from DENSE` measures the held-out response NLL and the mean token
JSD to the dense model. The baseline runs the evaluated model twice over the records: once for
the NLL (the recovery loss pass) and once beside the dense model for the JSD. paser takes both
from the JSD pass. Records: the first N of ../shared/data/alpaca_5000.json (read at run time,
never copied); evaluated model: paser's 25% twin of SmolLM2-135M-Instruct, reference: the dense
model. Both ways run in this process on the same records; the script prints their seconds, the
ratio, peak RSS, and the largest difference in per-record NLL and JSD.
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
from paser.evaluation.metrics import response_token_nll, token_stats  # noqa: E402
from paser.models.load import load_pair  # noqa: E402
from paser.selection.configs import ScoreConfig  # noqa: E402
from paser.selection.passes import score_shard  # noqa: E402
from paser.selection.scoring import twin_reference  # noqa: E402
from paser.selection.settings import Settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "../shared/data/alpaca_5000.json"))
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16, help="the decisive experiment's evaluation batch")
    ap.add_argument("--shared-machine", action="store_true", help="mark the timings as taken beside other work")
    args = ap.parse_args()

    records = load_pool(args.data).records[:args.records]
    dense, pruned = load_pair("smollm2-135m-instruct", twin_reference(Settings()), dtype="float32")
    tok = dense.tokenizer
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads"
          + (" (shared with other work: timings are upper bounds)" if args.shared_machine else ""))
    print(f"records: {len(records)} from {args.data}, batch {args.batch_size}, cutoff 256, float32")

    token_stats(pruned.model, tok, records[:2], reference=dense.model)  # warm-up, untimed
    with PeakRSS() as mem_two:
        start = time.perf_counter()
        sums, counts = response_token_nll(pruned.model, tok, records, batch_size=args.batch_size)
        config = ScoreConfig(batch_size=args.batch_size, share_prefix=False)
        jsd_two = score_shard(dense.model, pruned.model, tok, records, config)["jsd"].to_numpy()
        t_two = time.perf_counter() - start
    with PeakRSS() as mem_one:
        start = time.perf_counter()
        sums_one, counts_one, jsd_one = token_stats(pruned.model, tok, records, batch_size=args.batch_size,
                                                    reference=dense.model)
        t_one = time.perf_counter() - start
    assert (counts == counts_one).all()
    nll_two, nll_one = sums / counts, sums_one / counts_one
    print(f"two passes (NLL pass + JSD pass): {t_two:.1f} s, peak RSS {mem_two.peak_mb:.0f} MB")
    print(f"one pass (paser evaluate):        {t_one:.1f} s, peak RSS {mem_one.peak_mb:.0f} MB")
    print(f"speed-up: {t_two / t_one:.2f}x")
    print(f"mean response NLL: {sums.sum() / counts.sum():.6f} (two) vs {sums_one.sum() / counts_one.sum():.6f} (one); "
          f"largest per-record difference {np.abs(nll_two - nll_one).max():.2e}")
    print(f"mean token JSD: {np.nanmean(jsd_two):.6f} (two) vs {np.nanmean(jsd_one):.6f} (one); "
          f"largest per-record difference {np.nanmax(np.abs(jsd_two - jsd_one)):.2e}")


if __name__ == "__main__":
    main()
