"""Degradation's forward passes: both models over a shard's records in batches of like length,
the prompt template's shared preamble computed once per batch shape (its cache keeps nothing of the
batch), the vocabulary head only at the scored positions, and each record's JSD and NLLs.

    python -c "from paser.selection.passes import common_prefix; print(common_prefix.__doc__)"
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import torch

from paser.selection.configs import ScoreConfig
from paser.selection.degradation import Encoded, encode_records, jsd_from_logits, jsd_from_logprobs


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
def target_states(model, input_ids, attention_mask, rows, cols, prefix: SharedPrefix | None):
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


def chunk_logits(states: torch.Tensor, head, lo: int, hi: int) -> torch.Tensor:
    return states[lo:hi] if head is None else head(states[lo:hi])  # [chunk, V]


def batch_tensors(batch: list[Encoded], positions: str, pad_id: int, device: torch.device):
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


def token_nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per row of log-probabilities [M, V]."""
    return -logp.gather(-1, targets[:, None])[:, 0]


def sample_stats(jsd, nll_p, nll_q, owner, n: int, positions: str) -> np.ndarray:
    """[n, 3]: per sample JSD (mean, or sum for instruction_sum), mean dense NLL, mean pruned NLL."""
    return np.stack([_per_sample(jsd, owner, n, positions), _per_sample(nll_p, owner, n, "mean"),
                     _per_sample(nll_q, owner, n, "mean")], axis=1)


@torch.no_grad()
def score_batch(dense, pruned, batch: list[Encoded], config: ScoreConfig, pad_id: int,
                device: torch.device, prefixes: tuple[SharedPrefix, SharedPrefix] | None = None) -> np.ndarray:
    """[len(batch), 3] for one padded batch: each sample's JSD (mean over its scored tokens, or the
    sum for instruction_sum) and its mean NLL of the true next token under the dense and under the
    pruned model, all from the same forward passes and vocabulary projections."""
    input_ids, mask, r, c = batch_tensors(batch, config.positions, pad_id, device)
    if len(r) == 0:
        return np.full((len(batch), 3), np.nan)
    targets = input_ids[r, c + 1]
    pre_p, pre_q = prefixes if prefixes is not None else (None, None)
    sp, head_p = target_states(dense, input_ids, mask, r, c, pre_p)
    sq, head_q = target_states(pruned, input_ids, mask, r, c, pre_q)
    # vocabulary-wide tensors exist for one chunk of positions at a time
    jsd, nll_p, nll_q = [], [], []
    for i in range(0, len(r), config.jsd_chunk):
        lp = torch.log_softmax(chunk_logits(sp, head_p, i, i + config.jsd_chunk).float(), dim=-1)
        lq = torch.log_softmax(chunk_logits(sq, head_q, i, i + config.jsd_chunk).float(), dim=-1)
        jsd.append(jsd_from_logprobs(lp, lq))
        nll_p.append(token_nll(lp, targets[i:i + config.jsd_chunk]))
        nll_q.append(token_nll(lq, targets[i:i + config.jsd_chunk]))
    return sample_stats(torch.cat(jsd), torch.cat(nll_p), torch.cat(nll_q), r, len(batch), config.positions)


TEMPLATE_VARIANTS = 4  # more distinct tokens past the common prefix than this: they are content, not template


def shard_batches(tokenizer, records, config: ScoreConfig):
    """Encoded samples and the batches to score them in: longest first, and with share_prefix first
    grouped by template variant (the tokens just past the shard's common prefix, when they take at
    most TEMPLATE_VARIANTS forms, as Alpaca's with and without input do; a chat template's are the
    user's words, and grouping by them would mix lengths), so each batch shares the longest possible
    preamble. A batch holds at most ``batch_size`` records and, with ``batch_tokens``, at most that
    many padded tokens. Deterministic for the records."""
    encoded = encode_records(tokenizer, records, config.prompt)
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


class Prefixes:
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


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def score_frame(records, encoded: list[Encoded], stats: np.ndarray, positions: str) -> pd.DataFrame:
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
    encoded, batches = shard_batches(tokenizer, records, config)
    prefixes = Prefixes((dense, pruned), config, device)
    stats = np.full((len(encoded), 3), np.nan)
    for idx in batches:
        batch = [encoded[i] for i in idx]
        stats[idx] = score_batch(dense, pruned, batch, config, pad_id_of(tokenizer), device, prefixes.get(batch))
        if on_batch is not None:
            on_batch(len(batch), sum(len(e.ids) for e in batch))
    return score_frame(records, encoded, stats, config.positions)


@torch.no_grad()
def score_unbatched(dense, pruned, tokenizer, records, config: ScoreConfig) -> np.ndarray:
    """The plain definition of the JSD, for reference and benchmarks: each model once per sample,
    no batching, no padding, full logits. Same values as ``score_shard``'s ``jsd`` up to float
    rounding, only slower."""
    out = []
    for e in encode_records(tokenizer, records, config.prompt):
        ids = torch.tensor([e.ids], device=next(dense.parameters()).device)
        lp, lq = dense(input_ids=ids, use_cache=False).logits[0], pruned(input_ids=ids, use_cache=False).logits[0]
        t = torch.tensor(list(e.targets(config.positions)), dtype=torch.long, device=ids.device) - 1
        if len(t) == 0:
            out.append(float("nan"))
            continue
        jsd = jsd_from_logits(lp[t], lq[t])
        out.append((jsd.sum() if config.positions == "instruction_sum" else jsd.mean()).item())
    return np.array(out)
