"""Evaluation of a base, adapted or merged model: perplexity, response NLL, suite accuracy, lm-eval.

- Perplexity on a plain-text file, two labelled protocols: LLM-Pruner's (the text tokenised as one
  stream, cut into non-overlapping 128-token windows, no BOS inside windows) and a long-window one
  (the same with windows of ``long_window`` tokens, default the model's context up to 2,048).
  Perplexity is exp of the mean next-token NLL over every predicted token of every full window.
- Response NLL on held-out instruction records: mean NLL over response tokens under teacher
  forcing, with the prompt template of scoring and recovery (the recovery validation loss).
- Accuracy per family on paser's capability suite, with a seed other than the default pool's:
  greedy decoding, answer and prediction normalised (case, whitespace, surrounding quotes and
  punctuation); a record counts when the expected answer occurs in the answer as a whole word or
  number ("answer found": instruct models answer in sentences). Whole-answer exact match is
  reported beside it.
- lm-evaluation-harness tasks through ``paser.harness`` (accuracy and normalised accuracy).

    python -c "from paser.evaluation import normalise_answer; print(normalise_answer(' Paris. '))"
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from paser.errors import DataError
from paser.harness import METRIC_LABELS


@dataclass
class EvalConfig:
    """What to evaluate and how."""

    text: str | None = None
    """Plain-text file for perplexity (skipped when None)."""
    window: int = 128
    """Window of LLM-Pruner's perplexity protocol."""
    long_window: int | None = None
    """Window of the long protocol; None: the model's context, at most 2,048."""
    heldout: str | None = None
    """Instruction records for response NLL (skipped when None)."""
    suite_size: int = 240
    """Capability-suite records for accuracy (20 per family); 0 skips it."""
    suite_seed: int = 12345
    """Seed of the evaluation suite; differs from the default pool's seed 0, so its records are
    not the ones selection and recovery saw (the exact prompts may still recur: the families are
    small)."""
    max_new_tokens: int = 48
    """Tokens generated per suite answer."""
    batch_size: int = 8
    """Sequences per forward pass."""
    template: Literal["alpaca", "chat"] = "alpaca"
    """Prompt template, as in scoring and recovery."""
    cutoff: int = 256
    """Token cutoff of prompt + response for response NLL."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Model weights dtype."""
    device: str | None = None
    """Default: CUDA when available, else CPU."""
    lm_eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks (extra ``eval``): ``paper`` for the paper's seven zero-shot tasks,
    lm-eval task names, local multiple-choice JSONL files or task YAML files (see paser.harness)."""
    lm_eval_limit: int | None = None
    """Records per lm-eval task (None: all)."""
    lm_eval_fewshot: int = 0
    """Few-shot examples per lm-eval prompt (the paper's protocol is zero-shot)."""

    def __post_init__(self):
        if not all(isinstance(t, str) and t for t in self.lm_eval_tasks):
            raise ValueError(f"lm_eval_tasks must be a list of task names or paths, got {self.lm_eval_tasks!r}")
        if self.lm_eval_limit is not None and self.lm_eval_limit < 1:
            raise ValueError(f"lm_eval_limit must be positive, got {self.lm_eval_limit}")
        if self.lm_eval_fewshot < 0:
            raise ValueError(f"lm_eval_fewshot must be >= 0, got {self.lm_eval_fewshot}")
        for name in ("window", "suite_size", "max_new_tokens", "batch_size", "cutoff"):
            if getattr(self, name) < (0 if name == "suite_size" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.window < 2 or (self.long_window is not None and self.long_window < 2):
            raise ValueError("perplexity windows need at least 2 tokens")


def load_for_eval(model: str, adapter: str | None = None, dtype: str = "float32", device: str | None = None,
                  trust_pickle: bool = False):
    """(model, tokenizer, description): a base model, or a base model with a LoRA adapter folder."""
    from paser.models import load_model

    loaded = load_model(model, dtype=dtype, trust_pickle=trust_pickle, device=device)
    net, described = loaded.model, loaded.describe()
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise DataError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
        net = PeftModel.from_pretrained(net, adapter)
        described += f" + LoRA adapter {adapter}"
    net.eval()
    return net, loaded.tokenizer, described


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def perplexity(model, tokenizer, text: str, window: int, batch_size: int = 8) -> dict:
    """exp(mean next-token NLL) over the non-overlapping ``window``-token windows of ``text``."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=True)["input_ids"])
    n_windows = len(ids) // window
    if n_windows == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than one {window}-token window")
    windows = ids[:n_windows * window].view(n_windows, window)
    total, count = 0.0, 0
    with torch.no_grad():
        for lo in range(0, n_windows, batch_size):
            batch = windows[lo:lo + batch_size].to(_device_of(model))
            logits = model(input_ids=batch).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                    reduction="sum")
            total, count = total + float(nll), count + batch[:, 1:].numel()
    mean = total / count
    return {"window": window, "windows": n_windows, "tokens": count, "nll": mean, "ppl": math.exp(mean)}


def response_nll(model, tokenizer, records, template: str = "alpaca", cutoff: int = 256, batch_size: int = 8) -> dict:
    """Mean NLL over the response tokens of ``records`` (teacher forcing, prompt masked)."""
    from paser.recovery import RecoverConfig, encode_for_training, scored_tokens, validation_loss

    examples = encode_for_training(tokenizer, records, RecoverConfig(template=template, cutoff=cutoff))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    mean = validation_loss(model, examples, pad, _device_of(model), batch_size)
    count = sum(scored_tokens(e) for e in examples)
    return {"records": len(examples), "tokens": count, "nll": mean, "ppl": math.exp(mean)}


_EDGES = " \t\n\"'`.,;:!?"


def normalise_answer(text: str) -> str:
    """Lower case, whitespace collapsed (and removed around brackets, commas and colons),
    surrounding quotes and punctuation removed."""
    text = re.sub(r"\s+", " ", text.lower())
    return re.sub(r" ?([{}\[\](),:]) ?", r"\1", text).strip(_EDGES)


def answer_found(expected: str, answer: str) -> bool:
    """The normalised expected answer occurs in the normalised answer, not inside a longer word
    or number ("vienna" in "the capital of austria is vienna"; "15" not in "155")."""
    want = normalise_answer(expected)
    if not want:
        return False
    # word boundaries only where the answer itself starts or ends with a letter or digit
    before = "(?<![a-z0-9])" if want[0].isalnum() else ""
    after = "(?![a-z0-9])" if want[-1].isalnum() else ""
    return re.search(before + re.escape(want) + after, normalise_answer(answer)) is not None


def generate_answers(model, tokenizer, records, template: str, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers to the records' prompts (left-padded batches, stopped at eos)."""
    from paser.prompts import format_prompt

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for lo in range(0, len(records), batch_size):
            prompts = [format_prompt(r, template, tokenizer) for r in records[lo:lo + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True).to(_device_of(model))
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def suite_accuracy(model, tokenizer, size: int, seed: int, template: str = "alpaca", max_new_tokens: int = 48,
                   batch_size: int = 8) -> dict:
    """Exact-match accuracy per family (and overall) on ``size`` generated suite records."""
    from paser.suite import suite_pool

    pool = suite_pool(size, seed)
    answers = generate_answers(model, tokenizer, pool.records, template, max_new_tokens, batch_size)
    per_family: dict[str, list[bool]] = {}
    exact = []
    examples = []
    for record, answer in zip(pool.records, answers):
        ok = answer_found(record.response, answer)
        exact.append(normalise_answer(answer) == normalise_answer(record.response))
        per_family.setdefault(record.fields["family"], []).append(ok)
        if len(examples) < 24:
            examples.append({"id": record.id, "expected": record.response, "answer": answer, "found": ok})
    flat = [ok for oks in per_family.values() for ok in oks]
    return {"records": len(flat), "seed": seed, "accuracy": sum(flat) / len(flat),
            "exact_match": sum(exact) / len(exact),
            "per_family": {f: sum(oks) / len(oks) for f, oks in sorted(per_family.items())}, "examples": examples}


def evaluate(model: str, adapter: str | None = None, out: str | Path | None = None, config: EvalConfig | None = None,
             *, trust_pickle: bool = False, **overrides) -> dict:
    """Every evaluation ``config`` asks for, on ``model`` (+ ``adapter``); writes eval.json and
    eval.md into ``out`` when given and returns the same dictionary."""
    from paser.config import config_with
    from paser.data import load_pool

    config = config_with(config or EvalConfig(), overrides)
    text = None
    if config.text is not None:
        try:
            text = Path(config.text).read_text(encoding="utf-8")
        except OSError as err:
            raise DataError(f"{config.text}: cannot read the perplexity text: {err.strerror}") from None
        except UnicodeDecodeError as err:
            raise DataError(f"{config.text}: not UTF-8 text (byte {err.start})") from None
    heldout = load_pool(config.heldout).records if config.heldout is not None else None
    harness_tasks = scratch = None
    if config.lm_eval_tasks:
        from paser.harness import prepare_tasks

        # the generated task YAMLs go to the output folder, else to a folder removed afterwards
        scratch = None if out is not None else tempfile.TemporaryDirectory(prefix="paser-lm-eval-")
        folder = Path(out) if out is not None else Path(scratch.name)
        harness_tasks = prepare_tasks(config.lm_eval_tasks, folder / "lm_eval_tasks")
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    net, tokenizer, described = load_for_eval(model, adapter, config.dtype, device, trust_pickle)
    result: dict = {"model": str(model), "adapter": adapter, "description": described, "settings": vars(config)}
    start = time.perf_counter()
    if text is not None:
        context = getattr(net.config, "max_position_embeddings", 2048) or 2048
        long_window = config.long_window or min(2048, context)
        result["perplexity"] = {
            f"llm-pruner ({config.window}-token windows)": perplexity(net, tokenizer, text, config.window,
                                                                      config.batch_size),
            f"long ({long_window}-token windows)": perplexity(net, tokenizer, text, long_window, 1),
        }
    if heldout is not None:
        result["response_nll"] = response_nll(net, tokenizer, heldout, config.template, config.cutoff,
                                              config.batch_size)
    if config.suite_size:
        result["suite"] = suite_accuracy(net, tokenizer, config.suite_size, config.suite_seed, config.template,
                                         config.max_new_tokens, config.batch_size)
    if harness_tasks is not None:
        from paser.harness import lm_eval_scores

        result["lm_eval"] = lm_eval_scores(net, tokenizer, harness_tasks, batch_size=config.batch_size,
                                           limit=config.lm_eval_limit, num_fewshot=config.lm_eval_fewshot)
        if scratch is not None:
            scratch.cleanup()
    result["seconds"] = round(time.perf_counter() - start, 2)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=2, default=str))
        (out / "eval.md").write_text(markdown_table(result))
    return result


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
        lines.append(f"| capability-suite accuracy (answer found), all ({s['records']} records, seed {s['seed']}) | "
                     f"{s['accuracy']:.3f} |")
        lines.append(f"| capability-suite exact match (whole answer), all | {s['exact_match']:.3f} |")
        lines += [f"| capability-suite accuracy (answer found), {f} | {a:.3f} |" for f, a in s["per_family"].items()]
    for task, scores in (result.get("lm_eval") or {}).items():
        for metric, label in METRIC_LABELS.items():
            if metric in scores:
                lines.append(f"| lm-eval {task} ({scores['samples']} records, {result['settings']['lm_eval_fewshot']}"
                             f"-shot), {label} | {scores[metric]:.4f} ± {scores[metric + '_stderr']:.4f} |")
    return "\n".join(lines) + "\n"


def gap_recovered(dense: float, pruned: float, recovered: float) -> float | None:
    """Share of the dense-vs-pruned gap that recovery closed (1: back to dense; negative: worse)."""
    if dense == pruned:
        return None
    return (recovered - pruned) / (dense - pruned) + 0.0  # + 0.0: no "-0.0%" when nothing changed


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
        rows.append(("capability-suite accuracy (answer found)", [results[n]["suite"]["accuracy"] for n in names]))
    for task, scores in (first.get("lm_eval") or {}).items():
        rows += [(f"lm-eval {task}, {label}", [results[n]["lm_eval"][task][metric] for n in names])
                 for metric, label in METRIC_LABELS.items() if metric in scores]
    head = ["metric", *names] + (["gap recovered"] if {"dense", "pruned", "recovered"} <= set(names) else [])
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for label, values in rows:
        cells = [f"{v:.4f}" for v in values]
        if len(head) > len(names) + 1:
            gap = gap_recovered(*(values[names.index(n)] for n in ("dense", "pruned", "recovered")))
            cells.append("n/a" if gap is None else f"{gap:.1%}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(["# paser run: dense vs pruned vs recovered", "", *lines]) + "\n"
