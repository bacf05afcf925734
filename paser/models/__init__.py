"""Phase 1, models: model references to loaded models (built-in names, Hugging Face folders, GGUF,
LLM-Pruner checkpoints through a restricted unpickler, paser's pruned folders), per-layer widths,
and ``paser prune``. Below selection: imports data and what every phase uses."""
