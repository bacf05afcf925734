"""Evaluation of a base, adapted or merged model: perplexity, response NLL, suite accuracy, lm-eval.

- Perplexity on a plain-text file, two labelled protocols: LLM-Pruner's (the text tokenised as one
  stream, cut into non-overlapping 128-token windows, no BOS inside windows) and a long-window one
  (the same with windows of ``long_window`` tokens, default the model's context up to 2,048).
  Perplexity is exp of the mean next-token NLL over every predicted token of every full window.
- Response NLL on held-out instruction records: mean NLL over response tokens under teacher
  forcing, with the prompt template of scoring and recovery (the recovery validation loss).
- Per family of paser's capability suite, with a seed other than the default pool's and every
  record whose prompt (instruction + input) also occurs in the pool selected from removed: the
  answer NLL (teacher forcing, the expected answer + eos as the response, mean over its tokens,
  then over the family's records; macro average over families), which moves long before an
  answer comes out right, and accuracy: greedy decoding, answer and prediction normalised (case,
  whitespace, surrounding quotes and punctuation), a record counts when the expected answer occurs
  in the answer as a whole word or number ("answer found": instruct models answer in sentences).
  Whole-answer exact match is reported beside it. Given the dense and pruned models' evaluations,
  the share of each family's dense-vs-pruned answer-NLL gap that the model closed.
- lm-evaluation-harness tasks through ``paser.harness`` (accuracy and normalised accuracy).

    python -c "from paser.evaluation import normalise_answer; print(normalise_answer(' Paris. '))"
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from paser.devices import default_device, resolve_dtype
from paser.errors import DataError
from paser.harness import METRIC_LABELS
from paser.progress import announce


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
    small, hence suite_exclude)."""
    suite_exclude: list[str] = field(default_factory=lambda: ["embedded"])
    """Pools whose prompts (instruction + input, exact text) are removed from the evaluation suite,
    so that it shares none with the pool selected from: ``embedded`` (the embedded default pool:
    1,000 suite records of seed 0), a ``paser select`` run folder (its pool.parquet), or an
    instruction file. The count removed is reported."""
    reference_dense: str | None = None
    """eval.json (or its folder) of the dense model on the same suite: with reference_pruned, the
    share of each family's dense-vs-pruned answer-NLL gap this model closed is reported."""
    reference_pruned: str | None = None
    """eval.json (or its folder) of the pruned model on the same suite."""
    divergence_from: str | None = None
    """A model (the dense one) whose next-token distributions this model's are compared with: the
    mean token JSD on the held-out records' responses and on the suite's answers, per record,
    per family and overall (how much of the dense behaviour came back; 0 = the same)."""
    max_new_tokens: int = 48
    """Tokens generated per suite answer."""
    suite_accuracy_per_family: int | None = None
    """Records per family whose answers are generated for accuracy (the first of each family; one
    greedy decode per record is the slow part); None: all, 0: none (answer NLL alone)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    template: Literal["alpaca", "chat"] = "alpaca"
    """Prompt template, as in scoring and recovery."""
    cutoff: int = 256
    """Token cutoff of prompt + response for response NLL."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Model weights dtype: auto is bfloat16 on a CUDA device with bf16 support, else float32."""
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
        if not all(isinstance(t, str) and t for t in self.suite_exclude):
            raise ValueError(f"suite_exclude must be a list of pools, got {self.suite_exclude!r}")
        if (self.reference_dense is None) != (self.reference_pruned is None):
            raise ValueError("reference_dense and reference_pruned go together (the gap is between the two)")
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
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                    reduction="sum")
            total, count = total + float(nll), count + batch[:, 1:].numel()
    mean = total / count
    return {"window": window, "windows": n_windows, "tokens": count, "nll": mean, "ppl": math.exp(mean)}


def response_token_nll(model, tokenizer, records, template: str = "alpaca", cutoff: int = 256,
                       batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per record: the summed NLL of its response tokens (+ eos) under teacher forcing with the
    prompt masked, and how many there are (the recovery loss, record by record)."""
    from paser.recovery import RecoverConfig, collate, encode_for_training, token_losses

    examples = encode_for_training(tokenizer, records, RecoverConfig(template=template, cutoff=cutoff))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums, counts = np.zeros(len(examples)), np.zeros(len(examples), dtype=np.int64)
    with torch.no_grad():
        for lo in range(0, len(examples), batch_size):
            row_sums, row_counts = token_losses(model, collate(examples[lo:lo + batch_size], pad, _device_of(model)))
            sums[lo:lo + batch_size] = row_sums.double().cpu().numpy()
            counts[lo:lo + batch_size] = row_counts.cpu().numpy()
    return sums, counts


def token_stats(model, tokenizer, records, template: str = "alpaca", cutoff: int = 256, batch_size: int = 8,
                reference=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per record: the summed response NLL, its token count and, given a ``reference`` model, the
    mean token JSD between the two models' next-token distributions on the response, all from one
    forward pass of ``model`` (degradation scoring's pass, with ``reference`` as the dense side)."""
    if reference is None:
        return *response_token_nll(model, tokenizer, records, template, cutoff, batch_size), None
    from paser.degradation import ScoreConfig, score_shard

    config = ScoreConfig(template=template, cutoff=cutoff, batch_size=batch_size, share_prefix=False)
    table = score_shard(reference, model, tokenizer, records, config)
    empty = table.index[table["n_scored"] == 0]
    if len(empty):
        raise DataError(f"record {table['id'][empty[0]]!r}: its prompt fills the {cutoff}-token cutoff, so no "
                        "response token is left to evaluate; raise cutoff or drop the record")
    counts = table["n_scored"].to_numpy(dtype=np.int64)
    return table["nll_pruned"].to_numpy() * counts, counts, table["jsd"].to_numpy()


def input_tokens(tokenizer, records, template: str = "alpaca", cutoff: int = 256) -> int:
    """Prompt + response tokens of ``records`` under the template and cutoff: what a teacher-forced
    pass over them reads (the compute ledger's)."""
    from paser.degradation import ScoreConfig, token_table

    return int(token_table(tokenizer, records, ScoreConfig(template=template, cutoff=cutoff))["n_tokens"].sum())


def evaluation_ledger(result: dict, params: dict, reference: dict | None, model: str, ref_name: str | None):
    """What ``evaluate`` computed (paser.ledger), from its result: perplexity windows, the held-out
    and suite passes (and the reference model's beside them), the greedy answers (prompts read,
    tokens generated). lm-eval's own passes are not counted."""
    from paser.ledger import Ledger

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
    generated = result.get("suite", {}).get("compute", {}).get("generation")
    if generated:
        ledger.forward("suite answers", model, params, generated["prompt_tokens"] + generated["new_tokens"],
                       generated["new_tokens"], what="greedy generation")
    return ledger


def response_nll(model, tokenizer, records, template: str = "alpaca", cutoff: int = 256, batch_size: int = 8) -> dict:
    """Mean NLL over the response tokens of ``records`` (teacher forcing, prompt masked)."""
    return _nll_summary(records, *response_token_nll(model, tokenizer, records, template, cutoff, batch_size))


def _nll_summary(records, sums: np.ndarray, counts: np.ndarray) -> dict:
    mean = float(sums.sum() / max(int(counts.sum()), 1))
    return {"records": len(records), "tokens": int(counts.sum()), "nll": mean, "ppl": math.exp(mean),
            "per_record": {"id": [r.id for r in records], "nll_sum": sums.tolist(), "tokens": counts.tolist()}}


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


def generate_answers(model, tokenizer, records, template: str, max_new_tokens: int, batch_size: int,
                     counted: dict | None = None) -> list[str]:
    """Greedy answers to the records' prompts (left-padded batches, stopped at eos). ``counted``
    gets the prompt tokens read and the tokens generated (the compute ledger's)."""
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
            new = out[:, enc["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
            if counted is not None:  # each row generates until its eos (padding after it is not work it needed)
                done = (new == tokenizer.eos_token_id).int().cumsum(1)
                counted["prompt_tokens"] = counted.get("prompt_tokens", 0) + int(enc["attention_mask"].sum())
                counted["new_tokens"] = counted.get("new_tokens", 0) + int(((done == 0) | (
                    (done == 1) & (new == tokenizer.eos_token_id))).sum())
    finally:
        tokenizer.padding_side = side
    return answers


def pool_prompts(source: str) -> set[tuple[str, str]]:
    """The (instruction, input) pairs of a pool: ``embedded`` (the embedded default pool), a
    ``paser select`` run folder, or an instruction file."""
    from paser.data import load_pool
    from paser.runfolder import read_run_pool
    from paser.suite import suite_pool

    if source == "embedded":
        records = suite_pool(1000, 0).records
    elif (Path(source) / "pool.parquet").is_file():
        records = read_run_pool(Path(source))
    else:
        records = load_pool(source).records
    return {(r.instruction, r.input) for r in records}


def held_out_suite(size: int, seed: int, exclude: list[str]) -> tuple[list, dict]:
    """``size`` suite records of ``seed`` minus those whose prompt occurs in a pool of ``exclude``,
    and what was removed."""
    from paser.suite import suite_pool

    records = suite_pool(size, seed).records
    seen: set[tuple[str, str]] = set()
    for source in exclude:
        seen |= pool_prompts(source)
    kept = [r for r in records if (r.instruction, r.input) not in seen]
    if not kept:
        raise DataError(f"every one of the {size} evaluation-suite records (seed {seed}) occurs in {exclude}; "
                        "raise suite_size or change suite_seed")
    return kept, {"generated": len(records), "removed_overlap": len(records) - len(kept), "excluded_from": exclude}


def answer_nll(model, tokenizer, records, template: str = "alpaca", cutoff: int = 256, batch_size: int = 8) -> dict:
    """Per family: the mean over its records of each expected answer's mean token NLL given the
    prompt; the macro average over families."""
    return _answer_summary(records, *response_token_nll(model, tokenizer, records, template, cutoff, batch_size))


def _by_family(records, values) -> dict[str, float]:
    families: dict[str, list[float]] = {}
    for record, value in zip(records, values):
        families.setdefault(record.fields["family"], []).append(float(value))
    return {f: float(np.nanmean(v)) for f, v in sorted(families.items())}


def _answer_summary(records, sums: np.ndarray, counts: np.ndarray) -> dict:
    per_record = sums / np.maximum(counts, 1)
    per_family = _by_family(records, per_record)
    return {"per_family": per_family, "macro": float(np.mean(list(per_family.values()))),
            "records_per_family": dict(sorted(Counter(r.fields["family"] for r in records).items())),
            "per_record": {"id": [r.id for r in records], "family": [r.fields["family"] for r in records],
                           "nll": per_record.tolist()}}


def _jsd_summary(records, values: np.ndarray) -> dict:
    """The mean token JSD per record, their mean, and per family for suite records."""
    out = {"records": len(records), "mean": float(np.nanmean(values)),
           "per_record": {"id": [r.id for r in records], "jsd": values.tolist()}}
    if records and "family" in records[0].fields:
        out["per_family"] = _by_family(records, values)
        out["macro"] = float(np.mean(list(out["per_family"].values())))
    return out


def suite_accuracy(model, tokenizer, size: int, seed: int, template: str = "alpaca", max_new_tokens: int = 48,
                   batch_size: int = 8, exclude: list[str] | None = None, cutoff: int = 256,
                   accuracy_per_family: int | None = None, reference=None) -> dict:
    """Answer NLL per family on the held-out suite (``size`` generated records of ``seed`` minus
    those whose prompt occurs in a pool of ``exclude``), and answer-found accuracy per family (and
    overall) on all of them or on the first ``accuracy_per_family`` of each family. Given a
    ``reference`` model, also the answers' mean token JSD to it (``jsd``), from the same pass."""
    records, held = held_out_suite(size, seed, exclude or [])
    sums, counts, jsd = token_stats(model, tokenizer, records, template, cutoff, batch_size, reference)
    result = {"records": len(records), "seed": seed, **held, "answer_nll": _answer_summary(records, sums, counts),
              "compute": {"tokens": input_tokens(tokenizer, records, template, cutoff),
                          "positions": int(counts.sum())}}
    if jsd is not None:
        result["jsd"] = _jsd_summary(records, jsd)
    if accuracy_per_family is not None:
        by_family: dict[str, list] = {}
        for r in records:
            by_family.setdefault(r.fields["family"], []).append(r)
        records = [r for r in records if by_family[r.fields["family"]].index(r) < accuracy_per_family]
    if not records:
        return result
    announce(f"generating answers to {len(records)} suite records ({max_new_tokens} tokens at most)")
    answers = generate_answers(model, tokenizer, records, template, max_new_tokens, batch_size,
                               result["compute"].setdefault("generation", {}))
    per_family: dict[str, list[bool]] = {}
    exact = []
    examples = []
    for record, answer in zip(records, answers):
        ok = answer_found(record.response, answer)
        exact.append(normalise_answer(answer) == normalise_answer(record.response))
        per_family.setdefault(record.fields["family"], []).append(ok)
        if len(examples) < 24:
            examples.append({"id": record.id, "expected": record.response, "answer": answer, "found": ok})
    flat = [ok for oks in per_family.values() for ok in oks]
    return result | {"accuracy_records": len(flat), "accuracy": sum(flat) / len(flat),
                     "exact_match": sum(exact) / len(exact),
                     "per_family": {f: sum(oks) / len(oks) for f, oks in sorted(per_family.items())},
                     "examples": examples}


def read_reference(path: str) -> dict:
    """A saved evaluation (eval.json, or the folder holding it)."""
    file = Path(path) / "eval.json" if Path(path).is_dir() else Path(path)
    try:
        return json.loads(file.read_text())
    except OSError as err:
        raise DataError(f"{file}: cannot read the reference evaluation: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{file}: not an eval.json ({err.msg} at line {err.lineno})") from None


def suite_gap_closed(suite: dict, dense: dict, pruned: dict, where: tuple[str, str] = ("dense", "pruned")) -> dict:
    """The share of each family's dense-vs-pruned answer-NLL gap that ``suite`` closed, and of the
    macro average's gap; the references must come from the same held-out suite."""
    for ref, name in ((dense, where[0]), (pruned, where[1])):
        if "answer_nll" not in (ref or {}):
            raise DataError(f"{name}: its evaluation has no suite answer NLL (evaluate it with suite_size > 0)")
        if (ref["seed"], ref["records"], ref["generated"]) != (suite["seed"], suite["records"], suite["generated"]):
            raise DataError(f"{name}: evaluated on another suite (seed {ref['seed']}, {ref['records']} records "
                            f"of {ref['generated']}) than this one (seed {suite['seed']}, {suite['records']} "
                            f"of {suite['generated']}); use the same suite_size, suite_seed and suite_exclude")
    d, p, m = dense["answer_nll"], pruned["answer_nll"], suite["answer_nll"]
    return {"per_family": {f: gap_recovered(d["per_family"][f], p["per_family"][f], v)
                           for f, v in m["per_family"].items()},
            "macro": gap_recovered(d["macro"], p["macro"], m["macro"]),
            "dense_macro": d["macro"], "pruned_macro": p["macro"]}


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
    references = None
    if config.reference_dense is not None:
        references = (read_reference(config.reference_dense), read_reference(config.reference_pruned))
    for source in config.suite_exclude if config.suite_size else []:
        if source != "embedded" and not Path(source).exists():
            raise DataError(f"{source}: no such pool to remove from the evaluation suite (suite_exclude)")
    harness_tasks = scratch = None
    if config.lm_eval_tasks:
        from paser.harness import prepare_tasks

        # the generated task YAMLs go to the output folder, else to a folder removed afterwards
        scratch = None if out is not None else tempfile.TemporaryDirectory(prefix="paser-lm-eval-")
        folder = Path(out) if out is not None else Path(scratch.name)
        harness_tasks = prepare_tasks(config.lm_eval_tasks, folder / "lm_eval_tasks")
    device = config.device or default_device()
    config = dataclasses.replace(config, dtype=resolve_dtype(config.dtype, device))
    announce(f"evaluating {model}" + (f" + {adapter}" if adapter else "") + f" on {device} ({config.dtype})")
    net, tokenizer, described = load_for_eval(model, adapter, config.dtype, device, trust_pickle)
    reference = None
    if config.divergence_from is not None and (heldout is not None or config.suite_size):
        from paser.models import check_same_tokenizer, load_model

        reference = load_model(config.divergence_from, dtype=config.dtype, trust_pickle=trust_pickle, device=device)
        check_same_tokenizer(reference.tokenizer, tokenizer, config.divergence_from, "the evaluated model")
    result: dict = {"model": str(model), "adapter": adapter, "description": described, "settings": vars(config)}
    if config.divergence_from is not None:
        result["jsd_to_reference"] = {"reference": config.divergence_from}
    start = time.perf_counter()
    if text is not None:
        context = getattr(net.config, "max_position_embeddings", 2048) or 2048
        long_window = config.long_window or min(2048, context)
        result["perplexity"] = {
            f"llm-pruner ({config.window}-token windows)": perplexity(net, tokenizer, text, config.window,
                                                                      config.batch_size),
            f"long ({long_window}-token windows)": perplexity(net, tokenizer, text, long_window, 1),
        }
    # with a reference model, each NLL pass also gives the JSD to it (one pass of the evaluated model)
    ref_model = reference.model if reference is not None else None
    if heldout is not None:
        sums, counts, jsd = token_stats(net, tokenizer, heldout, config.template, config.cutoff, config.batch_size,
                                        ref_model)
        result["response_nll"] = _nll_summary(heldout, sums, counts)
        result["response_nll"]["compute"] = {"tokens": input_tokens(tokenizer, heldout, config.template,
                                                                    config.cutoff), "positions": int(counts.sum())}
        if jsd is not None:
            result["jsd_to_reference"]["heldout"] = _jsd_summary(heldout, jsd)
    if config.suite_size:
        result["suite"] = suite_accuracy(net, tokenizer, config.suite_size, config.suite_seed, config.template,
                                         config.max_new_tokens, config.batch_size, config.suite_exclude,
                                         config.cutoff, config.suite_accuracy_per_family, ref_model)
        if "jsd" in result["suite"]:
            result["jsd_to_reference"]["suite"] = result["suite"].pop("jsd")
        if references is not None:
            result["suite"]["answer_nll_gap_closed"] = suite_gap_closed(
                result["suite"], references[0].get("suite"), references[1].get("suite"),
                (config.reference_dense, config.reference_pruned))
    from paser.ledger import flop_params

    result["compute"] = evaluation_ledger(result, flop_params(net), flop_params(ref_model) if ref_model is not None
                                          else None, str(model), config.divergence_from).to_dict()
    del reference, ref_model
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
        for metric, label in METRIC_LABELS.items():
            if metric in scores:
                lines.append(f"| lm-eval {task} ({scores['samples']} records, {result['settings']['lm_eval_fewshot']}"
                             f"-shot), {label} | {scores[metric]:.4f} ± {scores[metric + '_stderr']:.4f} |")
    return "\n".join(lines) + "\n"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


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
