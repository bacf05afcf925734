"""paser's scorer for lm-eval's log-likelihood requests: each context computed once, its choices after it.

lm-eval's Hugging Face backend (``HFLM``) scores every (context, continuation) request as its own
sequence, so a four-way HellaSwag item runs its context four times. ``PackedLM`` is an ``HFLM``
that keeps lm-eval's tokenization of each request (``_encode_pair``: the context's tokens, then
the whole text's tokens after them) and replaces only the scoring: the requests that share a
context's tokens become one row, the context followed by every continuation but its last token,
with an attention mask that lets each continuation see the context and itself, never another
continuation, and positions that restart after the context for each one. A continuation's tokens
are predicted from the context's last position and from its own positions, exactly the positions
lm-eval reads; the vocabulary head runs only there. Rows are sorted by length and batched up to
``token_budget`` tokens.

A request longer than the model's context (lm-eval truncates it from the left) or with an empty
context goes to lm-eval's own code unchanged, and so does every request of a model that is not a
decoder with a vocabulary head (``get_decoder``, ``get_output_embeddings``). tests/test_zeroshot.py
checks that the log-likelihoods equal lm-eval's to 1e-4 and that the chosen answers are the same.

With a ``RequestJournal``, every scored batch's answers are appended to a JSONL file as they come,
and a request already in the journal is not scored again: an evaluation stopped in the middle of
HellaSwag (an hour on 2 CPU cores) resumes where it stopped. The journal's first line names the
model it belongs to; a journal of another model (or adapter, dtype, device) is started afresh.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM

from paser.cache import read_appended_jsonl
from paser.errors import DataError
from paser.progress import announce, quiet


class RequestJournal:
    """The answers of scored requests, by a hash of the request's (context, continuation) text,
    appended to ``path`` batch by batch with the tokens and head positions they cost; ``identity``
    (a JSON-able dict: the model's files, dtype, device, ...) heads the file."""

    def __init__(self, path: str | Path, identity: dict):
        self.path = Path(path)
        self.answers: dict[str, tuple[float, bool]] = {}
        self.tokens = self.positions = 0
        head = {"journal": "paser lm-eval requests", "identity": identity}
        fields = {"tokens", "positions", "answers"}
        lines = read_appended_jsonl(self.path, lambda e: "journal" in e or fields <= set(e),
                                    lambda n: f"{self.path}, line {n}: not a journal entry; delete the file to "
                                              "score again")
        if lines and lines[0] != head:
            announce(f"{self.path}: a journal of another evaluation (model, dtype or device); started afresh")
            lines = []
        for entry in lines[1:]:
            if not fields <= set(entry):
                raise DataError(f"{self.path}: a second head line; delete the file to score again")
            self.tokens += entry["tokens"]
            self.positions += entry["positions"]
            self.answers.update((key, (float(ll), bool(greedy))) for key, ll, greedy in entry["answers"])
        if not lines:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(head) + "\n", encoding="utf-8")
        elif len(self.answers):
            announce(f"lm-eval requests: {len(self.answers)} already scored, read from {self.path}")

    @staticmethod
    def key(request: tuple[str, str]) -> str:
        return hashlib.sha256(json.dumps(list(request)).encode()).hexdigest()

    def record(self, answers: list[tuple[str, tuple[float, bool]]], tokens: int, positions: int) -> None:
        """Append one batch's answers (key, (log-likelihood, greedy)) and their cost."""
        entry = {"tokens": tokens, "positions": positions, "answers": [[k, ll, g] for k, (ll, g) in answers]}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        self.answers.update(answers)


class PackedLM(HFLM):
    """``HFLM`` with log-likelihood requests scored one shared context per row; the counts of
    tokens run and head positions are kept in ``tokens`` and ``positions`` (the compute ledger;
    with a ``journal``, its earlier runs' counts included)."""

    def __init__(self, *args, token_budget: int = 4096, journal: RequestJournal | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_budget = token_budget
        self.journal = journal
        self.tokens = journal.tokens if journal is not None else 0
        self.positions = journal.positions if journal is not None else 0

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if not hasattr(model, "get_decoder") or model.get_output_embeddings() is None:  # not a decoder + head
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        # a rolling window (perplexity tasks) has no request text: it is scored, not journaled
        keys = ([None if r[0] is None else RequestJournal.key(r[0]) for r in requests]
                if self.journal is not None else None)
        by_context: dict[tuple[int, ...], list[int]] = {}
        unpacked = []
        for i, (_, context, continuation) in enumerate(requests):
            if keys is not None and keys[i] in self.journal.answers:
                out[i] = self.journal.answers[keys[i]]
            elif not context or not continuation or len(context) + len(continuation) - 1 > self.max_length:
                unpacked.append(i)
            else:
                by_context.setdefault(tuple(context), []).append(i)
        if unpacked:  # lm-eval's own path: left truncation, empty contexts
            before = self.tokens, self.positions
            for i, answer in zip(unpacked, super()._loglikelihood_tokens([requests[i] for i in unpacked],
                                                                          disable_tqdm=True, override_bs=override_bs)):
                out[i] = answer
                self.tokens += len(requests[i][1]) + len(requests[i][2]) - 1
                self.positions += len(requests[i][2])
            self._journal([(i, out[i]) for i in unpacked], keys, before)
        rows = sorted(by_context.items(), key=lambda kv: -_row_length(kv[0], [requests[i][2] for i in kv[1]]))
        lengths = [_row_length(context, [requests[i][2] for i in members]) for context, members in rows]
        start, done, last_note, tokens_before = time.perf_counter(), 0, time.perf_counter(), self.tokens
        lo = 0
        while lo < len(rows):
            width = lengths[lo]
            hi = lo + 1
            # rows as long as the budget allows, none shorter than half the first: padding stays under half
            while hi < len(rows) and (hi - lo + 1) * width <= self.token_budget and 2 * lengths[hi] >= width:
                hi += 1
            batch = rows[lo:hi]
            before = self.tokens, self.positions
            answers = self._score_rows(batch, requests, width)
            for index, answer in answers:
                out[index] = answer
            self._journal(answers, keys, before)
            done += len(batch)
            lo = hi
            if not quiet() and not disable_tqdm and time.perf_counter() - last_note > 30:
                last_note = time.perf_counter()
                announce(f"lm-eval requests: {done}/{len(rows)} contexts, "
                         f"{(self.tokens - tokens_before) / (last_note - start):.0f} tokens/s")
        return out

    def _journal(self, answers, keys, before: tuple[int, int]) -> None:
        if self.journal is not None:
            self.journal.record([(keys[i], answer) for i, answer in answers if keys[i] is not None],
                                self.tokens - before[0], self.positions - before[1])

    @torch.no_grad()
    def _score_rows(self, rows, requests, width: int):
        """(request index, (log-likelihood, greedy)) for every request of ``rows``, each row one context."""
        device = self.device
        n = len(rows)
        ids = torch.full((n, width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        position = torch.zeros((n, width), dtype=torch.long)
        segment = torch.full((n, width), -1, dtype=torch.long)  # -1 padding, 0 context, k the k-th continuation
        reads = []  # (row, request index, positions whose logits predict the continuation, its tokens)
        for r, (context, members) in enumerate(rows):
            length = len(context)
            ids[r, :length] = torch.tensor(context)
            position[r, :length] = torch.arange(length)
            segment[r, :length] = 0
            at = length
            for k, index in enumerate(members, 1):
                continuation = requests[index][2]
                body = continuation[:-1]
                ids[r, at:at + len(body)] = torch.tensor(body, dtype=torch.long)
                position[r, at:at + len(body)] = torch.arange(length, length + len(body))
                segment[r, at:at + len(body)] = k
                reads.append((r, index, [length - 1] + list(range(at, at + len(body))), continuation))
                at += len(body)
            self.tokens += at
        # a query sees the context and its own continuation, causally; padding sees only itself
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
        allowed = (causal & same & (segment[:, :, None] >= 0)) | torch.eye(width, dtype=torch.bool)
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        dtype = next(model.parameters()).dtype
        mask = torch.zeros((n, 1, width, width), dtype=dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        hidden = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     position_ids=position.to(device), use_cache=False).last_hidden_state
        rows_at = torch.tensor([r for r, _, at, _ in reads for _ in at])
        cols_at = torch.tensor([c for _, _, at, _ in reads for c in at])
        logits = model.get_output_embeddings()(hidden[rows_at.to(device), cols_at.to(device)]).float()
        logp = F.log_softmax(logits, dim=-1)
        self.positions += len(rows_at)
        answers, offset = [], 0
        for _, index, at, continuation in reads:
            block = logp[offset:offset + len(at)]
            target = torch.tensor(continuation, device=block.device)
            greedy = bool((block.argmax(dim=-1) == target).all())
            answers.append((index, (float(block.gather(1, target[:, None]).sum()), greedy)))
            offset += len(at)
        return answers


def _row_length(context, continuations) -> int:
    return len(context) + sum(len(c) - 1 for c in continuations)
