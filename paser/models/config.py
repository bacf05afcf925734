"""The config of ``paser prune`` (the ``prune`` YAML section); no algorithm code is imported here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Importance = Literal["taylor", "l2", "random"]


@dataclass
class PruneConfig:
    """How to prune. Every field is also a ``paser prune`` option and a YAML key."""

    ratio: float = 0.25
    """Fraction of attention heads and of MLP channels to remove in each pruned layer."""
    attn_ratio: float | None = None
    """Fraction of attention heads to remove; defaults to ``ratio``."""
    mlp_ratio: float | None = None
    """Fraction of MLP intermediate channels to remove; defaults to ``ratio``."""
    attn_layers: tuple[int, int] | None = None
    """Layers [start, end) whose attention is pruned; default keeps the first 1/8 and last 1/16
    of the layers intact (LLM-Pruner's 4..30 of 32, scaled to the model's depth)."""
    mlp_layers: tuple[int, int] | None = None
    """Layers [start, end) whose MLP is pruned; same default as ``attn_layers``."""
    importance: Importance = "taylor"
    """Group importance: first-order Taylor, L2 magnitude, or random."""
    gqa: Literal["heads", "groups"] = "heads"
    """Under grouped-query attention: remove query heads inside each key/value group, or whole groups."""
    calibration: str | None = None
    """Calibration data for Taylor importance: instruction records (JSON/JSONL/CSV/Parquet) or a
    .txt file (one sample per paragraph); default is paser's generated capability suite."""
    num_calibration: int = 10
    """Number of calibration samples."""
    calibration_max_tokens: int = 128
    """Tokens kept per calibration sample."""
    round_to: int | None = None
    """Round each pruned layer's MLP width to a multiple of this (e.g. 8) for faster kernels."""
    seed: int = 0
    """Seed for calibration sampling and random importance."""

    def __post_init__(self):
        for name in ("ratio", "attn_ratio", "mlp_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.importance not in ("taylor", "l2", "random"):
            raise ValueError(f"importance must be taylor, l2 or random, got {self.importance!r}")
        if self.gqa not in ("heads", "groups"):
            raise ValueError(f"gqa must be 'heads' or 'groups', got {self.gqa!r}")
        if self.num_calibration < 1:
            raise ValueError(f"num_calibration must be at least 1, got {self.num_calibration}")
        if self.round_to is not None and self.round_to < 1:
            raise ValueError(f"round_to must be a positive integer, got {self.round_to}")
        for name in ("attn_layers", "mlp_layers"):
            value = getattr(self, name)
            if value is not None:
                value = tuple(int(v) for v in value)
                if len(value) != 2 or value[0] < 0 or value[1] < value[0]:
                    raise ValueError(f"{name} must be (start, end) with 0 <= start <= end, got {value}")
                setattr(self, name, value)
