"""The selection budget, in records or in tokens.

A budget is a count or a fraction of the pool, in one of two units:

    100        100 records            0.2        20% of the pool's records
    40000tok   40,000 tokens          0.2tok     20% of the pool's tokens

(``tokens`` may be written in full, with or without a space: ``40000 tokens``.) A record's tokens
are what recovery trains on for it: prompt + response (+ eos) under the prompt template, cut at
the training cutoff, counted with the dense model's tokenizer (``n_prompt + n_response`` in
scores.parquet). A token budget is met record by record in the method's order while the next
record fits, so a selection never exceeds it; see ``paser.selection.selector`` for how close it gets.

    python -c "from paser.selection.budget import parse_budget; print(parse_budget('0.2tok').resolve(100, 5000))"
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

_TOKENS = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?)\s*(tok|tokens)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """``amount`` records or tokens; below 1 it is a fraction of the pool's records or tokens."""

    amount: float
    unit: Literal["records", "tokens"] = "records"

    def __post_init__(self):
        a = self.amount
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise ValueError(f"budget must be a count or a fraction, got {a!r}")
        if a <= 0:
            raise ValueError(f"budget must be positive, got {self}")
        if a >= 1 and a != int(a):
            raise ValueError(f"budget {self} is neither a fraction below 1 nor a whole count")
        if self.unit not in ("records", "tokens"):
            raise ValueError(f"budget unit must be records or tokens, got {self.unit!r}")

    @property
    def tokens(self) -> bool:
        return self.unit == "tokens"

    def __str__(self) -> str:
        amount = f"{int(self.amount)}" if self.amount >= 1 else f"{self.amount:g}"
        return amount + ("tok" if self.tokens else "")

    @property
    def setting(self) -> float | int | str:
        """The value for ``select.budget``: a number for records, text such as "40000tok" for tokens."""
        return str(self) if self.tokens else self.amount

    def resolve(self, n_records: int, pool_tokens: int | None = None) -> int:
        """The budget as a whole number of records (in [1, n_records]) or of tokens (in [1, pool_tokens])."""
        size = n_records if not self.tokens else pool_tokens
        if size is None:
            raise ValueError(f"a token budget ({self}) needs the pool's token counts")
        what = "records" if not self.tokens else "tokens"
        if self.amount < 1:
            count = int(math.floor(self.amount * size + 0.5))
            if count < 1:
                raise ValueError(f"budget {self} of {size} {what} selects nothing")
            return count
        if self.amount > size:
            raise ValueError(f"budget {int(self.amount)} {what} is above the pool's {size} {what}")
        return int(self.amount)


def parse_budget(value: Budget | str | float | int) -> Budget:
    """``100`` or ``"100"``: 100 records; ``0.2``: 20% of the records; ``"40000tok"``: 40,000 tokens;
    ``"0.2tok"``: 20% of the pool's tokens."""
    if isinstance(value, Budget):
        return value
    if isinstance(value, bool):
        raise ValueError(f"budget must be a count or a fraction, got {value!r}")
    if isinstance(value, (int, float)):
        return Budget(value)
    text = str(value).strip()
    match = _TOKENS.match(text)
    number, unit = (match.group(1), "tokens") if match else (text, "records")
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"budget {value!r} is neither a count (100), a fraction (0.2), nor a token amount "
                         "(40000tok, 0.2tok)") from None
    return Budget(int(amount) if amount >= 1 and amount == int(amount) else amount, unit)


def take_in_order(order, cost, limit: int) -> list[int]:
    """The records of ``order`` taken one by one while the next one's ``cost`` still fits in
    ``limit``; stops at the first that does not (so the unspent rest is below that record's cost)."""
    chosen, spent = [], 0
    for i in order:
        c = int(cost[i])
        if spent + c > limit:
            break
        chosen.append(int(i))
        spent += c
    return chosen


def record_tokens(table) -> np.ndarray:
    """Each row's prompt + response tokens (``n_prompt + n_response``): what a token budget counts."""
    return table["n_prompt"].to_numpy(dtype=np.int64) + table["n_response"].to_numpy(dtype=np.int64)


def record_costs(budget: Budget, table) -> np.ndarray:
    """What each row of ``table`` costs against ``budget``: 1 in records, its tokens in tokens."""
    tokens = record_tokens(table)
    return tokens if budget.tokens else np.ones_like(tokens)
