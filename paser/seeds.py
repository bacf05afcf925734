"""Seeds derived from a run's seed: one for each epoch, optimizer step or adaptive round, the same
when a killed run resumes, so a resumed run draws what the uninterrupted one drew."""

from __future__ import annotations

SPREAD = 1_000_003
"""A prime above any count of epochs, steps or rounds: ``seed * SPREAD + index`` differs for every
(seed, index) pair with ``0 <= index < SPREAD``."""


def derived_seed(seed: int, index: int) -> int:
    """The seed of draw ``index`` (an epoch, a step, a round) of a process seeded ``seed``."""
    return seed * SPREAD + index
