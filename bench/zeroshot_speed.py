"""Speed of the paper's seven zero-shot tasks on the bundled SmolLM2-135M-Instruct: paser's scorer
(each context once, its choices after it, rows sorted by length) against lm-eval's own Hugging Face
backend on the same items in the same process, and against this machine's fp32 matmul ceiling.

    OMP_NUM_THREADS=2 python bench/zeroshot_speed.py --compare 40 --sample 500

1. The ceiling: the best GFLOP/s of an fp32 ``linear`` at the model's MLP shape (4096 x 576 @ 576 x 1536).
2. Both backends on a seeded sample of ``--compare`` items of each task (the same items): wall time,
   items/s, the tokens each runs and tokens/s, the share of the ceiling their forward FLOPs reach
   (paser.ledger's rule: 2 N_body per token run + 2 H V per head position), the ratio of their
   times; and that they pick the same answer on every item (largest log-likelihood difference).
3. paser's scorer alone on the registered size (``--sample``: every item of ARC-e, ARC-c and OBQA,
   at most 500 of the others): the same figures.
4. The full validation sets: the tokens each backend would run, counted by tokenizing every
   request (lm-eval's own tokenization); with ``--full`` paser's scorer runs them too.
Peak RSS of the process is printed at the end.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from memory import PeakRSS  # noqa: E402

from paser.evaluation.shipped import PAPER_TASKS, REGISTERED_SAMPLE, WHOLE_TASKS, sample_indices, shipped_task  # noqa: E402
from paser.ledger import flop_params, forward_flops  # noqa: E402
from paser.models.load import load_model  # noqa: E402


def ceiling_gflops() -> float:
    a, w = torch.randn(4096, 576), torch.randn(1536, 576)
    torch.nn.functional.linear(a, w)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            torch.nn.functional.linear(a, w)
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * 4096 * 576 * 1536 / best / 1e9


def run(lm, tasks, samples):
    import lm_eval
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, samples=samples, log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_defaults=False))
    return out, time.perf_counter() - start


def request_tokens(lm, items) -> tuple[int, int, int]:
    """Over ``items`` (each item's (context, continuation) requests), tokenized as lm-eval does:
    (tokens of every request as its own sequence, head positions, tokens with each context once)."""
    separate = positions = shared = 0
    for arguments in items:
        contexts = set()
        for context, continuation in arguments:
            ctx, cont = lm._encode_pair(context, continuation)
            separate += len(ctx) + len(cont) - 1
            positions += len(cont)
            shared += len(cont) - 1 + (0 if tuple(ctx) in contexts else len(ctx))
            contexts.add(tuple(ctx))
    return separate, positions, shared


def line(name, items, seconds, tokens, positions, params, ceiling) -> str:
    flops = forward_flops(params["body"], params["head"], tokens, positions)
    return (f"{name:>22}: {items} items in {seconds:7.1f} s = {items / seconds:6.2f} items/s; {tokens:,} tokens run, "
            f"{tokens / seconds:5.0f} tokens/s; {flops / seconds / 1e9:5.1f} GFLOP/s = "
            f"{flops / seconds / 1e9 / ceiling:.0%} "
            "of the ceiling")


def main() -> None:
    from lm_eval.models.huggingface import HFLM

    from paser.evaluation.packed_lm import PackedLM

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", type=int, default=40, help="items per task for the two-backend comparison")
    ap.add_argument("--sample", type=int, default=REGISTERED_SAMPLE,
                    help="the registered size (items per task, seeded; ARC-e, ARC-c and OBQA whole)")
    ap.add_argument("--full", action="store_true", help="also run paser's scorer on the full validation sets")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    print(f"# python {' '.join(sys.argv)}  ({platform.node()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {date.today()})")
    ceiling = ceiling_gflops()
    print(f"fp32 matmul ceiling (linear 4096x576 @ 576x1536): {ceiling:.1f} GFLOP/s")
    loaded = load_model("smollm2-135m-instruct", dtype="float32")
    net, tokenizer = loaded.model, loaded.tokenizer
    params = flop_params(net)

    def chosen(size, whole=()):
        tasks = [shipped_task(t) for t in PAPER_TASKS]
        picks = {t.config.task: idx for t in tasks if size and t.config.task not in whole
                 and (idx := sample_indices(t.config.task, len(t.eval_docs), size, args.seed)) is not None}
        return tasks, picks or None

    with PeakRSS() as memory:
        tasks, picks = chosen(args.compare)
        ours = PackedLM(pretrained=net, tokenizer=tokenizer, batch_size=8)
        out_ours, t_ours = run(ours, tasks, picks)
        tasks, picks = chosen(args.compare)
        theirs = HFLM(pretrained=net, tokenizer=tokenizer, batch_size=8)
        out_theirs, t_theirs = run(theirs, tasks, picks)
        items = sum(len(s) for s in out_ours["samples"].values())
        separate, positions, _ = request_tokens(theirs, [s["arguments"] for samples in out_theirs["samples"].values()
                                                         for s in samples])
        print(f"\n## both backends, {args.compare} items a task (seed {args.seed}), the same items")
        print(line("paser's scorer", items, t_ours, ours.tokens, ours.positions, params, ceiling))
        print(line("lm-eval's HF backend", items, t_theirs, separate, positions, params, ceiling)
              + " (tokens: each request as its own sequence)")
        worst, same = 0.0, 0
        for task in out_ours["samples"]:
            for a, b in zip(out_ours["samples"][task], out_theirs["samples"][task]):
                lls_a = np.array([r[0][0] for r in a["resps"]])
                lls_b = np.array([r[0][0] for r in b["resps"]])
                worst = max(worst, float(np.abs(lls_a - lls_b).max()))
                same += int(np.argmax(lls_a) == np.argmax(lls_b)
                            and np.argmax(lls_a / [len(c) for _, c in a["arguments"]])
                            == np.argmax(lls_b / [len(c) for _, c in b["arguments"]]))
        print(f"lm-eval's time / paser's: {t_theirs / t_ours:.2f}x; same choice (acc and acc_norm) on {same}/{items} "
              f"items; largest log-likelihood difference {worst:.2e}")

        tasks, picks = chosen(args.sample, WHOLE_TASKS)
        ours = PackedLM(pretrained=net, tokenizer=tokenizer, batch_size=8)
        out, seconds = run(ours, tasks, picks)
        items = sum(len(s) for s in out["samples"].values())
        print(f"\n## the registered size (every item of {', '.join(WHOLE_TASKS)}, at most {args.sample} of the "
              f"others, seed {args.seed})")
        print(line("paser's scorer", items, seconds, ours.tokens, ours.positions, params, ceiling))

        tasks, _ = chosen(None)
        items = []
        for task in tasks:
            task.build_all_requests()
            by_doc = {}
            for inst in task.instances:
                by_doc.setdefault(inst.doc_id, []).append(inst.arguments)
            items += by_doc.values()
        total_items = len(items)
        total_separate, _, total_shared = request_tokens(theirs, items)
        print(f"\n## the full validation sets: {total_items:,} items; {total_shared:,} tokens with each context once, "
              f"{total_separate:,} with every choice repeating its context")
        if args.full:
            tasks, _ = chosen(None)
            ours = PackedLM(pretrained=net, tokenizer=tokenizer, batch_size=8)
            out, seconds = run(ours, tasks, None)
            print(line("paser's scorer", total_items, seconds, ours.tokens, ours.positions, params, ceiling))
    print(f"\npeak RSS {memory.peak_mb:,.0f} MB")


if __name__ == "__main__":
    main()
