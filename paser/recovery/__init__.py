"""Recovery: LoRA fine-tuning of the pruned model on the selected records (peft).

Defaults follow LLM-Pruner's recipe: rank 8, alpha 16, dropout 0.05 on q/k/v/o/gate/up/down,
learning rate 1e-4, 2 epochs, cutoff 256, effective batch 64 in micro-batches of 4, and the same
prompt template as degradation scoring with the prompt tokens masked out of the loss. The loss of
an optimizer step is the mean over every response token of its effective batch (token-weighted, so
gradient accumulation, and data parallelism over processes, give the same step as one large
batch). paser plans the steps; Hugging Face's Trainer runs them (``paser.recovery.trainer``): clipping,
bf16 autocast on GPUs, gradient checkpointing, checkpoints, ``torchrun``. A checkpoint is written
every ``save_every`` steps; a killed run started again with the same settings continues from the
last complete one and ends with the same adapter as an uninterrupted one.

Output folder:
  adapter/              the LoRA adapter (peft ``save_pretrained``)
  merged/               with ``merge``: the merged model (paser-pruned folder, or a Hugging Face folder)
  checkpoints/          the Trainer's latest checkpoints (adapter, optimizer, scheduler, RNG, step) with
                        paser's state (settings fingerprint, log, best adapter)
  train_log.jsonl       one line per step: loss, learning rate, and the validation loss when measured
  training_curve.png    training and validation loss
  recovery.json         settings, data, model, steps, losses, wall time

    python -c "from paser.recovery import RecoverConfig; print(RecoverConfig())"
"""

from paser.lazy import lazy_names

_HOMES = {
    "RecoverConfig": "paser.recovery.config",
    "recover": "paser.recovery.entry",
    "RecoveryResult": "paser.recovery.job",
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_names(__name__, _HOMES)
