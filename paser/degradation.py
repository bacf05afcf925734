"""Stage 4: per-sample degradation, the Jensen-Shannon divergence between the dense and pruned
next-token distributions on the response, under teacher forcing.

JSD(P||Q) = 1/2 KL(P||M) + 1/2 KL(Q||M), M = (P+Q)/2, natural log (at most ln 2), in fp32 from
log-softmax. A sample's score is the mean over its response tokens (cut at the training cutoff).
The same passes also give each sample's mean NLL of the true next token under either model
(``nll_dense``, ``nll_pruned``) and their difference ``loss_gap``, the second signal.
Each model runs once per sample: records are batched by similar length with padding and an
attention mask, and only the positions that predict scored tokens go through the vocabulary
projection. Scores are written shard by shard (atomically), so a killed run resumes from the
finished shards and ends with the same scores as an uninterrupted one.

    python -c "from paser.degradation import jsd_from_logits; import torch; \
print(jsd_from_logits(torch.randn(3, 10), torch.randn(3, 10)))"
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from paser.prompts import tokenize_example

LN2 = math.log(2.0)
SCORE_COLUMNS = ["id", "jsd", "nll_dense", "nll_pruned", "loss_gap", "n_prompt", "n_response", "n_scored",
                 "truncated"]
SHARD_FORMAT = 2  # 2: shards also hold nll_dense, nll_pruned and loss_gap
# settings that choose among the scores, not how they are computed (per_cluster chooses which records
# are scored: the fingerprint has their ids)
SCORE_INDEPENDENT = ("signal", "per_cluster")
LATER_OPTIONS = ("batch_tokens",)  # in a fingerprint only when set (earlier shards stay valid)


@dataclass
class ScoreConfig:
    """How degradation is measured."""

    template: Literal["alpaca", "chat"] = "alpaca"
    """Prompt template, shared with recovery training."""
    cutoff: int = 256
    """Tokens of prompt + response kept (the training cutoff)."""
    positions: Literal["response", "prompt", "all", "instruction_sum"] = "response"
    """Scored tokens: the response (default), the prompt, all, or the authors' instruction-only sum."""
    batch_size: int = 32
    """Records per forward pass (at most)."""
    batch_tokens: int | None = None
    """Padded tokens per forward pass at most (records x the longest, records sorted by length):
    batches of like length as large as a GPU holds, short records many to a batch. None: batches
    of ``batch_size`` records."""
    shard_size: int = 256
    """Records per shard file; a resumed run skips finished shards."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Model weights dtype for scoring: auto is bfloat16 on a CUDA device with bf16 support, else
    float32 (resolved when the settings are built, so the run records the dtype used); the JSD
    itself is always computed in fp32."""
    device: str | None = None
    """Device for both models (default: CUDA when available, else CPU)."""
    jsd_chunk: int = 512
    """Positions whose vocabulary projection and JSD are computed at once (bounds peak memory)."""
    share_prefix: bool = True
    """Compute the token prefix shared by every prompt of a shard once (the template's preamble)."""
    two_pass: bool = False
    """For pairs that do not fit on one device together: run the dense model alone first, caching
    its top-k log-probabilities per shard on disk, then the pruned model alone. The JSD is then
    taken over the top-k tokens plus one bucket for the rest (exact when top_k is the vocabulary)."""
    top_k: int = 64
    """Dense log-probabilities kept per position in two-pass mode."""
    signal: Literal["jsd", "loss_gap"] = "jsd"
    """The per-record degradation that CDS and IES use: jsd (the paper), or loss_gap = mean
    response NLL under the pruned model minus under the dense model. Both are computed by every
    scoring run, so switching re-scores nothing."""
    per_cluster: int | None = None
    """Score only a seeded sample of this many records per cluster (all of a smaller cluster) when
    the method needs each cluster's CDS but not every record's score (``--method strat`` with
    ``sample.ies_temperature`` 0): a small share of the full scoring pass, CDS with a 95% interval
    in clusters.json and the report. None: every record. Methods that rank every record refuse it."""

    def __post_init__(self):
        for name in ("cutoff", "batch_size", "shard_size", "jsd_chunk", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ValueError(f"batch_tokens must be positive, got {self.batch_tokens}")
        if self.per_cluster is not None and self.per_cluster < 2:
            raise ValueError(f"per_cluster must be at least 2 (an interval needs two records), got {self.per_cluster}")


def jsd_from_logits(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-row JSD (nats) between softmax(logits_p) and softmax(logits_q); rows [M, V] -> [M]."""
    return jsd_from_logprobs(torch.log_softmax(logits_p.float(), dim=-1), torch.log_softmax(logits_q.float(), dim=-1))


def jsd_from_logprobs(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Per-row JSD (nats) between two rows of log-probabilities [M, V] -> [M]."""
    lm = torch.logaddexp(lp, lq) - LN2
    # exp(lp) * (lp - lm) is 0 where p is 0: no 0 * log 0 arises in log space
    kl_pm = (lp.exp() * (lp - lm)).sum(-1)
    kl_qm = (lq.exp() * (lq - lm)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp(0.0, LN2)


@dataclass
class Encoded:
    ids: list[int]
    n_prompt: int
    n_response: int
    truncated: bool

    def targets(self, positions: str) -> range:
        """Indices of the tokens whose prediction is scored (prediction comes from index - 1)."""
        if positions in ("prompt", "instruction_sum"):
            return range(1, self.n_prompt)
        if positions == "all":
            return range(1, len(self.ids))
        return range(self.n_prompt, len(self.ids))


def encode_records(tokenizer, records, config: ScoreConfig) -> list[Encoded]:
    return [Encoded(*tokenize_example(tokenizer, r, config.template, config.cutoff)) for r in records]


def token_table(tokenizer, records, config: ScoreConfig) -> pd.DataFrame:
    """Each record's prompt and response tokens under the template and cutoff (what recovery trains
    on), without any model: id, n_prompt, n_response, n_tokens, truncated."""
    encoded = encode_records(tokenizer, records, config)
    n_prompt = np.array([e.n_prompt for e in encoded], dtype=np.int64)
    n_response = np.array([e.n_response for e in encoded], dtype=np.int64)
    return pd.DataFrame({"id": [r.id for r in records], "n_prompt": n_prompt, "n_response": n_response,
                         "n_tokens": n_prompt + n_response, "truncated": [e.truncated for e in encoded]})


def body_and_head(model):
    """(decoder body, vocabulary head) when the model exposes them and its logits are the head's
    output as it is, else (None, None). A peft model gives its base model's; a data-parallel wrapper
    gives none (its forward must run for the gradients to be synchronised). The vocabulary
    projection can then run on the positions that need it only."""
    if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        return None, None
    if hasattr(model, "get_base_model"):  # peft: the adapters live inside the base model's layers
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None, None  # the forward transforms the head's output: only it gives the logits
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = get_decoder() if callable(get_decoder) else None
    return (body, head) if body is not None and head is not None else (None, None)


def _cache_of(output):
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


@functools.cache
def _prefix_only_layer():
    from transformers.cache_utils import DynamicLayer

    class PrefixOnlyLayer(DynamicLayer):
        """A cache layer that holds the shared prefix and returns prefix + new states without
        storing them (see ``SharedPrefix.for_batch``)."""

        def update(self, key_states, value_states, *args, **kwargs):
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    return PrefixOnlyLayer


class SharedPrefix:
    """Key/value states of the token prefix that every prompt in a shard starts with.

    Alpaca's template puts the same ~30 tokens before every instruction; computing them once per
    shard instead of once per record roughly halves scoring time on short records.
    """

    def __init__(self, model, prefix: list[int], device: torch.device):
        self.length = len(prefix)
        self.layers = None
        body, _ = body_and_head(model)
        if body is None or not prefix:
            self.length = 0
            return
        with torch.no_grad():
            out = body(input_ids=torch.tensor([prefix], device=device), use_cache=True)
        cache = _cache_of(out)
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]

    def for_batch(self, size: int):
        """A cache holding the prefix for ``size`` rows (expanded views, no copy) that gives each
        layer the prefix followed by the batch's own states and keeps none of them: each layer's
        keys and values are freed once its attention has run, as in a forward without a cache (a
        cache that kept them would hold every layer's, about 2 GB a model at 32 x 256 tokens of a 7B)."""
        from transformers import DynamicCache

        cache = DynamicCache([(k.expand(size, -1, -1, -1), v.expand(size, -1, -1, -1)) for k, v in self.layers])
        for layer in cache.layers:
            layer.__class__ = _prefix_only_layer()
        return cache


def common_prefix(encoded: list[Encoded], positions: str) -> list[int]:
    """The longest token prefix shared by all samples, leaving every scored prediction after it."""
    if positions != "response" or not encoded:
        return []
    first = encoded[0].ids
    n = min(e.n_prompt for e in encoded) - 1  # the last prompt token predicts the first response token
    for e in encoded[1:]:
        m = 0
        while m < n and e.ids[m] == first[m]:
            m += 1
        n = m
    return first[:max(n, 0)]


@torch.no_grad()
def _target_states(model, input_ids, attention_mask, rows, cols, prefix: SharedPrefix | None):
    """(states at the scored positions [M, H], vocabulary head) — or (logits [M, V], None) for a
    model that does not expose its head. The vocabulary projection then runs on those rows only."""
    body, head = body_and_head(model)
    if body is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[rows, cols], None
    if prefix is not None and prefix.length:
        ones = torch.ones((input_ids.shape[0], prefix.length), dtype=attention_mask.dtype,
                          device=attention_mask.device)
        mask = torch.cat([ones, attention_mask[:, prefix.length:]], dim=1)
        hidden = body(input_ids=input_ids[:, prefix.length:], attention_mask=mask,
                      cache=prefix.for_batch(input_ids.shape[0]), use_cache=True).last_hidden_state
        return hidden[rows, cols - prefix.length], head  # [M, H]
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # [B,T,H]
    return hidden[rows, cols], head


def _chunk_logits(states: torch.Tensor, head, lo: int, hi: int) -> torch.Tensor:
    return states[lo:hi] if head is None else head(states[lo:hi])  # [chunk, V]


def _batch_tensors(batch: list[Encoded], positions: str, pad_id: int, device: torch.device):
    """Right-padded ids and mask [B, T] and the (row, col) of each scored prediction; the token it
    predicts is ``ids[row, col + 1]``."""
    width = max(len(e.ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    rows, cols = [], []
    for b, e in enumerate(batch):
        input_ids[b, :len(e.ids)] = torch.tensor(e.ids)
        mask[b, :len(e.ids)] = 1
        for t in e.targets(positions):
            rows.append(b)
            cols.append(t - 1)
    r = torch.tensor(rows, dtype=torch.long, device=device)
    c = torch.tensor(cols, dtype=torch.long, device=device)
    return input_ids.to(device), mask.to(device), r, c


def _per_sample(per_token: torch.Tensor, owner: torch.Tensor, n: int, positions: str) -> np.ndarray:
    """Mean (sum for positions="instruction_sum") of per-token values by sample; NaN for samples
    with none. Pass positions="mean" for a mean whatever the scored positions."""
    per_token = per_token.double().cpu()
    owner = owner.cpu()
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, per_token)
    counts = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, torch.ones_like(per_token))
    values = sums if positions == "instruction_sum" else sums / counts.clamp(min=1)
    out = np.full(n, np.nan)
    has = counts.numpy() > 0
    out[has] = values.numpy()[has]
    return out


def _nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per row of log-probabilities [M, V]."""
    return -logp.gather(-1, targets[:, None])[:, 0]


def _sample_stats(jsd, nll_p, nll_q, owner, n: int, positions: str) -> np.ndarray:
    """[n, 3]: per sample JSD (mean, or sum for instruction_sum), mean dense NLL, mean pruned NLL."""
    return np.stack([_per_sample(jsd, owner, n, positions), _per_sample(nll_p, owner, n, "mean"),
                     _per_sample(nll_q, owner, n, "mean")], axis=1)


@torch.no_grad()
def score_batch(dense, pruned, batch: list[Encoded], config: ScoreConfig, pad_id: int,
                device: torch.device, prefixes: tuple[SharedPrefix, SharedPrefix] | None = None) -> np.ndarray:
    """[len(batch), 3] for one padded batch: each sample's JSD (mean over its scored tokens, or the
    sum for instruction_sum) and its mean NLL of the true next token under the dense and under the
    pruned model, all from the same forward passes and vocabulary projections."""
    input_ids, mask, r, c = _batch_tensors(batch, config.positions, pad_id, device)
    if len(r) == 0:
        return np.full((len(batch), 3), np.nan)
    targets = input_ids[r, c + 1]
    pre_p, pre_q = prefixes if prefixes is not None else (None, None)
    sp, head_p = _target_states(dense, input_ids, mask, r, c, pre_p)
    sq, head_q = _target_states(pruned, input_ids, mask, r, c, pre_q)
    # vocabulary-wide tensors exist for one chunk of positions at a time
    jsd, nll_p, nll_q = [], [], []
    for i in range(0, len(r), config.jsd_chunk):
        lp = torch.log_softmax(_chunk_logits(sp, head_p, i, i + config.jsd_chunk).float(), dim=-1)
        lq = torch.log_softmax(_chunk_logits(sq, head_q, i, i + config.jsd_chunk).float(), dim=-1)
        jsd.append(jsd_from_logprobs(lp, lq))
        nll_p.append(_nll(lp, targets[i:i + config.jsd_chunk]))
        nll_q.append(_nll(lq, targets[i:i + config.jsd_chunk]))
    return _sample_stats(torch.cat(jsd), torch.cat(nll_p), torch.cat(nll_q), r, len(batch), config.positions)


TEMPLATE_VARIANTS = 4  # more distinct tokens past the common prefix than this: they are content, not template


def _shard_batches(tokenizer, records, config: ScoreConfig):
    """Encoded samples and the batches to score them in: longest first, and with share_prefix first
    grouped by template variant (the tokens just past the shard's common prefix, when they take at
    most TEMPLATE_VARIANTS forms, as Alpaca's with and without input do; a chat template's are the
    user's words, and grouping by them would mix lengths), so each batch shares the longest possible
    preamble. A batch holds at most ``batch_size`` records and, with ``batch_tokens``, at most that
    many padded tokens. Deterministic for the records."""
    encoded = encode_records(tokenizer, records, config)
    probe = len(common_prefix(encoded, config.positions)) + 8 if config.share_prefix else 0
    if len({tuple(e.ids[:probe]) for e in encoded}) > TEMPLATE_VARIANTS:
        probe = 0
    order = sorted(range(len(encoded)), key=lambda i: (encoded[i].ids[:probe], -len(encoded[i].ids), i))
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        width = len(encoded[batch[0]].ids) if batch else 0  # the first is the longest of its variant
        if (batch is None or len(batch) == config.batch_size or encoded[i].ids[:probe] != encoded[batch[0]].ids[:probe]
                or (config.batch_tokens is not None and (len(batch) + 1) * width > config.batch_tokens)):
            batches.append([i])
        else:
            batch.append(i)
    return encoded, batches


class _Prefixes:
    """SharedPrefix states per distinct batch prefix, for one or two models."""

    def __init__(self, models, config: ScoreConfig, device):
        self.models, self.config, self.device, self.cache = models, config, device, {}

    def get(self, batch: list[Encoded]):
        if not self.config.share_prefix:
            return None
        key = tuple(common_prefix(batch, self.config.positions))
        if key not in self.cache:
            self.cache[key] = tuple(SharedPrefix(m, list(key), self.device) for m in self.models)
        return self.cache[key]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _frame(records, encoded: list[Encoded], stats: np.ndarray, positions: str) -> pd.DataFrame:
    """The shard table; ``stats`` [n, 3] holds JSD, dense NLL and pruned NLL per record."""
    return pd.DataFrame({
        "id": [r.id for r in records],
        "jsd": stats[:, 0],
        "nll_dense": stats[:, 1],
        "nll_pruned": stats[:, 2],
        "loss_gap": stats[:, 2] - stats[:, 1],
        "n_prompt": [e.n_prompt for e in encoded],
        "n_response": [e.n_response for e in encoded],
        "n_scored": [len(e.targets(positions)) for e in encoded],
        "truncated": [e.truncated for e in encoded],
    })


def score_shard(dense, pruned, tokenizer, records, config: ScoreConfig, device=None,
                on_batch=None) -> pd.DataFrame:
    """Scores of one shard of records, both models in memory. ``on_batch(records, tokens)`` is
    called after each batch (progress displays)."""
    device = torch.device(device or next(dense.parameters()).device)
    encoded, batches = _shard_batches(tokenizer, records, config)
    prefixes = _Prefixes((dense, pruned), config, device)
    stats = np.full((len(encoded), 3), np.nan)
    for idx in batches:
        batch = [encoded[i] for i in idx]
        stats[idx] = score_batch(dense, pruned, batch, config, _pad_id(tokenizer), device, prefixes.get(batch))
        if on_batch is not None:
            on_batch(len(batch), sum(len(e.ids) for e in batch))
    return _frame(records, encoded, stats, config.positions)


# ---------------------------------------------------------------- two-pass mode


def _logprob_chunks(model, tokenizer, encoded: list[Encoded], batches: list[list[int]], config: ScoreConfig,
                    device):
    """One model's log-probabilities at the scored positions of a shard, chunk by chunk, in the
    shard's batch order: (record index within the shard of each row, log-probs [rows, V], the
    token each row predicts)."""
    prefixes = _Prefixes((model,), config, device)
    for idx in batches:
        batch = [encoded[i] for i in idx]
        input_ids, mask, r, c = _batch_tensors(batch, config.positions, _pad_id(tokenizer), device)
        if len(r) == 0:
            continue
        targets = input_ids[r, c + 1]
        pre = prefixes.get(batch)
        states, head = _target_states(model, input_ids, mask, r, c, pre[0] if pre else None)
        owners = torch.tensor(idx, dtype=torch.long)[r.cpu()]
        for i in range(0, len(r), config.jsd_chunk):
            chunk = _chunk_logits(states, head, i, i + config.jsd_chunk)
            yield (owners[i:i + config.jsd_chunk], torch.log_softmax(chunk.float(), dim=-1),
                   targets[i:i + config.jsd_chunk])


@torch.no_grad()
def dense_topk_shard(dense, tokenizer, records, config: ScoreConfig, device=None) -> dict[str, torch.Tensor]:
    """Pass 1: the dense model's top-k log-probabilities at every scored position of a shard, and
    its NLL of the true next token there, in batch order (``sample`` gives each row's record
    index within the shard)."""
    device = torch.device(device or next(dense.parameters()).device)
    values, indices, samples, nll = [], [], [], []
    encoded, batches = _shard_batches(tokenizer, records, config)
    for owners, logp, targets in _logprob_chunks(dense, tokenizer, encoded, batches, config, device):
        top = logp.topk(min(config.top_k, logp.shape[-1]), dim=-1)
        values.append(top.values.cpu())
        indices.append(top.indices.to(torch.int32).cpu())
        samples.append(owners)
        nll.append(_nll(logp, targets).cpu())
    k = min(config.top_k, getattr(dense.config, "vocab_size", config.top_k))
    cat = lambda xs, shape, dtype: torch.cat(xs) if xs else torch.zeros(shape, dtype=dtype)  # noqa: E731
    return {"values": cat(values, (0, k), torch.float32), "indices": cat(indices, (0, k), torch.int32),
            "sample": cat(samples, (0,), torch.long), "nll": cat(nll, (0,), torch.float32)}


def _with_tail(top_logp: torch.Tensor) -> torch.Tensor:
    """Top-k log-probabilities plus one category for all other tokens: a distribution over k+1."""
    mass = top_logp.exp().sum(-1, keepdim=True).clamp(max=1.0)
    tail = torch.log1p(-mass.clamp(max=1.0 - 1e-7)).where(mass < 1.0 - 1e-7, torch.full_like(mass, -1e30))
    return torch.cat([top_logp, tail], dim=-1)


@torch.no_grad()
def score_shard_against_topk(pruned, tokenizer, records, config: ScoreConfig, topk: dict,
                             device=None) -> pd.DataFrame:
    """Pass 2: the pruned model against the cached dense top-k, JSD over top-k + one tail bucket;
    both NLLs are exact (the dense one was kept in pass 1)."""
    device = torch.device(device or next(pruned.parameters()).device)
    encoded, batches = _shard_batches(tokenizer, records, config)
    per_token, nll_q, start = [], [], 0
    for _, logq, targets in _logprob_chunks(pruned, tokenizer, encoded, batches, config, device):
        n = logq.shape[0]
        p_top = topk["values"][start:start + n].to(device)
        idx_top = topk["indices"][start:start + n].to(device).long()
        start += n
        per_token.append(jsd_from_logits(_with_tail(p_top), _with_tail(logq.gather(-1, idx_top))))
        nll_q.append(_nll(logq, targets).cpu())
    if start != len(topk["sample"]) or "nll" not in topk:
        raise RuntimeError("cached dense top-k does not match this shard; remove the shard folder to rescore")
    stats = (_sample_stats(torch.cat(per_token).cpu(), topk["nll"], torch.cat(nll_q), topk["sample"], len(encoded),
                           config.positions)
             if per_token else np.full((len(encoded), 3), np.nan))
    return _frame(records, encoded, stats, config.positions)


@torch.no_grad()
def score_unbatched(dense, pruned, tokenizer, records, config: ScoreConfig) -> np.ndarray:
    """The plain definition of the JSD, for reference and benchmarks: each model once per sample,
    no batching, no padding, full logits. Same values as ``score_shard``'s ``jsd`` up to float
    rounding, only slower."""
    out = []
    for e in encode_records(tokenizer, records, config):
        ids = torch.tensor([e.ids], device=next(dense.parameters()).device)
        lp, lq = dense(input_ids=ids, use_cache=False).logits[0], pruned(input_ids=ids, use_cache=False).logits[0]
        t = torch.tensor(list(e.targets(config.positions)), dtype=torch.long, device=ids.device) - 1
        if len(t) == 0:
            out.append(float("nan"))
            continue
        jsd = jsd_from_logits(lp[t], lq[t])
        out.append((jsd.sum() if config.positions == "instruction_sum" else jsd.mean()).item())
    return np.array(out)


def scoring_fingerprint(config: ScoreConfig, dense_fp: str, pruned_fp: str, ids: list[str]) -> str:
    """What the shards of a scoring run depend on: config, both models, the records in order."""
    # an option added later counts only when set, so earlier runs' shards keep their fingerprint
    what = {k: v for k, v in asdict(config).items()
            if k not in SCORE_INDEPENDENT and not (k in LATER_OPTIONS and v is None)}
    h = hashlib.sha256(json.dumps(what | {"dense": dense_fp, "pruned": pruned_fp, "format": SHARD_FORMAT},
                                  sort_keys=True).encode())
    for rid in ids:
        h.update(rid.encode() + b"\x00")
    return h.hexdigest()[:16]


def _write_atomic(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(lo, min(n, lo + shard_size)) for lo in range(0, n, shard_size)]


def progress_bar(total: int, enabled: bool, desc: str):
    """A records bar on a terminal (see ``paser.progress.bar_enabled``), else none."""
    from tqdm.auto import tqdm

    from paser.progress import bar_enabled

    return tqdm(total=total, desc=desc, unit="rec", disable=not bar_enabled(enabled))


def _checked(frames: list[pd.DataFrame], records, shard_dir: Path) -> pd.DataFrame:
    scores = pd.concat(frames, ignore_index=True)
    if list(scores["id"]) != [r.id for r in records]:
        raise RuntimeError(f"{shard_dir}: shard files do not match the records being scored; "
                           "remove the folder to rescore")
    return scores


def shard_path(shard_dir: str | Path, index: int) -> Path:
    return Path(shard_dir) / f"shard-{index:05d}.parquet"


def score_pool_shard(dense, pruned, tokenizer, records, config: ScoreConfig, shard_dir: str | Path,
                     index: int, on_batch=None) -> bool:
    """Score shard ``index`` of ``records`` (the whole pool, in order) into its file in
    ``shard_dir``, unless that file exists already. Returns whether it computed anything."""
    lo, hi = shard_ranges(len(records), config.shard_size)[index]
    return score_shard_file(dense, pruned, tokenizer, records[lo:hi], config, shard_path(shard_dir, index), on_batch)


def score_shard_file(dense, pruned, tokenizer, records, config: ScoreConfig, path: Path, on_batch=None) -> bool:
    """Score one shard's ``records`` into ``path`` (atomically), unless it exists already. Returns
    whether it computed anything."""
    if path.is_file():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(score_shard(dense, pruned, tokenizer, records, config, on_batch=on_batch), path)
    return True


def collect_shards(records, config: ScoreConfig, shard_dir: str | Path) -> pd.DataFrame:
    """Every shard of a finished scoring run, checked against the records, as one table."""
    n = len(shard_ranges(len(records), config.shard_size))
    missing = [i for i in range(n) if not shard_path(shard_dir, i).is_file()]
    if missing:
        raise RuntimeError(f"{shard_dir}: shard(s) {missing} are not finished")
    return _checked([pd.read_parquet(shard_path(shard_dir, i)) for i in range(n)], records, Path(shard_dir))


def score_pool(dense, pruned, tokenizer, records, config: ScoreConfig, shard_dir: str | Path,
               progress: bool = False, on_shard=None) -> pd.DataFrame:
    """Score every record, writing ``shard-NNNNN.parquet`` files into ``shard_dir`` as they finish.

    Finished shards are read back instead of recomputed, so an interrupted run resumes.
    ``on_shard(index, path)`` is called after each shard is written (progress hooks, tests).
    """
    with progress_bar(len(records), progress, "degradation (JSD)") as bar:
        for i, (lo, hi) in enumerate(shard_ranges(len(records), config.shard_size)):
            if score_pool_shard(dense, pruned, tokenizer, records, config, shard_dir, i) and on_shard is not None:
                on_shard(i, shard_path(shard_dir, i))
            bar.update(hi - lo)
    return collect_shards(records, config, shard_dir)


def score_pool_two_pass(load_dense, load_pruned, tokenizer, records, config: ScoreConfig,
                        shard_dir: str | Path, progress: bool = False, on_shard=None) -> pd.DataFrame:
    """Two-pass scoring: only one model in memory at a time (see ``ScoreConfig.two_pass``).

    ``load_dense()`` / ``load_pruned()`` return a model and are called only when a shard needs
    it. Pass 1 writes ``topk-NNNNN.pt`` per shard; pass 2 turns each into ``shard-NNNNN.parquet``
    and removes it. Both passes resume from what is on disk.
    """
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    ranges = shard_ranges(len(records), config.shard_size)
    final = [shard_path(shard_dir, i) for i in range(len(ranges))]
    cached = [shard_dir / f"topk-{i:05d}.pt" for i in range(len(ranges))]
    model = None
    with progress_bar(len(records), progress, "dense top-k (pass 1)") as bar:
        for (lo, hi), done, path in zip(ranges, final, cached):
            if not done.is_file() and not path.is_file():
                model = model if model is not None else load_dense()
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                torch.save(dense_topk_shard(model, tokenizer, records[lo:hi], config), tmp)
                os.replace(tmp, path)
            bar.update(hi - lo)
    del model
    model, frames = None, []
    with progress_bar(len(records), progress, "degradation vs top-k (pass 2)") as bar:
        for i, ((lo, hi), done, path) in enumerate(zip(ranges, final, cached)):
            if done.is_file():
                frames.append(pd.read_parquet(done))
            else:
                model = model if model is not None else load_pruned()
                topk = torch.load(path, weights_only=True)
                frames.append(score_shard_against_topk(model, tokenizer, records[lo:hi], config, topk))
                _write_atomic(frames[-1], done)
                path.unlink()
                if on_shard is not None:
                    on_shard(i, done)
            bar.update(hi - lo)
    return _checked(frames, records, shard_dir)
