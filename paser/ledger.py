"""The compute ledger: what a selection, a recovery or an evaluation spent, in tokens through each
model, floating-point operations and wall time, by one counting rule.

The rule (forward FLOPs per token of a decoder, attention's sequence-length term left out):

    forward        2 x N_body x tokens + 2 x H x V x positions (+ 2 x N_lora x tokens with adapters)
    LoRA training  2 x forward (forward, and the backward pass to the activations through the frozen
                   weights; no weight gradients but the adapters'), 3 x with activation checkpointing
                   (the forward again), + 6 x N_lora x tokens for the adapters themselves

N_body is the decoder's parameters without the token embedding (a lookup) and without the
vocabulary head; H x V is the head, counted only at the positions it runs on (paser projects only
the positions it scores or trains on). Tokens are real tokens, padding excluded: the ledger counts
the work the method needs, not what a batch layout wasted. Scoring reuses the prompt template's
shared preamble once per batch; the ledger counts every record's preamble, an upper bound there.

Entries say whether their stage was reused from a run folder: ``total`` is what the result cost to
make, ``spent`` what this invocation computed.

    python -c "from paser.ledger import forward_flops; print(forward_flops(100e6, 37e6, 1000, 400))"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

TRAIN_PASSES = 2  # a LoRA step: the forward and the backward to the activations
CHECKPOINTED_PASSES = 3  # the forward is run again in the backward pass


def flop_params(model) -> dict[str, int]:
    """The parameter counts the rule needs: ``body`` (the decoder without its token embedding),
    ``head`` (hidden x vocabulary), ``lora`` (trainable adapter parameters, 0 without adapters)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    embed = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    embed_ids = {id(p) for p in embed.parameters()} if embed is not None else set()
    body = sum(p.numel() for n, p in decoder.named_parameters() if id(p) not in embed_ids and "lora_" not in n)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {"body": int(body), "head": int(head.weight.numel()) if head is not None else 0, "lora": int(lora)}


def encoder_params(model: torch.nn.Module) -> dict[str, int]:
    """An embedding model's counts (sentence-transformers): every parameter but the token
    embeddings' tables, no vocabulary head."""
    total = sum(p.numel() for p in model.parameters())
    tables = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return {"body": int(total - tables), "head": 0, "lora": 0}


def forward_flops(body: float, head: float, tokens: float, positions: float) -> float:
    """FLOPs of a forward pass over ``tokens`` with the head at ``positions``."""
    return 2.0 * body * tokens + 2.0 * head * positions


def training_flops(params: dict, tokens: float, positions: float, checkpointing: bool = False) -> float:
    """FLOPs of training the adapters on ``tokens`` (labelled at ``positions``), by the rule above."""
    passes = CHECKPOINTED_PASSES if checkpointing else TRAIN_PASSES
    return (passes * forward_flops(params["body"], params["head"], tokens, positions)
            + 6.0 * params.get("lora", 0) * tokens)


@dataclass
class Entry:
    """One line of the ledger: ``what`` ran ``model`` over ``tokens`` (head at ``positions``)."""

    stage: str
    what: str
    model: str
    tokens: int
    positions: int
    flops: float
    seconds: float | None = None
    reused: bool = False


@dataclass
class Ledger:
    entries: list[Entry] = field(default_factory=list)
    not_counted: list[str] = field(default_factory=list)  # work done outside paser that the run used

    def forward(self, stage: str, model: str, params: dict, tokens: int, positions: int,
                seconds: float | None = None, reused: bool = False, what: str = "forward") -> Ledger:
        # adapters (LoRA) run beside the weights they adapt: 2 x their parameters per token
        flops = forward_flops(params["body"], params["head"], tokens, positions) + 2.0 * params.get("lora", 0) * tokens
        self.entries.append(Entry(stage, what, model, int(tokens), int(positions), flops, seconds, reused))
        return self

    def training(self, stage: str, model: str, params: dict, tokens: int, positions: int, checkpointing: bool,
                 seconds: float | None = None) -> Ledger:
        self.entries.append(Entry(stage, "LoRA training", model, int(tokens), int(positions),
                                  training_flops(params, tokens, positions, checkpointing), seconds))
        return self

    def extend(self, other: Ledger) -> Ledger:
        self.entries += other.entries
        return self

    @property
    def total(self) -> float:
        """FLOPs the result cost to make, reused stages included."""
        return sum(e.flops for e in self.entries)

    @property
    def spent(self) -> float:
        """FLOPs computed by this invocation (reused stages left out)."""
        return sum(e.flops for e in self.entries if not e.reused)

    def by_stage(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for e in self.entries:
            out[e.stage] = out.get(e.stage, 0.0) + e.flops
        return out

    def to_dict(self) -> dict:
        return {"rule": "forward 2 N_body tokens + 2 H V positions; LoRA training 2 forwards (3 with activation "
                        "checkpointing) + 6 N_lora tokens; real tokens, no padding (paser.ledger)",
                "flops_total": self.total, "flops_spent": self.spent, "flops_by_stage": self.by_stage(),
                "entries": [asdict(e) for e in self.entries], "not_counted": self.not_counted}

    @classmethod
    def from_dict(cls, data: dict) -> Ledger:
        return cls([Entry(**e) for e in data.get("entries", [])], list(data.get("not_counted", [])))

    def line(self) -> str:
        """One line for a command's last output: the total, split by stage."""
        parts = ", ".join(f"{stage} {human(flops)}" for stage, flops in self.by_stage().items() if flops)
        reused = "" if self.spent == self.total else f"; {human(self.spent)} computed now, the rest reused"
        outside = f"; not counted: {', '.join(self.not_counted)}" if self.not_counted else ""
        return f"compute: {human(self.total)}" + (f" ({parts})" if parts else "") + reused + outside


def human(flops: float) -> str:
    """FLOPs with an SI prefix: 1.2 TFLOP, 340 GFLOP."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {prefix}FLOP"
    return f"{flops:.3g} FLOP"


def parts_table(parts: dict[str, dict]) -> list[str]:
    """Markdown lines: each part's compute (a ledger's ``to_dict``) and the sum, e.g. a whole
    ``paser run``'s selection, recovery and evaluations."""
    lines = ["| part | FLOPs | computed in this run |", "|---|---:|---:|"]
    for name, found in parts.items():
        lines.append(f"| {name} | {human(found['flops_total'])} | {human(found['flops_spent'])} |")
    total = sum(p["flops_total"] for p in parts.values())
    spent = sum(p["flops_spent"] for p in parts.values())
    return lines + [f"| all | {human(total)} | {human(spent)} |"]
