"""Token counting's tokenizer calls: a list of records per call against one record per call.

    python bench/tokenize_speed.py                   # the 4,998 records of ../shared/data/alpaca_5000.json

Both ways run paser's tokenisation rule (prompt and response encoded apart, eos, cutoff 256) with
the bundled SmolLM2 tokenizer in one process; the baseline is ``tokenize_example`` record by record,
the way paser counted tokens before ``tokenize_examples``. Prints both wall times, the ratio, and
checks that the ids are the same.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from paser.data.pools import load_pool  # noqa: E402
from paser.data.prompts import tokenize_example, tokenize_examples  # noqa: E402
from paser.models.load import load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_5000.json"))
    args = ap.parse_args()
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    records = load_pool(args.data).records
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d')}; {len(records):,} records", flush=True)
    start = time.perf_counter()
    alone = [tokenize_example(tokenizer, r) for r in records]
    one = time.perf_counter() - start
    start = time.perf_counter()
    together = tokenize_examples(tokenizer, records)
    many = time.perf_counter() - start
    print(f"  one record a call (baseline): {one:.2f} s")
    print(f"  a list a call (paser):        {many:.2f} s")
    print(f"  ratio {one / many:.2f}x; the same ids: {alone == together}")


if __name__ == "__main__":
    main()
