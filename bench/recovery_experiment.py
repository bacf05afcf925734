"""Does PASER's subset recover a pruned model more than random subsets of the same size?

    python bench/recovery_experiment.py                      # 82 minutes of arm time on the 2-core CPU machine
    python bench/recovery_experiment.py --pool 60 --heldout 20 --suite 24 --max-steps 2   # smoke run

Models: the bundled SmolLM2-135M-Instruct (dense) and its 25% `paser prune` twin (Taylor, cached).
Data: ../shared/data/alpaca_5000.json (read at run time, never copied into the repository). Split
rule: a permutation of the 5,000 record positions with numpy's default_rng(--split-seed 0); the
first --pool positions are the training pool, the next --heldout positions the held-out set.

Arms, every one recovered with the same settings and evaluated by the same code: no recovery;
random subsets (one per --seeds); PASER; its ablations (uniform allocation, random order inside
clusters, JSD order inside clusters without IES's cost term, no concept filter, k-means clusters);
the full pool. Budget: --budget of the pool. Recovery: LLM-Pruner's LoRA recipe (r 8, alpha 16,
2 epochs, cutoff 256) except the effective batch (8, not 64) and the learning rate (3e-4, not
1e-4): 80 records at batch 64 would make 2 optimizer steps, too few to move the model.
Evaluation: mean response NLL on the held-out records, accuracy (answer found) on paser's
capability suite (--suite records, seed 12345), and the share of the dense-vs-pruned gap each
arm closes.

Every finished arm is written to OUT/results/<arm>.json at once; a rerun skips finished arms (and
a recovery resumes from its checkpoint), so a killed experiment continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from paser.config import config_with  # noqa: E402
from paser.data.pools import load_pool, write_jsonl  # noqa: E402
from paser.evaluation import evaluate  # noqa: E402
from paser.evaluation.config import EvalConfig  # noqa: E402
from paser.evaluation.suite import gap_recovered  # noqa: E402
from paser.recovery import RecoverConfig, recover  # noqa: E402
from paser.selection.pipeline import run_selection  # noqa: E402
from paser.selection.scoring import twin_reference  # noqa: E402
from paser.selection.settings import Settings  # noqa: E402

DENSE = "smollm2-135m-instruct"
ABLATIONS = ("uniform", "random_order", "no_cost", "no_ccg", "kmeans")


def split(data: str, out: Path, n_pool: int, n_heldout: int, seed: int) -> tuple[Path, Path]:
    pool = load_pool(data)
    order = np.random.default_rng(seed).permutation(len(pool.records))
    rows = [dict(r.fields) for r in pool.records]
    paths = out / "pool.jsonl", out / "heldout.jsonl"
    write_jsonl(paths[0], [rows[i] for i in order[:n_pool]])
    write_jsonl(paths[1], [rows[i] for i in order[n_pool:n_pool + n_heldout]])
    return paths


def select_arm(arm: str, pool: Path, out: Path, budget: float, seed: int) -> tuple[Path, float]:
    """The arm's subset file and the wall time of its selection. PASER and its ablations share one
    run folder, so the ablations reuse embeddings and scores (their time is the incremental one)."""
    method = "random" if arm.startswith("random-") else arm
    folder = out / "select" / ("shared" if method in ("paser", *ABLATIONS) else arm)
    settings = Settings.load(None, {"select": {"data": str(pool), "dense": DENSE, "budget": budget, "out": str(folder),
                                               "method": method, "seed": seed, "progress": False}})
    start = time.perf_counter()
    run = run_selection(settings)
    seconds = time.perf_counter() - start
    subset = out / "subsets" / f"{arm}.jsonl"
    subset.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "selected.jsonl", subset)
    if method not in ("random", "full"):  # the shared folder keeps only the last arm's selection
        for name in ("clusters.json", "scores.parquet"):
            shutil.copyfile(run / name, out / "subsets" / f"{arm}.{name}")
    return subset, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "../shared/data/alpaca_5000.json"))
    ap.add_argument("--out", default="runs/experiment")
    ap.add_argument("--pool", type=int, default=400)
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=3e-4)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--suite", type=int, default=96)
    ap.add_argument("--arms", nargs="+", default=None, help="arms to run, in this order (default: all)")
    args = ap.parse_args()

    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    pool, heldout = split(args.data, out, args.pool, args.heldout, args.split_seed)
    pruned = twin_reference(Settings())
    rec_cfg = config_with(RecoverConfig(), dict(epochs=args.epochs, batch_size=args.batch_size,
                                                micro_batch_size=args.micro_batch_size, max_steps=args.max_steps,
                                                learning_rate=args.learning_rate, val_size=0, progress=False))
    eval_cfg = EvalConfig(heldout=str(heldout), suite_size=args.suite, max_new_tokens=32, batch_size=16)
    # the question first (PASER against random), then the ablations, then the costly full pool
    known = ["dense", "none", "paser"] + [f"random-{s}" for s in args.seeds] + [*ABLATIONS, "full"]
    unknown = sorted(set(args.arms or []) - set(known))
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; known: {known}")
    # the references first, then the arms in the order asked for
    arms = known if args.arms is None else ["dense", "none", *[a for a in args.arms if a not in ("dense", "none")]]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; pool {args.pool}, "
          f"held-out {args.heldout}, budget {args.budget}; arms: {' '.join(arms)}", flush=True)

    for arm in arms:
        path = out / "results" / f"{arm}.json"
        if path.is_file():
            continue
        row: dict = {"arm": arm}
        if arm in ("dense", "none"):
            model, adapter = (DENSE if arm == "dense" else pruned), None
        else:
            seed = int(arm.split("-")[1]) if arm.startswith("random-") else 0
            subset, row["selection_s"] = select_arm(arm, pool, out, args.budget, seed)
            row["records"] = sum(1 for _ in subset.open())
            result = recover(pruned, str(subset), out / "recover" / arm, rec_cfg)
            row |= {"recovery_s": result.seconds, "steps": result.steps, "train_tokens": result.train_tokens,
                    "train_loss": [result.first_loss, result.last_loss]}
            model, adapter = pruned, str(out / "recover" / arm / "adapter")
        start = time.perf_counter()
        ev = evaluate(model, adapter, out / "eval" / arm, eval_cfg)
        row |= {"eval_s": time.perf_counter() - start, "heldout_nll": ev["response_nll"]["nll"],
                "suite_accuracy": ev["suite"]["accuracy"], "per_family": ev["suite"]["per_family"]}
        path.write_text(json.dumps(row, indent=2))
        print(f"{arm}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in row.items() if k not in ("per_family", "arm", "train_loss")),
              flush=True)
    report(out, args)


def report(out: Path, args) -> None:
    rank = ["dense", "none", "paser", "random", *ABLATIONS, "full"]
    files = sorted((out / "results").glob("*.json"), key=lambda p: (rank.index(p.stem.split("-")[0]), p.stem))
    rows = {p.stem: json.loads(p.read_text()) for p in files}
    if not {"dense", "none"} <= set(rows):
        return
    dense, none = rows["dense"], rows["none"]

    def gaps(r):
        return (gap_recovered(dense["heldout_nll"], none["heldout_nll"], r["heldout_nll"]),
                gap_recovered(dense["suite_accuracy"], none["suite_accuracy"], r["suite_accuracy"]))

    lines = ["| arm | records | response tokens trained (per epoch) | held-out NLL | suite accuracy | "
             "gap closed (NLL) | gap closed (accuracy) | selection s | recovery s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        g = gaps(r)
        lines.append(f"| {name} | {r.get('records', '')} | {r.get('train_tokens', '')} | {r['heldout_nll']:.4f} | "
                     f"{r['suite_accuracy']:.3f} | {'' if g[0] is None else f'{g[0]:.1%}'} | "
                     f"{'' if g[1] is None else f'{g[1]:.1%}'} | {r.get('selection_s', 0):.1f} | "
                     f"{r.get('recovery_s', 0):.1f} |")
    randoms = [r for n, r in rows.items() if n.startswith("random-")]
    if len(randoms) > 1:
        nll = [r["heldout_nll"] for r in randoms]
        acc = [r["suite_accuracy"] for r in randoms]
        tokens = [r["train_tokens"] for r in randoms if "train_tokens" in r]
        lines.append(f"| random, mean ± sd over {len(randoms)} seeds | | "
                     f"{f'{statistics.mean(tokens):.0f}' if tokens else ''} | {statistics.mean(nll):.4f} ± "
                     f"{statistics.stdev(nll):.4f} | {statistics.mean(acc):.3f} ± {statistics.stdev(acc):.3f} | "
                     "| | | |")
        if "paser" in rows and statistics.stdev(nll) > 0:
            diff = rows["paser"]["heldout_nll"] - statistics.mean(nll)
            lines += ["", f"PASER minus the random mean, held-out NLL: {diff:+.4f} "
                          f"({diff / statistics.stdev(nll):+.1f} random sd; lower is better)"]
    clusters = out / "subsets" / "paser.clusters.json"
    if clusters.is_file():
        c = json.loads(clusters.read_text())
        cds = [x["cds"] for x in c["clusters"]]
        sizes = [x["size"] for x in c["clusters"]]
        rejected = sum(x["rejected"] for x in c["clusters"])
        lines += ["", f"PASER: K = {c['K']}, cluster sizes {min(sizes)}..{max(sizes)}, CDS {min(cds):.4f}.."
                      f"{max(cds):.4f}, rejected by the concept filter {rejected} "
                      f"({rejected / max(1, rejected + c['selected']):.1%} of visited)"]
    scores = out / "subsets" / "paser.scores.parquet"
    if scores.is_file():
        t = pd.read_parquet(scores)
        chosen = t[t["status"] == "selected"]
        rho = t[["ies", "jsd", "n_response"]].corr("spearman")["n_response"]
        # IES = JSD / ln(cost): how much each factor varies inside a cluster (coefficient of variation)
        t = t.assign(log_cost=np.log(np.maximum(t["n_prompt"] + t["n_response"], 2) ** 2))
        cv = t.groupby("cluster")[["jsd", "log_cost"]].agg(lambda x: x.std() / x.mean())
        lines.append(f"PASER's records: median response {chosen['n_response'].median():.0f} tokens (pool median "
                     f"{t['n_response'].median():.0f}); Spearman correlation with response length: JSD "
                     f"{rho['jsd']:+.2f}, IES {rho['ies']:+.2f}; coefficient of variation inside clusters: JSD "
                     f"{cv['jsd'].min():.0%}..{cv['jsd'].max():.0%}, ln(cost) {cv['log_cost'].min():.0%}.."
                     f"{cv['log_cost'].max():.0%}")
    spent = sum(r.get(k, 0.0) for r in rows.values() for k in ("selection_s", "recovery_s", "eval_s"))
    lines.append(f"Time recorded by the arms (selection + recovery + evaluation): {spent / 60:.1f} min")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
