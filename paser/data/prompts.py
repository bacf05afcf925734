"""The prompt template shared by degradation scoring and recovery training.

Scoring and training must see the same text, or the selected samples repair a distribution the
model is never trained on. Alpaca's template is the default (the paper's setting); ``chat`` uses
the tokenizer's own chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

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


@dataclass
class PromptFormat:
    """How a record becomes the model's input: the YAML section ``prompt``, declared once and
    shared by degradation scoring, token budgets, recovery and evaluation (each config that
    tokenizes holds it as its ``prompt``, filled from this section, never from its own)."""

    template: Literal["alpaca", "chat"] = "alpaca"
    """Prompt template: alpaca (the paper's), or chat, the tokenizer's own chat template."""
    cutoff: int = 256
    """Tokens of prompt + response kept: what scoring reads, a token budget counts and recovery
    trains on."""

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if self.cutoff < 1:
            raise ValueError(f"cutoff must be positive, got {self.cutoff}")


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
    return tokenize_examples(tokenizer, [record], template, cutoff)[0]


TOKENIZER_BATCH = 1024  # texts per tokenizer call: a fast tokenizer encodes a list in parallel


def tokenize_examples(tokenizer, records, template: str = "alpaca",
                      cutoff: int = 256) -> list[tuple[list[int], int, int, bool]]:
    """``tokenize_example`` of each record, the texts given to the tokenizer a list at a time (the
    same ids: nothing is padded), so that a fast tokenizer may spread a list over its cores
    (bench/tokenize_speed.py)."""
    return list(iter_examples(tokenizer, records, template, cutoff))


def iter_examples(tokenizer, records, template: str = "alpaca", cutoff: int = 256):
    """``tokenize_examples`` one record at a time, holding one list of the tokenizer's at a time:
    a pass that keeps only counts needs no memory for the ids of millions of records."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for lo in range(0, len(records), TOKENIZER_BATCH):
        part = records[lo:lo + TOKENIZER_BATCH]
        prompts = tokenizer([format_prompt(r, template, tokenizer) for r in part], add_special_tokens=True)["input_ids"]
        responses = tokenizer([r.response for r in part], add_special_tokens=False)["input_ids"]
        for prompt, response in zip(prompts, responses):
            ids = prompt + response + eos
            n_prompt = min(len(prompt), cutoff)
            yield ids[:cutoff], n_prompt, min(len(ids), cutoff) - n_prompt, len(ids) > cutoff
