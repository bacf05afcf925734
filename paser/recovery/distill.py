"""Distillation targets and losses for recovery: the pruned model (the student) learns the dense
model's (the teacher's) next-token distribution at every response position of the selected
records, where selection measured that the two disagree most.

At a response position, with the teacher's log-probabilities log p = log_softmax(z_T / T) and the
student's log q = log_softmax(z_S / T) at temperature T:

    kl:   KL(p || q) = sum_v p_v (log p_v - log q_v)      (forward KL: the student covers the teacher)
    jsd:  JSD(p, q), natural log, as degradation scoring measures it

each multiplied by T^2, so that the gradient keeps its scale when T changes. Prompt positions
are masked as in SFT, and a step's loss is the sum over every response position of its
effective batch divided by their count, so gradient accumulation gives the same step as one
large batch, as for SFT.

The teacher's targets come from one of two places:
- the teacher in memory (default): one forward pass without gradients per micro-batch, the
  full distribution, exact;
- a top-k cache (``teacher_top_k``), for pairs that do not fit on the device together: the
  teacher runs alone, once per training record, before the student is loaded, and its top-k
  log-probabilities and the log of the mass of every other token are written to disk, part by
  part (a killed run keeps the finished parts). The loss then compares the two distributions
  coarsened to the teacher's top-k tokens plus one bucket for all the others, each bucket holding
  its side's exact remaining mass (the teacher's computed from its full distribution when
  cached, the student's from its own at training time). This equals the full divergence when
  k is the vocabulary and is otherwise a lower bound of it (merging tokens never increases KL or
  JSD).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from paser.recovery.config import DIVERGENCES
from paser.selection.degradation import jsd_from_logprobs
from paser.selection.passes import target_states

IGNORE = -100
PART_SIZE = 256  # training records per cache file


@dataclass
class Targets:
    """The teacher's distribution at the labelled positions of a batch (row-major, as
    ``labels != -100`` orders them)."""

    logp: torch.Tensor
    """[M, V] full log-probabilities, or [M, k] of the top-k tokens."""
    indices: torch.Tensor | None = None
    """[M, k] token ids of the top-k (None: ``logp`` covers the whole vocabulary in order)."""
    tail: torch.Tensor | None = None
    """[M] log of the teacher's mass outside the top-k (None: no token is outside)."""


def divergence(targets: Targets, student_logits: torch.Tensor, kind: str = "kl",
               temperature: float = 1.0) -> torch.Tensor:
    """Per position [M]: the divergence of the student (logits [M, V]) from the teacher's
    ``targets``, times temperature^2 (see the module docstring)."""
    lq = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    lp = targets.logp.float()
    if targets.indices is not None:
        idx = targets.indices.long()
        top = lq.gather(-1, idx)
        if targets.tail is not None:
            rest = torch.logsumexp(lq.scatter(-1, idx, float("-inf")), dim=-1)
            lq, lp = torch.cat([top, rest[:, None]], dim=-1), torch.cat([lp, targets.tail.float()[:, None]], dim=-1)
        else:
            lq = top
    if kind == "kl":
        value = (lp.exp() * (lp - lq)).sum(-1)
    elif kind == "jsd":
        value = jsd_from_logprobs(lp, lq)
    else:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")
    return value * temperature ** 2


def _positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of the logits that predict each labelled token, row-major."""
    keep = batch["labels"][:, 1:] != IGNORE
    rows, cols = keep.nonzero(as_tuple=True)
    return rows, cols


@torch.no_grad()
def teacher_logprobs(teacher, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """[M, V] the teacher's log-probabilities (at ``temperature``) at the labelled positions of
    ``batch``; only those positions go through the vocabulary projection."""
    rows, cols = _positions(batch)
    states, head = target_states(teacher, batch["input_ids"], batch["attention_mask"], rows, cols, None)
    logits = states if head is None else head(states)
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def in_memory_targets(teacher, batch: dict[str, torch.Tensor], temperature: float = 1.0) -> Targets:
    """Exact targets from a teacher in memory."""
    return Targets(teacher_logprobs(teacher, batch, temperature))


def top_k_targets(logp: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The top-k log-probabilities of rows [M, V], their token ids, and the log of the mass of
    every other token (absent when k covers the vocabulary)."""
    k = min(k, logp.shape[-1])
    top = logp.topk(k, dim=-1)
    out = {"values": top.values.cpu(), "indices": top.indices.to(torch.int32).cpu()}
    if k < logp.shape[-1]:
        out["tail"] = torch.logsumexp(logp.scatter(-1, top.indices, float("-inf")), dim=-1).cpu()
    return out


class TopKCache:
    """The teacher's top-k targets of every training record, on disk in ``folder``.

    Written once, part by part (``PART_SIZE`` records a file, atomically), before training; a
    folder made for other records, teacher, temperature or k is discarded (it is derived data).
    """

    def __init__(self, folder: str | Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.rows: list[dict[str, torch.Tensor]] = []
        self.vocab_size: int | None = None  # of the teacher, checked against the student's

    def _part(self, index: int) -> Path:
        return self.folder / f"part-{index:05d}.pt"

    def missing(self, n_records: int) -> list[int]:
        """Parts still to compute (after discarding a folder made with other settings)."""
        stamp = self.folder / "fingerprint.json"
        made_for = json.loads(stamp.read_text()).get("fingerprint") if stamp.is_file() else None
        if made_for != self.fingerprint:
            if made_for is not None:
                shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True, exist_ok=True)
            # written whole (other processes under torchrun read it), and only when it changes
            tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint}))
            os.replace(tmp, stamp)
        parts = range((n_records + PART_SIZE - 1) // PART_SIZE)
        return [i for i in parts if not self._part(i).is_file()]

    def build(self, teacher, examples, collate, pad_id: int, device, k: int, temperature: float,
              batch_size: int, progress=None) -> None:
        """Compute the missing parts with ``teacher`` (``collate`` as in training)."""
        for index in self.missing(len(examples)):
            chunk = examples[index * PART_SIZE:(index + 1) * PART_SIZE]
            rows: list[dict[str, torch.Tensor]] = []
            for lo in range(0, len(chunk), batch_size):
                batch = collate(chunk[lo:lo + batch_size], pad_id, device)
                found = top_k_targets(teacher_logprobs(teacher, batch, temperature), k)
                counts = (batch["labels"][:, 1:] != IGNORE).sum(1).tolist()
                start = 0
                for n in counts:
                    rows.append({name: t[start:start + n] for name, t in found.items()})
                    start += n
                if progress is not None:
                    progress(len(counts))
            tmp = self._part(index).with_name(f".{self._part(index).name}.{os.getpid()}.tmp")
            torch.save(rows, tmp)
            os.replace(tmp, self._part(index))

    def load(self, n_records: int) -> None:
        if self.missing(n_records):
            raise RuntimeError(f"{self.folder}: the teacher cache is not finished")
        self.rows = []
        for index in range((n_records + PART_SIZE - 1) // PART_SIZE):
            self.rows += torch.load(self._part(index), weights_only=True)

    def targets(self, records: list[int], device) -> Targets:
        """The cached targets of ``records`` (indices into the training examples), in batch order."""
        rows = [self.rows[i] for i in records]
        cat = lambda name: torch.cat([r[name] for r in rows]).to(device)  # noqa: E731
        return Targets(cat("values"), cat("indices"), cat("tail") if "tail" in rows[0] else None)


def cache_fingerprint(teacher_fp: str, k: int, temperature: float, examples) -> str:
    """What a top-k cache depends on: the teacher, k, the temperature and every record's tokens."""
    h = hashlib.sha256(json.dumps([teacher_fp, k, temperature]).encode())
    for e in examples:
        h.update(json.dumps([e.ids, e.labels]).encode())
    return h.hexdigest()[:16]
