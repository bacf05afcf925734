"""What evaluation measures on a model: perplexity over fixed windows, the response NLL of
instruction records under teacher forcing (and the mean token JSD to a reference model from the
same pass), and answer matching after normalisation (the greedy answers: paser.models.generate).

    python -c "from paser.evaluation.metrics import normalise_answer; print(normalise_answer(' Paris. '))"
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from paser.data.prompts import PromptFormat
from paser.devices import device_of
from paser.errors import DataError
from paser.models.load import load_model
from paser.recovery.lora import peft_quietly
from paser.selection.configs import ScoreConfig


def load_for_eval(model: str, adapter: str | None = None, dtype: str = "float32", device: str | None = None,
                  trust_pickle: bool = False):
    """(model, tokenizer, description): a base model, or a base model with a LoRA adapter folder."""
    loaded = load_model(model, dtype=dtype, trust_pickle=trust_pickle, device=device)
    net, described = loaded.model, loaded.describe()
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise DataError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
        with peft_quietly():
            net = PeftModel.from_pretrained(net, adapter)
        described += f" + LoRA adapter {adapter}"
    net.eval()
    return net, loaded.tokenizer, described


def perplexity(model, tokenizer, text: str, window: int, batch_size: int = 8) -> dict:
    """exp(mean next-token NLL) over the non-overlapping ``window``-token windows of ``text``."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=True)["input_ids"])
    n_windows = len(ids) // window
    if n_windows == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than one {window}-token window")
    windows = ids[:n_windows * window].view(n_windows, window)
    total, count = 0.0, 0
    with torch.no_grad():
        for lo in range(0, n_windows, batch_size):
            batch = windows[lo:lo + batch_size].to(device_of(model))
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                    reduction="sum")
            total, count = total + float(nll), count + batch[:, 1:].numel()
    mean = total / count
    return {"window": window, "windows": n_windows, "tokens": count, "nll": mean, "ppl": math.exp(mean)}


def response_token_nll(model, tokenizer, records, template: str = "alpaca", cutoff: int = 256,
                       batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per record: the summed NLL of its response tokens (+ eos) under teacher forcing with the
    prompt masked, and how many there are (the recovery loss, record by record)."""
    from paser.recovery.losses import encode_for_training, validation_rows

    examples = encode_for_training(tokenizer, records, PromptFormat(template, cutoff))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return validation_rows(model, examples, pad, device_of(model), batch_size)


def token_stats(model, tokenizer, records, template: str = "alpaca", cutoff: int = 256, batch_size: int = 8,
                reference=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per record: the summed response NLL, its token count and, given a ``reference`` model, the
    mean token JSD between the two models' next-token distributions on the response, all from one
    forward pass of ``model`` (degradation scoring's pass, with ``reference`` as the dense side)."""
    if reference is None:
        return *response_token_nll(model, tokenizer, records, template, cutoff, batch_size), None
    from paser.selection.passes import score_shard

    config = ScoreConfig(prompt=PromptFormat(template, cutoff), batch_size=batch_size, share_prefix=False)
    table = score_shard(reference, model, tokenizer, records, config)
    empty = table.index[table["n_scored"] == 0]
    if len(empty):
        raise DataError(f"record {table['id'][empty[0]]!r}: its prompt fills the {cutoff}-token cutoff, so no "
                        "response token is left to evaluate; raise cutoff or drop the record")
    counts = table["n_scored"].to_numpy(dtype=np.int64)
    return table["nll_pruned"].to_numpy() * counts, counts, table["jsd"].to_numpy()


def input_tokens(tokenizer, records, template: str = "alpaca", cutoff: int = 256) -> int:
    """Prompt + response tokens of ``records`` under the template and cutoff: what a teacher-forced
    pass over them reads (the compute ledger's)."""
    from paser.selection.degradation import token_table

    return int(token_table(tokenizer, records, PromptFormat(template, cutoff))["n_tokens"].sum())


def response_nll(model, tokenizer, records, template: str = "alpaca", cutoff: int = 256, batch_size: int = 8) -> dict:
    """Mean NLL over the response tokens of ``records`` (teacher forcing, prompt masked)."""
    return nll_summary(records, *response_token_nll(model, tokenizer, records, template, cutoff, batch_size))


def nll_summary(records, sums: np.ndarray, counts: np.ndarray) -> dict:
    mean = float(sums.sum() / max(int(counts.sum()), 1))
    return {"records": len(records), "tokens": int(counts.sum()), "nll": mean, "ppl": math.exp(mean),
            "per_record": {"id": [r.id for r in records], "nll_sum": sums.tolist(), "tokens": counts.tolist()}}


_EDGES = " \t\n\"'`.,;:!?"


def normalise_answer(text: str) -> str:
    """Lower case, whitespace collapsed (and removed around brackets, commas and colons),
    surrounding quotes and punctuation removed."""
    text = re.sub(r"\s+", " ", text.lower())
    return re.sub(r" ?([{}\[\](),:]) ?", r"\1", text).strip(_EDGES)


def answer_found(expected: str, answer: str) -> bool:
    """The normalised expected answer occurs in the normalised answer, not inside a longer word
    or number ("vienna" in "the capital of austria is vienna"; "15" not in "155")."""
    want = normalise_answer(expected)
    if not want:
        return False
    # word boundaries only where the answer itself starts or ends with a letter or digit
    before = "(?<![a-z0-9])" if want[0].isalnum() else ""
    after = "(?![a-z0-9])" if want[-1].isalnum() else ""
    return re.search(before + re.escape(want) + after, normalise_answer(answer)) is not None
