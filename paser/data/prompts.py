"""The prompt template shared by degradation scoring and recovery training.

Scoring and training must see the same text, or the selected samples repair a distribution the
model is never trained on. Alpaca's template is the default (the paper's setting); ``chat`` uses
the tokenizer's own chat template.
"""

from __future__ import annotations

from typing import Protocol

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat")


class InstructionLike(Protocol):
    instruction: str
    input: str
    response: str


def format_prompt(record: InstructionLike, template: str = "alpaca", tokenizer=None) -> str:
    """The prompt text for a record: everything the model reads before the response.

    A conversation record (``context`` turns before its instruction) reads, under ``alpaca``,
    its earlier turns as the input ("System: ...", "User: ...", "Assistant: ..." paragraphs),
    and under ``chat`` the tokenizer's chat template over all its turns."""
    context = getattr(record, "context", ())
    if template == "chat" and context:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer that has a chat template")
        return tokenizer.apply_chat_template([*context, {"role": "user", "content": record.instruction}],
                                             tokenize=False, add_generation_prompt=True)
    if template == "alpaca":
        if record.input:
            return ALPACA_WITH_INPUT.format(instruction=record.instruction, input=record.input)
        return ALPACA_NO_INPUT.format(instruction=record.instruction)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer that has a chat template")
        user = record.instruction if not record.input else f"{record.instruction}\n\n{record.input}"
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    raise ValueError(f"unknown prompt template {template!r}; choose one of {TEMPLATES}")


def format_example(record: InstructionLike, template: str = "alpaca", tokenizer=None) -> tuple[str, str]:
    """(prompt, response) for teacher forcing; the response ends with the tokenizer's eos when known."""
    eos = getattr(tokenizer, "eos_token", None) or ""
    return format_prompt(record, template, tokenizer), record.response + eos


def tokenize_example(tokenizer, record: InstructionLike, template: str = "alpaca",
                     cutoff: int = 256) -> tuple[list[int], int, int, bool]:
    """Token ids of prompt + response (+ eos), cut at ``cutoff`` tokens, as scoring and training see them.

    Returns (ids, prompt tokens, response tokens kept, truncated). Prompt and response are
    tokenised separately so the response boundary is exact.
    """
    prompt = tokenizer(format_prompt(record, template, tokenizer), add_special_tokens=True)["input_ids"]
    response = tokenizer(record.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    ids = prompt + response
    truncated = len(ids) > cutoff
    ids = ids[:cutoff]
    n_prompt = min(len(prompt), cutoff)
    return ids, n_prompt, len(ids) - n_prompt, truncated
