"""The dense model's part in recovery: which model is the teacher (distillation) or the reference
(token weighting, adaptive probes), loading it, its top-k cache built by one process under
``torchrun``, and checks that it predicts over the student's vocabulary.

    python -c "from paser.recovery.teacher import rank_zero_first; print(rank_zero_first(1, 'cpu'))"
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from paser.devices import resolve_dtype
from paser.errors import ConfigError
from paser.ledger import flop_params
from paser.models.load import DEFAULT_MODEL, check_same_tokenizer, load_model, model_fingerprint
from paser.progress import announce, bar_enabled
from paser.recovery.config import RecoverConfig
from paser.recovery.distill import TopKCache, cache_fingerprint
from paser.recovery.losses import Example, collate


def resolve_teacher(config: RecoverConfig, data: str) -> str:
    """The teacher of distill and mix: ``config.loss.teacher``, else the dense model of the selection
    run that wrote ``data`` (its models.json, else its manifest)."""
    if config.loss.teacher is not None:
        return config.loss.teacher

    run = Path(data).parent
    if (run / "models.json").is_file():
        return json.loads((run / "models.json").read_text())["dense"]["reference"]
    if (run / "manifest.json").is_file():
        return json.loads((run / "manifest.json").read_text())["settings"]["select"].get("dense") or DEFAULT_MODEL
    why = (f"objective {config.loss.objective!r} learns from a teacher" if config.loss.objective != "sft"
           else "token weighting compares the pruned model with the dense one" if config.loss.token_weighting > 0
           else "responses dense trains on the dense model's own answers")
    raise ConfigError(f"{why}: give the dense model (--teacher, recover.teacher), or train on a selection run's "
                      f"selected.jsonl, whose dense model is the default; {data} is not in a run folder")


def rank_zero_first(world: int, device) -> contextlib.AbstractContextManager:
    """Under torchrun (``world`` processes), the first process runs the block before the others,
    which then find its files (a cache built once, not by every process into one folder)."""
    if world <= 1:
        return contextlib.nullcontext()
    from accelerate import PartialState

    # the process group the Trainer joins next (gloo on CPUs, as training_arguments asks for)
    return PartialState(cpu=not str(device).startswith("cuda")).main_process_first()


def load_dense(reference: str, config: RecoverConfig, trust_pickle: bool, device):
    """The dense model on ``device``, in recovery's weight dtype (``auto`` resolved for the device):
    the teacher, token weighting's reference, the adaptive rounds' probe, the dense answers."""
    return load_model(reference, dtype=resolve_dtype(config.dtype, device), trust_pickle=trust_pickle, device=device)


def load_teacher(reference: str, tokenizer, student: str, examples: list[Example], pad_id: int, device,
             config: RecoverConfig, out: Path, trust_pickle: bool, world: int = 1):
    """(the teacher in memory, None, its parameter counts), or with ``teacher_top_k`` (None, its
    finished top-k cache, its counts): the teacher then runs alone, once per training record (in the
    first of ``world`` processes), and is released."""
    loaded = load_dense(reference, config, trust_pickle, device)
    check_same_tokenizer(loaded.tokenizer, tokenizer, str(reference), str(student))
    teacher = loaded.model.requires_grad_(False)
    params = flop_params(teacher)
    if config.loss.teacher_top_k is None:
        return teacher, None, params
    cache = TopKCache(out / "teacher_topk", cache_fingerprint(model_fingerprint(reference), config.loss.teacher_top_k,
                                                              config.loss.temperature, examples))
    from tqdm.auto import tqdm

    with rank_zero_first(world, device):
        if cache.missing(len(examples)):
            announce(f"running the teacher {reference} alone over {len(examples)} records for its "
                     f"top-{config.loss.teacher_top_k} cache in {cache.folder}")
            with tqdm(total=len(examples), desc="teacher top-k", unit="rec",
                      disable=not bar_enabled(config.progress)) as bar:
                cache.build(teacher, examples, collate, pad_id, device, config.loss.teacher_top_k,
                            config.loss.temperature, config.steps.micro_batch_size, bar.update)
    cache.vocab_size = output_vocab_size(teacher)
    del teacher, loaded
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    cache.load(len(examples))
    return None, cache, params


def output_vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head.weight.shape[0] if head is not None else int(model.config.vocab_size)


def check_vocab(teacher, student, teacher_ref: str, student_ref: str) -> None:
    """The teacher's and the student's next-token distributions must range over the same ids."""
    size = teacher.vocab_size if isinstance(teacher, TopKCache) else output_vocab_size(teacher)
    if size != output_vocab_size(student):
        raise ConfigError(f"the teacher {teacher_ref} predicts over {size} token ids and the student {student_ref} "
                          f"over {output_vocab_size(student)}; distillation needs the same vocabulary")
