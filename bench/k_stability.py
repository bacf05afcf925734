"""Does K flip under perturbations that do not change the data?

    python bench/k_stability.py                                   # the embedded default, 20 noise draws
    python bench/k_stability.py --pools suite alpaca1000 alpaca4800 realistic20000 --draws 20

For each pool the diffusion map and the NMF error curve are computed again under each perturbation:
the rows as they come; 1e-6 of Gaussian noise added to the embeddings (``--draws`` seeded draws);
the rows permuted; one BLAS/torch thread instead of two; the first record dropped. Three K rules
are read from each curve (paser.selection.clustering): the paper's knee (the K farthest below the
chord), ``knee_band`` (the largest K within 10% of the knee's height: paser's default) and the
largest eigengap of the diffusion operator. Printed per pool and rule: every K seen with how often,
and, where the pool has known families, the adjusted Rand index of that rule's clusters against
them (worst and best); the time of a curve.

Pools: ``suite`` is the embedded default (1,000 records of paser's capability suite, seed 0, 12
families); ``alpaca1000`` the first 1,000 records of ../shared/data/alpaca_5000.json and
``alpaca4800`` the 4,800 outside the held-out 200 of the alpaca4800 setting (no families);
``realisticN`` N rows of bench/realistic_pool.py's generator calibrated on the real 5,000 (its
families are paser's clusters of the real rows).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from paser.selection.clustering import SpectralClusterer, _nmf, nonnegative, spectral_rows  # noqa: E402
from paser.selection.configs import (
    ClusterConfig,  # noqa: E402
    EmbedConfig,  # noqa: E402
    ManifoldConfig,  # noqa: E402
)
from paser.selection.embedding import embed_texts, instruction_texts  # noqa: E402
from paser.selection.manifold import learn_manifold  # noqa: E402

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_5000.json"
RULES = ("knee", "knee_band", "eigengap")


def pool(name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(embeddings, families or None) of a named pool."""
    if name == "suite":
        from paser.data.suite import suite_pool

        records = suite_pool(1000, 0).records
        return embed_texts(instruction_texts(records, True), EmbedConfig()), np.array(
            [r.fields["family"] for r in records])
    if name.startswith("alpaca"):
        from paser.data.pools import load_pool

        records = load_pool(str(ALPACA)).records
        if name == "alpaca1000":
            records = records[:1000]
        else:  # the alpaca4800 setting: a seeded permutation, the first 200 held out
            order = np.random.default_rng(0).permutation(len(records))
            records = [records[i] for i in order[200:]]
        return embed_texts(instruction_texts(records, True), EmbedConfig()), None
    if name.startswith("realistic"):
        from realistic_pool import calibrate, real_rows

        real, families = real_rows(str(ALPACA))
        generated = calibrate(real, families)
        return generated.rows(int(name.removeprefix("realistic")), 1)
    raise SystemExit(f"unknown pool {name!r}")


def ks_of(x: np.ndarray, families: np.ndarray | None) -> tuple[dict, dict, float]:
    """K of each rule, the ARI of each rule's clusters (when families are known), curve seconds."""
    coords, eigenvalues = learn_manifold(x.astype(np.float32), ManifoldConfig())
    start = time.perf_counter()
    fitted = SpectralClusterer.from_config(ClusterConfig(n_clusters=None)).fit(coords, eigenvalues)
    seconds = time.perf_counter() - start
    ks = {"knee": fitted.knee_k_, "knee_band": fitted.knee_band_[1], "eigengap": fitted.eigengap_k_}
    aris = {}
    if families is not None:
        rows = nonnegative(spectral_rows(coords))
        for rule, k in ks.items():
            aris[rule] = adjusted_rand_score(families, _nmf(rows, k, 0)[0].argmax(1))
    return ks, aris, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pools", nargs="+", default=["suite"])
    ap.add_argument("--draws", type=int, default=20)
    args = ap.parse_args()
    print(f"# python {' '.join(sys.argv)}  ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')})")
    for name in args.pools:
        x, families = pool(name)
        cases = [("as is", x, families, None)]
        for draw in range(1, args.draws + 1):
            noise = np.random.default_rng(draw).normal(0, 1e-6, x.shape)
            cases.append((f"noise draw {draw}", x + noise, families, None))
        order = np.random.default_rng(0).permutation(len(x))
        cases.append(("rows permuted", x[order], None if families is None else families[order], None))
        cases.append(("1 thread", x, families, 1))
        cases.append(("first record dropped", x[1:], None if families is None else families[1:], None))
        seen = {rule: Counter() for rule in RULES}
        aris = {rule: [] for rule in RULES}
        seconds = []
        print(f"\n## {name}: {len(x)} rows" + (f", {len(set(families))} families" if families is not None else ""))
        for label, rows, fams, threads in cases:
            if threads:
                torch.set_num_threads(threads)
                with threadpool_limits(threads):
                    ks, ari, took = ks_of(rows, fams)
                torch.set_num_threads(2)
            else:
                ks, ari, took = ks_of(rows, fams)
            seconds.append(took)
            for rule in RULES:
                seen[rule][ks[rule]] += 1
                if rule in ari:
                    aris[rule].append(ari[rule])
            cells = [f"{rule} {ks[rule]}" + (f" (ARI {ari[rule]:.3f})" if rule in ari else "") for rule in RULES]
            print(f"  {label:<22} " + "  ".join(cells), flush=True)
        for rule in RULES:
            ari = f"; ARI {min(aris[rule]):.3f} to {max(aris[rule]):.3f}" if aris[rule] else ""
            moved = "never moved" if len(seen[rule]) == 1 else "MOVED"
            print(f"  {rule:<10} K seen: {dict(sorted(seen[rule].items()))} over {len(cases)} cases, {moved}{ari}")
        print(f"  curve (17 NMFs to convergence): {np.median(seconds):.1f} s median per case")


if __name__ == "__main__":
    main()
