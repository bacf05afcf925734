"""What recovery trains on and how a batch's loss is taken, shared with evaluation: each record's
prompt + response ids with the prompt masked, right-padded batches, the NLL of the labelled tokens
(the vocabulary head at those positions only), the objectives (SFT, token-weighted SFT,
distillation, mix) and validation sums.

    python -c "from paser.recovery.losses import IGNORE; print(IGNORE)"
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from paser.data.prompts import PromptFormat, tokenize_examples
from paser.errors import DataError
from paser.recovery.config import LossSettings
from paser.recovery.distill import divergence
from paser.selection.passes import body_and_head

IGNORE = -100


@dataclass
class Example:
    """One tokenised record: ids and labels (-100 on the prompt)."""

    ids: list[int]
    labels: list[int]


def encode_for_training(tokenizer, records, prompt: PromptFormat) -> list[Example]:
    """Prompt + response ids with the prompt masked; records with no response token left are refused."""
    out = []
    records = list(records)
    for r, (ids, n_prompt, n_response, _) in zip(records, tokenize_examples(tokenizer, records, prompt.template,
                                                                              prompt.cutoff)):
        if n_response == 0:
            raise DataError(f"record {r.id!r}: its prompt fills the {prompt.cutoff}-token cutoff, so no "
                            "response token is left to train on; raise cutoff or drop the record")
        out.append(Example(ids, [IGNORE] * n_prompt + ids[n_prompt:]))
    return out


def scored_tokens(example: Example) -> int:
    """Tokens of ``example`` the loss is taken on (labelled targets after the one-token shift)."""
    return sum(1 for t in example.labels[1:] if t != IGNORE)


def collate(batch: list[Example], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 on padding and prompts)."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
        mask[i, :len(e.ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def labelled_logits(model, batch: dict[str, torch.Tensor]):
    """(logits at the positions that predict a labelled token [M, V], the NLL of each of those
    tokens [M], per-row NLL sums [B], per-row counts [B]), positions in row-major order. Only the
    labelled positions go through the vocabulary projection and to fp32."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    body, head = body_and_head(model)
    # no KV cache: nothing reads it, and at 7B it costs GBs per batch
    if body is not None:  # the vocabulary projection on the labelled positions only (a quarter of a 135M's work)
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False).last_hidden_state  # [B, T, H]
        kept = head(hidden[:, :-1][keep])  # [M, V]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        kept = logits[:, :-1][keep]
    nll = torch.nn.functional.cross_entropy(kept.float(), targets[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(len(keep), dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return kept, nll, sums, keep.sum(1)


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the batch: the summed next-token cross-entropy over its labelled (response)
    tokens, and their count."""
    _, _, sums, counts = labelled_logits(model, batch)
    return sums, counts


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled (response) tokens, and their count."""
    sums, counts = token_losses(model, batch)
    return sums.sum(), int(counts.sum())


def objective_loss_sum(model, batch: dict[str, torch.Tensor], config: LossSettings,
                       targets=None) -> tuple[torch.Tensor, float, float | None]:
    """(the summed training loss of ``config.objective`` over the labelled tokens, to divide by
    the step's token count; its summed NLL; its summed divergence from the teacher's ``targets``,
    None for sft). With ``batch["weights"]`` (one per labelled token, row-major: token weighting)
    the SFT loss is the weighted sum of the tokens' NLL."""
    if config.objective == "sft":
        if "weights" not in batch:
            loss, _ = token_loss_sum(model, batch)
            return loss, float(loss.detach()), None
        _, nll, _, _ = labelled_logits(model, batch)
        loss = (nll * batch["weights"].to(nll.device, nll.dtype)).sum()
        return loss, float(nll.detach().sum()), None
    kept, _, sums, _ = labelled_logits(model, batch)
    nll = sums.sum()
    div = divergence(targets, kept, config.divergence, config.temperature).sum()
    loss = div if config.objective == "distill" else config.mix_weight * nll + (1 - config.mix_weight) * div
    return loss, float(nll.detach()), float(div.detach())


def validation_rows(model, examples: list[Example], pad_id: int, device, batch_size: int):
    """Per example: the summed response-token NLL and the number of those tokens (numpy arrays):
    the teacher-forced pass of validation and of evaluation's response NLL."""
    sums, counts = np.zeros(len(examples)), np.zeros(len(examples), dtype=np.int64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(examples), batch_size):
            row_sums, row_counts = token_losses(model, collate(examples[lo:lo + batch_size], pad_id, device))
            sums[lo:lo + batch_size] = row_sums.double().cpu().numpy()
            counts[lo:lo + batch_size] = row_counts.cpu().numpy()
    model.train(was_training)
    return sums, counts


def validation_sums(model, examples: list[Example], pad_id: int, device, batch_size: int) -> tuple[float, int]:
    """Summed response-token NLL over ``examples`` and the number of those tokens."""
    sums, counts = validation_rows(model, examples, pad_id, device, batch_size)
    return float(sums.sum()), int(counts.sum())
