"""Self-data distillation's training data (``responses: dense``): the dense model's own greedy
answers to the training records' prompts, which the pruned model then learns instead of the file's
responses (arXiv 2410.09982: the aim is to recover towards the dense model's own distribution
rather than another writer's; whether it pays here is the recovery-cost experiment's question).

Answers are generated in batches and cached by content: each line of
``OUT/dense_answers/answers.jsonl`` holds the answer to one prompt under one dense model, template
and answer length (its key hashes the four), with the tokens it read and generated. A line is
appended after every batch, so an interrupted run keeps what it generated and a later run, or
another recovery over overlapping records in the same folder, generates only what is missing.

    python -c "from paser.recovery.dense_answers import answer_key; print(answer_key('m', 'alpaca', 8, 'Hi'))"
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from paser.cache import read_appended_jsonl, write_json
from paser.data.prompts import format_prompt
from paser.progress import announce, bar_enabled

FOLDER = "dense_answers"


def answer_key(model_fp: str, template: str, max_new_tokens: int, prompt: str) -> str:
    """The cache key of one answer: what it depends on, hashed."""
    text = json.dumps([model_fp, template, max_new_tokens, prompt])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class AnswerCache:
    """The answers generated so far in ``folder`` (answers.jsonl), by key; ``add`` appends a batch."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / "answers.jsonl"
        self.rows: dict[str, dict] = {
            row["key"]: row for row in read_appended_jsonl(
                self.path, lambda row: isinstance(row.get("key"), str),
                lambda n: f"{self.path}: line {n} is not an answer record (key, answer); delete the file "
                          "to generate the answers again")}

    def add(self, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                self.rows[row["key"]] = row
            out.flush()


def answer_with_dense(records: list, data: str, config, out: Path, trust_pickle: bool, device: str,
                      world: int = 1) -> tuple[list, dict]:
    """``with_dense_answers`` by the dense model of ``config`` (``teacher``, else the selection
    run's that wrote ``data``); under ``torchrun`` the first process generates and the others read
    its cache. The model is loaded only when some answer is missing or its parameter counts
    (``params`` in the summary, for the ledger) are not on file beside the cache, and released
    after; a resumed run whose answers are all cached reads the tokenizer alone."""
    from paser.ledger import flop_params
    from paser.models.load import load_tokenizer
    from paser.recovery.teacher import load_dense, rank_zero_first, resolve_teacher

    reference = resolve_teacher(config, data)
    loaded = []

    def dense():
        if not loaded:
            loaded.append(load_dense(reference, config, trust_pickle, device))
        return loaded[0]

    with rank_zero_first(world, device):
        tokenizer = load_tokenizer(reference, trust_pickle=trust_pickle) or dense().tokenizer  # a whole pickle
        answered, summary = with_dense_answers(records, reference, None, tokenizer, config.prompt.template,
                                               config.data.answer_tokens, config.steps.micro_batch_size, out,
                                               config.progress,
                                               loader=lambda: dense().model.eval())
        sizes = ModelSizes(Path(out) / FOLDER)
        summary["params"] = sizes.get(summary["fingerprint"])
        if summary["params"] is None:
            summary["params"] = flop_params(dense().model)
            sizes.put(summary["fingerprint"], summary["params"])
    summary["loaded_model"] = bool(loaded)
    loaded.clear()
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
    return answered, summary


class ModelSizes:
    """The parameter counts of the models that wrote a cache (``models.json`` beside it, by model
    fingerprint), so that a run whose answers are all cached can enter them in its ledger without
    loading the model."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / "models.json"
        try:
            self.known = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except ValueError:
            self.known = {}  # a damaged file only costs a load of the model: its counts are written again

    def get(self, fingerprint: str) -> dict | None:
        return self.known.get(fingerprint)

    def put(self, fingerprint: str, params: dict) -> None:
        self.known[fingerprint] = params
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, self.known)


def with_dense_answers(records: list, reference: str, model, tokenizer, template: str, max_new_tokens: int,
                       batch_size: int, out: Path, progress: bool = True, loader=None) -> tuple[list, dict]:
    """``records`` with each response replaced by ``model``'s (the dense model ``reference``'s)
    greedy answer to its prompt, and what it took (with the model's fingerprint, the cache's key
    part): records answered, those kept with the file's
    response (the dense model answered nothing), the tokens read and generated (all answers, and
    those generated now: the rest came from the cache) and the seconds spent generating.
    ``model`` may be None when every answer is cached, or when ``loader`` (no arguments) returns it:
    it is called only if some answer is missing."""
    from tqdm.auto import tqdm

    from paser.models.generate import greedy_batch
    from paser.models.load import model_fingerprint

    cache = AnswerCache(Path(out) / FOLDER)
    model_fp = model_fingerprint(reference)
    prompts = [format_prompt(r, template, tokenizer) for r in records]
    keys = [answer_key(model_fp, template, max_new_tokens, p) for p in prompts]
    first: dict[str, int] = {}  # each distinct prompt once, at its first record
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    missing = [i for key, i in first.items() if key not in cache.rows]
    now = {"prompt_tokens": 0, "new_tokens": 0}
    start = time.perf_counter()
    if missing:
        announce(f"self-data distillation: {reference} answers {len(missing)} prompts ({max_new_tokens} tokens at "
                 f"most; {len(records) - len(missing)} from {cache.path})")
        if model is None:
            if loader is None:
                raise ValueError(f"{len(missing)} answers are not in {cache.path}: give the dense model or a loader")
            model = loader()
        with tqdm(total=len(missing), desc="dense answers", unit="rec", disable=not bar_enabled(progress)) as bar:
            for lo in range(0, len(missing), batch_size):
                batch = missing[lo:lo + batch_size]
                rows = greedy_batch(model, tokenizer, [prompts[i] for i in batch], max_new_tokens)
                cache.add([{"key": keys[i], "id": records[i].id, "answer": a, "prompt_tokens": r, "new_tokens": g}
                           for i, (a, r, g) in zip(batch, rows)])
                now["prompt_tokens"] += sum(r for _, r, _ in rows)
                now["new_tokens"] += sum(g for _, _, g in rows)
                bar.update(len(batch))
    answered, kept = [], []
    for record, key in zip(records, keys):
        answer = cache.rows[key]["answer"]
        if answer.strip():
            answered.append(dataclasses.replace(record, response=answer))
        else:
            answered.append(record)
            kept.append(record.id)
    used = [cache.rows[k] for k in first]  # each distinct prompt once, as generated
    summary = {"responses": "dense", "model": str(reference), "fingerprint": model_fp, "records": len(records),
               "kept_file_response": len(kept), "kept_ids": kept[:20], "answer_tokens": max_new_tokens,
               "prompt_tokens": sum(r["prompt_tokens"] for r in used), "new_tokens": sum(r["new_tokens"] for r in used),
               "generated_now": len(missing), "prompt_tokens_now": now["prompt_tokens"],
               "new_tokens_now": now["new_tokens"], "seconds": round(time.perf_counter() - start, 3),
               "cache": str(cache.path)}
    if kept:
        announce(f"self-data distillation: the dense model answered nothing to {len(kept)} of {len(records)} "
                 f"records; they keep the file's response (recovery.json lists the first ids)")
    return answered, summary


def count_answers(ledger, summary: dict) -> None:
    """The generation in ``ledger``: every token read or generated passes the dense model once (its
    cache keeps the earlier ones), the head runs at each generated one; answers taken from the
    cache are entered as reused."""
    now = summary["prompt_tokens_now"] + summary["new_tokens_now"]
    earlier = summary["prompt_tokens"] + summary["new_tokens"] - now
    if now:
        ledger.forward("dense answers", summary["model"], summary["params"], now, summary["new_tokens_now"],
                       summary["seconds"], what="greedy generation")
    if earlier > 0:
        ledger.forward("dense answers", summary["model"], summary["params"], earlier,
                       summary["new_tokens"] - summary["new_tokens_now"], reused=True, what="greedy generation")
