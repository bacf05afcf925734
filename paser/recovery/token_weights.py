"""Token-weighted recovery: each response token's loss weighted by how much the pruned model lacks
there against the dense one, the degradation signal spent per token instead of per record.

    s_t = max(0, NLL_pruned(t) - NLL_dense(t))      signal "excess" (Rho-1's excess loss), or
    s_t = JSD(dense, pruned) at t                   signal "jsd" (what selection scores)
    w_t = (1 - lambda) + lambda * s_t / (mean of s over the optimizer step's labelled tokens)

so the weights average one over every step (the step's loss stays on the scale of plain SFT, and
lambda = 0 is plain SFT); at lambda = 1 the weights follow the signal alone and a token the pruned
model predicts as well as the dense one gets none. Hard selection of tokens or records lost to
random data on this project (issue 30's probe: keeping 60% of tokens by excess loss, +0.024 held-out
NLL), hence a smooth weight. The signal comes from one pass of both models over the training
records before training (the pruned model as it is before its adapters), cached in
``OUT/token_signal/`` part by part, so a killed run keeps the parts it finished; the dense model is
then released. A step's weights depend only on its records, not on how they are cut into
micro-batches or processes.

    python -c "from paser.recovery.token_weights import step_weights; import numpy as np; \
print(step_weights([np.array([0., 2.]), np.array([1.])], [[[0, 1]]], 1, 0.5))"
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from paser.selection.degradation import jsd_from_logits

PART_SIZE = 256  # training records per cache file


def record_signal(dense, pruned, batch: dict[str, torch.Tensor], kind: str, labelled) -> list[np.ndarray]:
    """Per row of ``batch``: the signal at each of its labelled tokens, in order. ``labelled(model,
    batch)`` gives (logits at the labelled positions [M, V], row-major, ...)."""
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    with torch.no_grad():
        dense_logits, pruned_logits = labelled(dense, batch)[0].float(), labelled(pruned, batch)[0].float()
        if kind == "excess":
            aim = targets[keep]
            nll = [torch.nn.functional.cross_entropy(z, aim, reduction="none") for z in (dense_logits, pruned_logits)]
            values = (nll[1] - nll[0]).clamp(min=0.0)
        else:
            values = jsd_from_logits(dense_logits, pruned_logits)
    return [part.cpu().numpy().astype(np.float32) for part in values.split(keep.sum(1).tolist())]


class SignalCache:
    """The signal of every training record on disk: ``part-NNNNN.npz`` of PART_SIZE records each,
    written whole or not at all, under a fingerprint of both models, the signal and the records."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder = Path(folder) / fingerprint

    def build(self, dense, pruned, examples: list, collate, pad_id: int, device, kind: str, micro: int,
              labelled, on_records=None) -> list[np.ndarray]:
        """The signal of ``examples``, computing the parts that are not on disk."""
        self.folder.mkdir(parents=True, exist_ok=True)
        out: list[np.ndarray] = []
        for part, lo in enumerate(range(0, len(examples), PART_SIZE)):
            path = self.folder / f"part-{part:05d}.npz"
            chunk = examples[lo:lo + PART_SIZE]
            if not path.is_file():
                values: list[np.ndarray] = [np.zeros(0, np.float32)] * len(chunk)
                order = sorted(range(len(chunk)), key=lambda i: -len(chunk[i].ids))  # like lengths share a pass
                for start in range(0, len(order), micro):
                    rows = order[start:start + micro]
                    batch = collate([chunk[i] for i in rows], pad_id, device)
                    for i, v in zip(rows, record_signal(dense, pruned, batch, kind, labelled)):
                        values[i] = v
                    if on_records is not None:
                        on_records(len(rows))
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
                np.savez(tmp, values=np.concatenate(values) if values else np.zeros(0, np.float32),
                         counts=np.array([len(v) for v in values], dtype=np.int64))
                os.replace(tmp, path)
            saved = np.load(path)
            out += np.split(saved["values"], np.cumsum(saved["counts"])[:-1]) if len(saved["counts"]) else []
        return out


def signal_fingerprint(dense_fp: str, pruned_fp: str, kind: str, examples: list) -> str:
    h = hashlib.sha256(json.dumps([dense_fp, pruned_fp, kind]).encode())
    for e in examples:
        h.update(np.asarray(e.ids, dtype=np.int64).tobytes() + np.asarray(e.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def step_weights(signal: list[np.ndarray], batches: list[list[int]], per_step: int, strength: float
                 ) -> list[np.ndarray | None]:
    """The weight of every labelled token of every micro-batch (row-major, as the loss takes them;
    None for a filler). ``batches``: the micro-batches in order, ``per_step`` of them to a step (the
    accumulation times the processes); ``signal``: each training record's signal per labelled
    token; ``strength``: lambda."""
    out: list[np.ndarray | None] = []
    for first in range(0, len(batches), per_step):
        step = batches[first:first + per_step]
        values = [np.concatenate([signal[i] for i in chunk]) if chunk else None for chunk in step]
        present = [v for v in values if v is not None and len(v)]
        mean = float(np.concatenate(present).mean()) if present else 0.0
        for v in values:
            if v is None:
                out.append(None)
            elif mean > 0:
                out.append(((1.0 - strength) + strength * v / mean).astype(np.float32))
            else:  # no token of the step is worse under the pruned model: plain SFT
                out.append(np.ones_like(v, dtype=np.float32))
    return out
