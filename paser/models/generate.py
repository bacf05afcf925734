"""Greedy answers of a model to instruction records' prompts: left-padded batches, stopped at the
end-of-sequence token, with the tokens each row read and generated (the compute ledger's counts).
Evaluation's answer accuracy and recovery's self-data distillation both generate through here.

    python -c "from paser.models.generate import generate_answers; print(generate_answers.__doc__)"
"""

from __future__ import annotations

import torch

from paser.data.prompts import format_prompt
from paser.devices import device_of


def greedy_batch(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[tuple[str, int, int]]:
    """(answer, prompt tokens, generated tokens) per prompt of one batch. A row's generated tokens
    count up to and including its end-of-sequence token: the padding after it is not work it needed."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device_of(model))
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    finally:
        tokenizer.padding_side = side
    new = out[:, enc["input_ids"].shape[1]:]
    ended = (new == tokenizer.eos_token_id).int().cumsum(1)
    generated = ((ended == 0) | ((ended == 1) & (new == tokenizer.eos_token_id))).sum(1).tolist()
    read = enc["attention_mask"].sum(1).tolist()
    answers = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [(a, int(r), int(g)) for a, r, g in zip(answers, read, generated)]


def generate_answers(model, tokenizer, records, template: str, max_new_tokens: int, batch_size: int,
                     counted: dict | None = None) -> list[str]:
    """Greedy answers to the records' prompts, ``batch_size`` a batch. ``counted`` gets the prompt
    tokens read and the tokens generated, summed."""
    answers = []
    for lo in range(0, len(records), batch_size):
        rows = greedy_batch(model, tokenizer, [format_prompt(r, template, tokenizer)
                                               for r in records[lo:lo + batch_size]], max_new_tokens)
        answers += [a for a, _, _ in rows]
        if counted is not None:
            counted["prompt_tokens"] = counted.get("prompt_tokens", 0) + sum(r for _, r, _ in rows)
            counted["new_tokens"] = counted.get("new_tokens", 0) + sum(g for _, _, g in rows)
    return answers
