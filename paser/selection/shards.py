"""Degradation scoring shard by shard: each shard's table written atomically (a killed run resumes
from the finished ones), the scoring fingerprint, collecting the shards, and the two-pass mode
(the dense model's top-k cached per shard, then the pruned model alone) for pairs that do not fit
together.

    python -c "from paser.selection.shards import shard_ranges; print(shard_ranges(600, 256))"
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from paser.progress import bar_enabled
from paser.selection.configs import ScoreConfig
from paser.selection.degradation import LATER_OPTIONS, SCORE_INDEPENDENT, SHARD_FORMAT, Encoded, jsd_from_logits
from paser.selection.passes import (
    Prefixes,
    batch_tensors,
    chunk_logits,
    pad_id_of,
    sample_stats,
    score_frame,
    score_shard,
    shard_batches,
    target_states,
    token_nll,
)


def _logprob_chunks(model, tokenizer, encoded: list[Encoded], batches: list[list[int]], config: ScoreConfig,
                    device):
    """One model's log-probabilities at the scored positions of a shard, chunk by chunk, in the
    shard's batch order: (record index within the shard of each row, log-probs [rows, V], the
    token each row predicts)."""
    prefixes = Prefixes((model,), config, device)
    for idx in batches:
        batch = [encoded[i] for i in idx]
        input_ids, mask, r, c = batch_tensors(batch, config.positions, pad_id_of(tokenizer), device)
        if len(r) == 0:
            continue
        targets = input_ids[r, c + 1]
        pre = prefixes.get(batch)
        states, head = target_states(model, input_ids, mask, r, c, pre[0] if pre else None)
        owners = torch.tensor(idx, dtype=torch.long)[r.cpu()]
        for i in range(0, len(r), config.jsd_chunk):
            chunk = chunk_logits(states, head, i, i + config.jsd_chunk)
            yield (owners[i:i + config.jsd_chunk], torch.log_softmax(chunk.float(), dim=-1),
                   targets[i:i + config.jsd_chunk])


@torch.no_grad()
def dense_topk_shard(dense, tokenizer, records, config: ScoreConfig, device=None) -> dict[str, torch.Tensor]:
    """Pass 1: the dense model's top-k log-probabilities at every scored position of a shard, and
    its NLL of the true next token there, in batch order (``sample`` gives each row's record
    index within the shard)."""
    device = torch.device(device or next(dense.parameters()).device)
    values, indices, samples, nll = [], [], [], []
    encoded, batches = shard_batches(tokenizer, records, config)
    for owners, logp, targets in _logprob_chunks(dense, tokenizer, encoded, batches, config, device):
        top = logp.topk(min(config.top_k, logp.shape[-1]), dim=-1)
        values.append(top.values.cpu())
        indices.append(top.indices.to(torch.int32).cpu())
        samples.append(owners)
        nll.append(token_nll(logp, targets).cpu())
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
    encoded, batches = shard_batches(tokenizer, records, config)
    per_token, nll_q, start = [], [], 0
    for _, logq, targets in _logprob_chunks(pruned, tokenizer, encoded, batches, config, device):
        n = logq.shape[0]
        p_top = topk["values"][start:start + n].to(device)
        idx_top = topk["indices"][start:start + n].to(device).long()
        start += n
        per_token.append(jsd_from_logits(_with_tail(p_top), _with_tail(logq.gather(-1, idx_top))))
        nll_q.append(token_nll(logq, targets).cpu())
    if start != len(topk["sample"]) or "nll" not in topk:
        raise RuntimeError("cached dense top-k does not match this shard; remove the shard folder to rescore")
    stats = (sample_stats(torch.cat(per_token).cpu(), topk["nll"], torch.cat(nll_q), topk["sample"], len(encoded),
                           config.positions)
             if per_token else np.full((len(encoded), 3), np.nan))
    return score_frame(records, encoded, stats, config.positions)


def scoring_fingerprint(config: ScoreConfig, dense_fp: str, pruned_fp: str, ids: list[str]) -> str:
    """What the shards of a scoring run depend on: config, both models, the records in order."""
    # an option added later counts only when set, so earlier runs' shards keep their fingerprint
    what = {k: v for k, v in asdict(config).items()
            if k not in SCORE_INDEPENDENT and not (k in LATER_OPTIONS and v is None)}
    what |= what.pop("prompt")  # template and cutoff, as when they were keys of the score section
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
