"""Budgets in records and tokens: parsing, resolution against a pool, and the baselines' fill rule."""

from __future__ import annotations

import numpy as np
import pytest

from paser.selection.budget import Budget, parse_budget, take_in_order


@pytest.mark.parametrize("text, amount, unit", [
    ("100", 100, "records"), (100, 100, "records"), (0.2, 0.2, "records"), ("0.2", 0.2, "records"),
    ("40000tok", 40000, "tokens"), ("40000 tokens", 40000, "tokens"), ("40_000TOK", 40000, "tokens"),
    ("0.2tok", 0.2, "tokens"), (" 1.0 tok ", 1, "tokens"), ("4e4tok", 40000, "tokens")])
def test_parse(text, amount, unit):
    b = parse_budget(text)
    assert (b.amount, b.unit) == (amount, unit)
    assert parse_budget(str(b)) == b  # the written form reads back


@pytest.mark.parametrize("budget, n, tokens, expected", [
    (0.2, 1000, None, 200), (100, 1000, None, 100), (1.0, 5, None, 1), (5, 5, None, 5),
    ("0.2tok", 10, 5000, 1000), ("4000tok", 10, 5000, 4000), ("5000tok", 10, 5000, 5000)])
def test_resolve(budget, n, tokens, expected):
    assert parse_budget(budget).resolve(n, tokens) == expected


@pytest.mark.parametrize("budget, message", [
    (0, "must be positive"), (-3, "must be positive"), (11, "above the pool's 10 records"),
    (2.5, "neither a fraction"), (0.01, "selects nothing"), ("5001tok", "above the pool's 5000 tokens"),
    ("0.00001tok", "selects nothing"), ("12x", "neither a count"), ("tok", "neither a count"),
    ("2.5tok", "neither a fraction"), (True, "count or a fraction")])
def test_bad_budgets(budget, message):
    with pytest.raises(ValueError, match=message):
        parse_budget(budget).resolve(10, 5000)


def test_token_budget_needs_token_counts():
    with pytest.raises(ValueError, match="needs the pool's token counts"):
        Budget(100, "tokens").resolve(10)


def test_take_in_order_stops_at_the_first_record_that_does_not_fit():
    cost = np.array([5, 3, 9, 1, 1])
    assert take_in_order([0, 1, 2, 3, 4], cost, 10) == [0, 1]  # 8 spent; record 2 (9) does not fit
    assert take_in_order([3, 4, 0], cost, 7) == [3, 4, 0]
    assert take_in_order([2], cost, 8) == []
