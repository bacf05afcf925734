"""Evaluation results as text: one model's table (eval.md), dense / pruned / recovered side by side
with the gap recovered (run.md), and the compute ledger of an evaluation.

    python -c "from paser.evaluation.report import markdown_table; print(markdown_table.__doc__)"
"""

from __future__ import annotations

from paser.evaluation.harness import METRIC_LABELS
from paser.evaluation.suite import gap_recovered
from paser.ledger import Ledger


def evaluation_ledger(result: dict, params: dict, reference: dict | None, model: str, ref_name: str | None):
    """What ``evaluate`` computed (paser.ledger), from its result: perplexity windows, the held-out
    and suite passes (and the reference model's beside them), the greedy answers (prompts read,
    tokens generated), and the lm-eval tasks' requests when paser's scorer ran them (lm-eval's own
    backend's passes are not counted)."""
    ledger = Ledger()
    for name, p in result.get("perplexity", {}).items():
        tokens = p["windows"] * p["window"]
        ledger.forward("perplexity", model, params, tokens, tokens, what=f"forward ({name})")
    passes = {"held-out NLL": result.get("response_nll", {}).get("compute"),
              "suite answer NLL": result.get("suite", {}).get("compute")}
    for stage, found in passes.items():
        if found:
            ledger.forward(stage, model, params, found["tokens"], found["positions"])
            if reference is not None:
                ledger.forward(stage, ref_name, reference, found["tokens"], found["positions"])
    if result.get("lm_eval_compute"):
        found = result["lm_eval_compute"]
        ledger.forward("lm-eval tasks", model, params, found["tokens"], found["positions"])
    generated = result.get("suite", {}).get("compute", {}).get("generation")
    if generated:
        ledger.forward("suite answers", model, params, generated["prompt_tokens"] + generated["new_tokens"],
                       generated["new_tokens"], what="greedy generation")
    return ledger


def markdown_table(result: dict) -> str:
    """The evaluation as a Markdown table, each number labelled with its protocol."""
    lines = [f"# Evaluation of {result['description']}", "", "| metric | value |", "|---|---:|"]
    for label, ppl in (result.get("perplexity") or {}).items():
        lines.append(f"| perplexity, {label} | {ppl['ppl']:.3f} |")
    if "response_nll" in result:
        r = result["response_nll"]
        lines.append(f"| held-out response NLL ({r['records']} records, {r['tokens']} tokens) | {r['nll']:.4f} |")
        lines.append(f"| held-out response perplexity | {r['ppl']:.3f} |")
    if "suite" in result:
        s = result["suite"]
        lines.append(f"| capability-suite answer NLL, macro average ({s['records']} records, seed {s['seed']}, "
                     f"{s['removed_overlap']} removed as in the pool) | {s['answer_nll']['macro']:.4f} |")
        lines += [f"| capability-suite answer NLL, {f} | {v:.4f} |" for f, v in s["answer_nll"]["per_family"].items()]
        gap = s.get("answer_nll_gap_closed")
        if gap is not None:
            lines.append(f"| answer-NLL gap closed, macro average | {_share(gap['macro'])} |")
            lines += [f"| answer-NLL gap closed, {f} | {_share(v)} |" for f, v in gap["per_family"].items()]
        if "accuracy" in s:
            lines.append(f"| capability-suite accuracy (answer found), all ({s['accuracy_records']} records, seed "
                         f"{s['seed']}) | {s['accuracy']:.3f} |")
            lines.append(f"| capability-suite exact match (whole answer), all | {s['exact_match']:.3f} |")
            lines += [f"| capability-suite accuracy (answer found), {f} | {a:.3f} |"
                      for f, a in s["per_family"].items()]
    jsd = result.get("jsd_to_reference")
    for where, label in (("heldout", "held-out responses"), ("suite", "capability-suite answers")):
        if jsd and where in jsd:
            lines.append(f"| mean token JSD to {jsd['reference']}, {label} ({jsd[where]['records']} records) | "
                         f"{jsd[where]['mean']:.4f} |")
    for task, scores in (result.get("lm_eval") or {}).items():
        split = f", {scores['split']} split" if scores.get("split") else ""
        for metric, label in METRIC_LABELS.items():
            if metric in scores:
                lines.append(f"| lm-eval {task} ({scores['samples']} records{split}, "
                             f"{result['settings']['lm_eval_fewshot']}-shot), {label} | {scores[metric]:.4f} ± "
                             f"{scores[metric + '_stderr']:.4f} |")
    if result.get("paper_mean"):
        lines += ["", *zero_shot_table(result)]
    return "\n".join(lines) + "\n"


def zero_shot_table(result: dict) -> list[str]:
    """The paper's seven tasks as its tables show them (acc_norm where lm-eval reports it, else acc),
    with the dense and pruned references and the share of their gap closed when they were given."""
    tasks, mean = result["lm_eval"], result["paper_mean"]
    gap = result.get("lm_eval_gap_closed")
    split = {tasks[t].get("split") for t in mean["metric"]}
    lines = [f"## The paper's seven zero-shot tasks ({mean['items']} items, {', '.join(sorted(map(str, split)))} "
             "split)", "", "| task | metric | items | " + ("dense | pruned | " if gap else "") + "this model |"
             + (" gap closed |" if gap else ""), "|---|---|---:|" + ("---:|---:|" if gap else "") + "---:|"
             + ("---:|" if gap else "")]
    for task, metric in mean["metric"].items():
        row = tasks[task]
        ref = f"{gap[task]['dense']:.4f} | {gap[task]['pruned']:.4f} | " if gap else ""
        lines.append(f"| {task} | {metric} | {row['samples']} | {ref}{row[metric]:.4f} ± "
                     f"{row[metric + '_stderr']:.4f} |"
                     + (f" {_share(gap[task]['closed'])} |" if gap else ""))
    ref = f"{gap['paper mean']['dense']:.4f} | {gap['paper mean']['pruned']:.4f} | " if gap else ""
    lines.append(f"| **mean of the seven** | | {mean['items']} | {ref}{mean['mean']:.4f} ± {mean['stderr']:.4f} |"
                 + (f" {_share(gap['paper mean']['closed'])} |" if gap else ""))
    return lines


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def comparison_table(results: dict[str, dict]) -> str:
    """Dense, pruned and recovered evaluations side by side, with the share of the gap recovered."""
    names = list(results)
    rows: list[tuple[str, list[float]]] = []
    first = results[names[0]]
    for label in first.get("perplexity") or {}:
        rows.append((f"perplexity, {label}", [results[n]["perplexity"][label]["ppl"] for n in names]))
    if "response_nll" in first:
        rows.append(("held-out response NLL", [results[n]["response_nll"]["nll"] for n in names]))
    if "suite" in first:
        rows.append(("capability-suite answer NLL, macro average", [results[n]["suite"]["answer_nll"]["macro"]
                                                                    for n in names]))
        rows += [(f"capability-suite answer NLL, {f}", [results[n]["suite"]["answer_nll"]["per_family"][f]
                                                       for n in names])
                 for f in first["suite"]["answer_nll"]["per_family"]]
        if "accuracy" in first["suite"]:
            rows.append(("capability-suite accuracy (answer found)", [results[n]["suite"]["accuracy"] for n in names]))
    for where, label in (("heldout", "held-out responses"), ("suite", "capability-suite answers")):
        # the dense model is its own reference: 0
        if all(where in (results[n].get("jsd_to_reference") or {}) for n in names if n != "dense"):
            rows.append((f"mean token JSD to the dense model, {label}",
                         [0.0 if n == "dense" else results[n]["jsd_to_reference"][where]["mean"] for n in names]))
    for task, scores in (first.get("lm_eval") or {}).items():
        rows += [(f"lm-eval {task}, {label}", [results[n]["lm_eval"][task][metric] for n in names])
                 for metric, label in METRIC_LABELS.items() if metric in scores]
    head = ["metric", *names] + (["gap recovered"] if {"dense", "pruned", "recovered"} <= set(names) else [])
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for label, values in rows:
        cells = [f"{v:.4f}" for v in values]
        if len(head) > len(names) + 1:
            gap = gap_recovered(*(values[names.index(n)] for n in ("dense", "pruned", "recovered")))
            cells.append(_share(gap))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(["# paser run: dense vs pruned vs recovered", "", *lines]) + "\n"
