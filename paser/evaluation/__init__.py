"""Evaluation of a base, adapted or merged model: perplexity, response NLL, suite accuracy, lm-eval.

- Perplexity on a plain-text file, two labelled protocols: LLM-Pruner's (the text tokenised as one
  stream, cut into non-overlapping 128-token windows, no BOS inside windows) and a long-window one
  (the same with windows of ``long_window`` tokens, default the model's context up to 2,048).
  Perplexity is exp of the mean next-token NLL over every predicted token of every full window.
- Response NLL on held-out instruction records: mean NLL over response tokens under teacher
  forcing, with the prompt template of scoring and recovery (the recovery validation loss).
- Per family of paser's capability suite, with a seed other than the default pool's and every
  record whose prompt (instruction + input) also occurs in the pool selected from removed: the
  answer NLL (teacher forcing, the expected answer + eos as the response, mean over its tokens,
  then over the family's records; macro average over families), which moves long before an
  answer comes out right, and accuracy: greedy decoding, answer and prediction normalised (case,
  whitespace, surrounding quotes and punctuation), a record counts when the expected answer occurs
  in the answer as a whole word or number ("answer found": instruct models answer in sentences).
  Whole-answer exact match is reported beside it. Given the dense and pruned models' evaluations,
  the share of each family's dense-vs-pruned answer-NLL gap that the model closed.
- lm-evaluation-harness tasks through ``paser.evaluation.harness`` (accuracy and normalised accuracy).

    python -c "from paser.evaluation import EvalConfig; print(EvalConfig())"
"""

from paser.lazy import lazy_names

_HOMES = {
    "EvalConfig": "paser.evaluation.config",
    "evaluate": "paser.evaluation.entry",
}
__all__ = sorted(_HOMES)
__getattr__, __dir__ = lazy_names(__name__, _HOMES)
