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

    python -c "from paser.selection.degradation import jsd_from_logits; import torch; \
print(jsd_from_logits(torch.randn(3, 10), torch.randn(3, 10)))"
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from paser.data.prompts import PromptFormat, iter_examples, tokenize_examples

LN2 = math.log(2.0)


SCORE_COLUMNS = ["id", "jsd", "nll_dense", "nll_pruned", "loss_gap", "n_prompt", "n_response", "n_scored",
                 "truncated"]


SHARD_FORMAT = 2  # 2: shards also hold nll_dense, nll_pruned and loss_gap


# settings that choose among the scores, not how they are computed (per_cluster chooses which records
# are scored: the fingerprint has their ids)
SCORE_INDEPENDENT = ("signal", "per_cluster")


LATER_OPTIONS = ("batch_tokens",)  # in a fingerprint only when set (earlier shards stay valid)


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


def encode_records(tokenizer, records, prompt: PromptFormat) -> list[Encoded]:
    return [Encoded(*e) for e in tokenize_examples(tokenizer, list(records), prompt.template, prompt.cutoff)]


def token_table(tokenizer, records, prompt: PromptFormat) -> pd.DataFrame:
    """Each record's prompt and response tokens under the template and cutoff (what recovery trains
    on), without any model: id, n_prompt, n_response, n_tokens, truncated. Only the counts are kept
    (a pool of millions would otherwise hold every record's ids at once)."""
    records = list(records)
    each = iter_examples(tokenizer, records, prompt.template, prompt.cutoff)
    counts = np.fromiter(((p, r, t) for _, p, r, t in each), dtype=np.dtype((np.int64, 3)),
                         count=len(records)).reshape(-1, 3)
    n_prompt, n_response = counts[:, 0], counts[:, 1]
    return pd.DataFrame({"id": [r.id for r in records], "n_prompt": n_prompt, "n_response": n_response,
                         "n_tokens": n_prompt + n_response, "truncated": counts[:, 2].astype(bool)})
