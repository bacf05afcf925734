"""Degradation scoring: JSD bounds, batching equivalence, shards and resume."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from paser.data.prompts import PromptFormat
from paser.data.suite import suite_pool
from paser.models.config import PruneConfig
from paser.models.load import load_model
from paser.models.pruning import prune_model
from paser.selection.configs import ScoreConfig
from paser.selection.degradation import encode_records, jsd_from_logits
from paser.selection.passes import common_prefix, score_shard, score_unbatched
from paser.selection.shards import score_pool


def test_jsd_properties():
    torch.manual_seed(0)
    p, q = torch.randn(50, 30), torch.randn(50, 30)
    assert torch.all(jsd_from_logits(p, p) < 1e-6)
    j = jsd_from_logits(p, q)
    assert torch.all(j > 0) and torch.all(j <= math.log(2))
    assert torch.allclose(j, jsd_from_logits(q, p), atol=1e-6)
    # disjoint one-hot distributions reach ln 2
    big = torch.full((1, 4), -1e4)
    a, b = big.clone(), big.clone()
    a[0, 0], b[0, 1] = 0.0, 0.0
    assert jsd_from_logits(a, b).item() == pytest.approx(math.log(2), abs=1e-6)


def test_jsd_matches_direct_formula():
    torch.manual_seed(1)
    p, q = torch.randn(5, 12), torch.randn(5, 12)
    P, Q = p.softmax(-1).double(), q.softmax(-1).double()
    M = (P + Q) / 2
    direct = 0.5 * (P * (P / M).log()).sum(-1) + 0.5 * (Q * (Q / M).log()).sum(-1)
    assert torch.allclose(jsd_from_logits(p, q).double(), direct, atol=1e-6)


@pytest.fixture(scope="module")
def pair(tiny_tokenizer):
    from tests.conftest import build_model

    dense = build_model(tiny_tokenizer, num_kv_heads=2)
    pruned = build_model(tiny_tokenizer, num_kv_heads=2)
    prune_model(pruned, tiny_tokenizer, PruneConfig(importance="l2", attn_layers=(0, 4), mlp_layers=(0, 4)))
    return dense, pruned


def test_identical_models_score_zero(pair, tiny_tokenizer):
    dense, _ = pair
    recs = suite_pool(12).records
    scores = score_shard(dense, dense, tiny_tokenizer, recs, ScoreConfig(batch_size=5))
    assert np.all(scores["jsd"].to_numpy() < 1e-6)


def test_different_models_positive_and_bounded(pair, tiny_tokenizer):
    recs = suite_pool(12).records
    scores = score_shard(*pair, tiny_tokenizer, recs, ScoreConfig(batch_size=5))
    assert np.all(scores["jsd"] > 0) and np.all(scores["jsd"] <= math.log(2))
    assert list(scores["id"]) == [r.id for r in recs]
    assert np.all(scores["n_scored"] == scores["n_response"])


@pytest.mark.parametrize("share_prefix, jsd_chunk", [(True, 512), (False, 512), (True, 7)])
def test_batched_equals_per_sample(pair, tiny_tokenizer, share_prefix, jsd_chunk):
    recs = suite_pool(20, seed=4).records
    cfg = ScoreConfig(batch_size=6, share_prefix=share_prefix, jsd_chunk=jsd_chunk)
    batched = score_shard(*pair, tiny_tokenizer, recs, cfg)["jsd"].to_numpy()
    reference = score_unbatched(*pair, tiny_tokenizer, recs, cfg)
    np.testing.assert_allclose(batched, reference, atol=1e-5)


def _direct_response_nll(model, tokenizer, records, cfg):
    """Mean NLL of each record's response tokens from one plain forward pass of the full sequence."""
    out = []
    for e in encode_records(tokenizer, records, cfg.prompt):
        ids = torch.tensor([e.ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        t = torch.arange(e.n_prompt, len(e.ids))
        out.append(float(-logp[t - 1, ids[0, t]].mean()) if len(t) else float("nan"))
    return np.array(out)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_loss_gap_equals_direct_nll_of_both_models(pair, tiny_tokenizer, share_prefix):
    recs = suite_pool(14, seed=5).records
    cfg = ScoreConfig(batch_size=4, share_prefix=share_prefix, jsd_chunk=9)
    scores = score_shard(*pair, tiny_tokenizer, recs, cfg)
    dense_nll = _direct_response_nll(pair[0], tiny_tokenizer, recs, cfg)
    pruned_nll = _direct_response_nll(pair[1], tiny_tokenizer, recs, cfg)
    np.testing.assert_allclose(scores["nll_dense"], dense_nll, atol=2e-5)
    np.testing.assert_allclose(scores["nll_pruned"], pruned_nll, atol=2e-5)
    np.testing.assert_allclose(scores["loss_gap"], pruned_nll - dense_nll, atol=4e-5)
    assert scores["loss_gap"].abs().max() > 1e-3  # the two models do differ


def test_common_prefix_leaves_scored_tokens(tiny_tokenizer):
    enc = encode_records(tiny_tokenizer, suite_pool(10).records, PromptFormat())
    prefix = common_prefix(enc, "response")
    assert 0 < len(prefix) < min(e.n_prompt for e in enc)
    assert all(e.ids[:len(prefix)] == prefix for e in enc)
    assert common_prefix(enc, "all") == []


def test_other_position_modes(pair, tiny_tokenizer):
    recs = suite_pool(6).records
    mean_prompt = score_shard(*pair, tiny_tokenizer, recs, ScoreConfig(positions="prompt"))
    summed = score_shard(*pair, tiny_tokenizer, recs, ScoreConfig(positions="instruction_sum"))
    np.testing.assert_allclose(summed["jsd"], mean_prompt["jsd"] * mean_prompt["n_scored"], rtol=1e-6)
    assert (score_shard(*pair, tiny_tokenizer, recs, ScoreConfig(positions="all"))["jsd"] > 0).all()


def test_cutoff_truncates_and_counts(pair, tiny_tokenizer):
    recs = suite_pool(12).records
    scores = score_shard(*pair, tiny_tokenizer, recs, ScoreConfig(prompt=PromptFormat(cutoff=45)))
    enc_lengths = scores["n_prompt"] + scores["n_response"]
    assert enc_lengths.max() <= 45 and scores["truncated"].any()
    no_tokens = scores["n_scored"] == 0
    assert scores.loc[no_tokens, "jsd"].isna().all()
    assert scores.loc[~no_tokens, "jsd"].notna().all()


def test_shards_written_and_resume_identical(pair, tiny_tokenizer, tmp_path):
    recs = suite_pool(25).records
    cfg = ScoreConfig(batch_size=4, shard_size=7)
    full = score_pool(*pair, tiny_tokenizer, recs, cfg, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").glob("shard-*.parquet")) == [
        f"shard-{i:05d}.parquet" for i in range(4)]

    class Killed(Exception):
        pass

    def kill_after_two(index, path):
        if index == 1:
            raise Killed

    with pytest.raises(Killed):
        score_pool(*pair, tiny_tokenizer, recs, cfg, tmp_path / "b", on_shard=kill_after_two)
    assert len(list((tmp_path / "b").glob("shard-*.parquet"))) == 2
    # a half-written temporary from a killed writer is ignored
    (tmp_path / "b" / ".shard-00002.parquet.999.tmp").write_bytes(b"partial")
    written = []
    resumed = score_pool(*pair, tiny_tokenizer, recs, cfg, tmp_path / "b", on_shard=lambda i, p: written.append(i))
    assert written == [2, 3]
    pd.testing.assert_frame_equal(full, resumed)


def test_bf16_scores_match_fp32_scores_of_a_pair(tiny_pair, tiny_tokenizer):
    """bf16 weights (the default on a GPU) give the fp32 scores of a dense/pruned pair within 2%
    (measured here: 0.3% at most); the pair differs, so a JSD of 0 could not pass."""
    records = suite_pool(16).records
    scores = {}
    for dtype in ("float32", "bfloat16"):
        dense, pruned = (load_model(m, dtype=dtype).model for m in tiny_pair)
        scores[dtype] = score_shard(dense, pruned, tiny_tokenizer, records, ScoreConfig())
    fp32, bf16 = scores["float32"]["jsd"].to_numpy(), scores["bfloat16"]["jsd"].to_numpy()
    assert fp32.min() > 1e-4
    np.testing.assert_allclose(bf16, fp32, rtol=0.02)
    np.testing.assert_allclose(scores["bfloat16"]["nll_pruned"], scores["float32"]["nll_pruned"], rtol=0.02)


def test_two_pass_with_full_vocabulary_equals_one_pass(pair, tiny_tokenizer, tmp_path):
    from paser.selection.shards import score_pool_two_pass

    recs = suite_pool(20, seed=6).records
    one = score_shard(*pair, tiny_tokenizer, recs, ScoreConfig(batch_size=6))
    cfg = ScoreConfig(batch_size=6, shard_size=8, two_pass=True, top_k=len(tiny_tokenizer), jsd_chunk=11)
    two = score_pool_two_pass(lambda: pair[0], lambda: pair[1], tiny_tokenizer, recs, cfg, tmp_path)
    np.testing.assert_allclose(two["jsd"], one["jsd"], atol=1e-5)
    for column in ("nll_dense", "nll_pruned", "loss_gap"):  # exact in two-pass mode whatever top_k
        np.testing.assert_allclose(two[column], one[column], atol=1e-5)
    assert not list(tmp_path.glob("topk-*.pt"))  # pass-1 caches are removed once scored


def test_two_pass_top_k_is_a_close_lower_bound(pair, tiny_tokenizer, tmp_path):
    from paser.selection.shards import score_pool_two_pass

    recs = suite_pool(12, seed=7).records
    exact = score_shard(*pair, tiny_tokenizer, recs, ScoreConfig())["jsd"].to_numpy()
    approx = score_pool_two_pass(lambda: pair[0], lambda: pair[1], tiny_tokenizer, recs,
                                 ScoreConfig(two_pass=True, top_k=32), tmp_path)["jsd"].to_numpy()
    # merging tokens into one bucket cannot increase a divergence
    assert np.all(approx <= exact + 1e-6) and np.all(approx > 0)
    gap_one = score_shard(*pair, tiny_tokenizer, recs, ScoreConfig())["loss_gap"].to_numpy()
    gap_two = score_pool_two_pass(lambda: pair[0], lambda: pair[1], tiny_tokenizer, recs,
                                  ScoreConfig(two_pass=True, top_k=4), tmp_path / "k4")["loss_gap"].to_numpy()
    np.testing.assert_allclose(gap_two, gap_one, atol=1e-5)


def test_two_pass_loads_each_model_only_when_needed_and_resumes(pair, tiny_tokenizer, tmp_path):
    from paser.selection.shards import score_pool_two_pass

    recs = suite_pool(20).records
    cfg = ScoreConfig(shard_size=8, two_pass=True, top_k=16)
    loads = []

    def loader(which, model):
        def load():
            loads.append(which)
            return model
        return load

    full = score_pool_two_pass(loader("dense", pair[0]), loader("pruned", pair[1]), tiny_tokenizer, recs, cfg,
                               tmp_path / "a")
    assert loads == ["dense", "pruned"]

    class Killed(Exception):
        pass

    def kill(index, path):
        raise Killed

    with pytest.raises(Killed):
        score_pool_two_pass(loader("dense", pair[0]), loader("pruned", pair[1]), tiny_tokenizer, recs, cfg,
                            tmp_path / "b", on_shard=kill)
    assert len(list((tmp_path / "b").glob("topk-*.pt"))) == 2  # pass 1 finished, one shard scored
    loads.clear()
    resumed = score_pool_two_pass(loader("dense", pair[0]), loader("pruned", pair[1]), tiny_tokenizer, recs,
                                  cfg, tmp_path / "b")
    assert loads == ["pruned"]  # nothing left for the dense model to do
    pd.testing.assert_frame_equal(full, resumed)


def test_batches_group_by_length_not_by_the_users_words(monkeypatch):
    """Past the shared preamble a chat template's next tokens are the user's words: grouping by them
    mixed lengths in a batch; only a few template variants (Alpaca's with and without input) group."""
    import paser.selection.passes as deg

    rng = np.random.default_rng(0)
    preamble = [1, 2, 3, 4]
    chat = [deg.Encoded(preamble + rng.integers(10, 500, size=n).tolist(), 4 + n // 2, n - n // 2, False)
            for n in rng.integers(6, 60, size=40)]
    monkeypatch.setattr(deg, "encode_records", lambda tokenizer, records, config: chat)
    _, batches = deg.shard_batches(None, range(40), ScoreConfig(batch_size=8))
    lengths = [len(chat[i].ids) for batch in batches for i in batch]
    assert lengths == sorted(lengths, reverse=True)  # one length order across the shard
    # two template variants: each batch holds one, longest first inside each
    alpaca = [deg.Encoded(preamble + [7 + (i % 2)] * 9 + list(range(10, 10 + n)), 14, n - 1, False)
              for i, n in enumerate(rng.integers(4, 40, size=30))]
    monkeypatch.setattr(deg, "encode_records", lambda tokenizer, records, config: alpaca)
    _, batches = deg.shard_batches(None, range(30), ScoreConfig(batch_size=8))
    assert all(len({alpaca[i].ids[4] for i in batch}) == 1 for batch in batches)


def test_a_token_budget_fills_batches_of_like_length(monkeypatch):
    import paser.selection.passes as deg

    records = [deg.Encoded(list(range(n)), 2, n - 2, False) for n in (100, 90, 30, 30, 28, 25, 20, 20, 10, 10)]
    monkeypatch.setattr(deg, "encode_records", lambda tokenizer, r, config: records)
    _, batches = deg.shard_batches(None, range(10), ScoreConfig(batch_size=32, batch_tokens=200, share_prefix=False))
    for batch in batches:
        assert len(batch) * max(len(records[i].ids) for i in batch) <= 200 or len(batch) == 1
    assert [len(b) for b in batches] == [2, 6, 2]  # 100+90; six of 30..20 (6 x 30 = 180); the two of 10
    assert sorted(i for b in batches for i in b) == list(range(10))
