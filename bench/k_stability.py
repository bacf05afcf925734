"""Does K flip under perturbations that do not change the data?

    python bench/k_stability.py                    # the embedded default's 1,000 suite records
    python bench/k_stability.py --records 500 --cases 3

For each case (0: the pool as is; odd cases: rows permuted; every case after 0: float noise of
1e-6 added to the embeddings; seeded by the case number) the diffusion map is learnt again, and
three K rules are applied to its NMF error curve: the paper's knee on NMFs stopped at tol 1e-4
(paser's rule before), the knee on NMFs run to convergence (tol 1e-6), and paser's default
``knee_band`` on the converged curve. Prints each rule's K and the adjusted Rand index of its
clusters against the 12 task families, per case, then the distinct K per rule and the worst ARI,
and the time the two curves took (17 NMFs each) with their ratio, the converged one against the
one stopped at tol 1e-4. The curve sample is the whole pool here (under the 10,000-record sample
size).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from paser.data.suite import suite_pool  # noqa: E402
from paser.selection.clustering import CURVE_MAX_ITER, CURVE_TOL, _nmf, knee, knee_band, nonnegative, spectral_rows  # noqa: E402
from paser.selection.embedding import EmbedConfig, embed_texts, instruction_texts  # noqa: E402
from paser.selection.manifold import ManifoldConfig, learn_manifold  # noqa: E402

RULES = ("knee, tol 1e-4", "knee, converged", "knee_band 0.1, converged")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1000)
    ap.add_argument("--cases", type=int, default=5)
    args = ap.parse_args()
    records = suite_pool(args.records, 0).records
    families = np.array([r.fields["family"] for r in records])
    embeddings = embed_texts(instruction_texts(records, True), EmbedConfig())
    print(f"{args.records} suite records, {len(set(families))} families; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    print(f"{'case':<22}" + "".join(f"{rule:>28}" for rule in RULES))
    found: dict[str, list[tuple[int, float]]] = {rule: [] for rule in RULES}
    ks = list(range(4, 21))
    seconds = {"loose": 0.0, "tight": 0.0}
    for case in range(args.cases):
        rng = np.random.default_rng(case)
        order = rng.permutation(len(records)) if case % 2 else np.arange(len(records))
        x = embeddings[order] + (rng.normal(0, 1e-6, embeddings.shape) if case else 0.0)
        coords, _ = learn_manifold(x.astype(np.float32), ManifoldConfig())
        rows = nonnegative(spectral_rows(coords))
        start = time.perf_counter()
        loose = [_nmf(rows, k, 0)[1] for k in ks]
        seconds["loose"] += time.perf_counter() - start
        start = time.perf_counter()
        tight = [_nmf(rows, k, 0, CURVE_TOL, CURVE_MAX_ITER)[1] for k in ks]
        seconds["tight"] += time.perf_counter() - start
        chosen = {RULES[0]: knee(ks, loose), RULES[1]: knee(ks, tight), RULES[2]: knee_band(ks, tight, 0.1)[1]}
        cells = []
        for rule, k in chosen.items():
            ari = adjusted_rand_score(families[order], _nmf(rows, k, 0)[0].argmax(1))
            found[rule].append((k, ari))
            cells.append(f"K {k:>2}, ARI {ari:.3f}")
        name = "as is" if case == 0 else ("permuted + noise" if case % 2 else "noise 1e-6")
        print(f"{f'{case} {name}':<22}" + "".join(f"{c:>28}" for c in cells), flush=True)
    print("\nper rule: distinct K, worst ARI")
    for rule, rows in found.items():
        print(f"  {rule:<26} K {sorted({k for k, _ in rows})}, worst ARI {min(a for _, a in rows):.3f}")
    print(f"curve time over {args.cases} cases: tol 1e-4 {seconds['loose']:.1f} s, converged {seconds['tight']:.1f} s "
          f"(ratio {seconds['tight'] / seconds['loose']:.2f}x)")


if __name__ == "__main__":
    main()
