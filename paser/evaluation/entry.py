"""``evaluate``: every evaluation a config asks for, on a base, adapted or merged model, written to
eval.json and eval.md.

    python -c "from paser.evaluation.entry import EvalConfig; print(EvalConfig())"
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

from paser.cache import files_fingerprint
from paser.config import config_with
from paser.data.pools import load_pool
from paser.devices import default_device, resolve_dtype
from paser.errors import DataError, ModelLoadError
from paser.evaluation.config import EvalConfig
from paser.evaluation.harness import lm_eval_scores, paper_mean, prepare_tasks, zero_shot_gap_closed
from paser.evaluation.metrics import input_tokens, load_for_eval, nll_summary, perplexity, token_stats
from paser.evaluation.report import evaluation_ledger, markdown_table
from paser.evaluation.suite import jsd_summary, read_reference, suite_accuracy, suite_gap_closed
from paser.ledger import flop_params
from paser.models.load import check_same_tokenizer, load_model, model_fingerprint
from paser.progress import announce


def evaluate(model: str, adapter: str | None = None, out: str | Path | None = None, config: EvalConfig | None = None,
             *, trust_pickle: bool = False, **overrides) -> dict:
    """Every evaluation ``config`` asks for, on ``model`` (+ ``adapter``); writes eval.json and
    eval.md into ``out`` when given and returns the same dictionary."""
    config = config_with(config or EvalConfig(), overrides)
    text = None
    if config.text is not None:
        try:
            text = Path(config.text).read_text(encoding="utf-8")
        except OSError as err:
            raise DataError(f"{config.text}: cannot read the perplexity text: {err.strerror}") from None
        except UnicodeDecodeError as err:
            raise DataError(f"{config.text}: not UTF-8 text (byte {err.start})") from None
    heldout = load_pool(config.heldout).records if config.heldout is not None else None
    references = None
    if config.reference_dense is not None:
        references = (read_reference(config.reference_dense), read_reference(config.reference_pruned))
    for source in config.suite_exclude if config.suite_size else []:
        if source != "embedded" and not Path(source).exists():
            raise DataError(f"{source}: no such pool to remove from the evaluation suite (suite_exclude)")
    harness_tasks = scratch = None
    if config.lm_eval_tasks:
        # the generated task YAMLs go to the output folder, else to a folder removed afterwards
        scratch = None if out is not None else tempfile.TemporaryDirectory(prefix="paser-lm-eval-")
        folder = Path(out) if out is not None else Path(scratch.name)
        harness_tasks = prepare_tasks(config.lm_eval_tasks, folder / "lm_eval_tasks")
        names = [t.config.task if hasattr(t, "config") else str(t) for t in harness_tasks.tasks]
        for ref, name in zip(references or (), (config.reference_dense, config.reference_pruned)):
            missing = [t for t in names if t not in (ref.get("lm_eval") or {})]
            if ref.get("lm_eval") and missing:  # said before the model runs, not after
                raise DataError(f"{name}: its evaluation has no lm-eval results for {', '.join(missing)}; evaluate "
                                "the reference with the same lm_eval_tasks")
    device = config.device or default_device()
    config = dataclasses.replace(config, dtype=resolve_dtype(config.dtype, device))
    announce(f"evaluating {model}" + (f" + {adapter}" if adapter else "") + f" on {device} ({config.dtype})")
    net, tokenizer, described = load_for_eval(model, adapter, config.dtype, device, trust_pickle)
    reference = None
    if config.divergence_from is not None and (heldout is not None or config.suite_size):
        reference = load_model(config.divergence_from, dtype=config.dtype, trust_pickle=trust_pickle, device=device)
        check_same_tokenizer(reference.tokenizer, tokenizer, config.divergence_from, "the evaluated model")
    result: dict = {"model": str(model), "adapter": adapter, "description": described, "settings": vars(config)}
    if config.divergence_from is not None:
        result["jsd_to_reference"] = {"reference": config.divergence_from}
    start = time.perf_counter()
    if text is not None:
        context = getattr(net.config, "max_position_embeddings", 2048) or 2048
        long_window = config.long_window or min(2048, context)
        result["perplexity"] = {
            f"llm-pruner ({config.window}-token windows)": perplexity(net, tokenizer, text, config.window,
                                                                      config.batch_size),
            f"long ({long_window}-token windows)": perplexity(net, tokenizer, text, long_window, 1),
        }
    # with a reference model, each NLL pass also gives the JSD to it (one pass of the evaluated model)
    ref_model = reference.model if reference is not None else None
    if heldout is not None:
        prompt = config.prompt
        sums, counts, jsd = token_stats(net, tokenizer, heldout, prompt.template, prompt.cutoff, config.batch_size,
                                        ref_model)
        result["response_nll"] = nll_summary(heldout, sums, counts)
        result["response_nll"]["compute"] = {"tokens": input_tokens(tokenizer, heldout, prompt.template, prompt.cutoff),
                                             "positions": int(counts.sum())}
        if jsd is not None:
            result["jsd_to_reference"]["heldout"] = jsd_summary(heldout, jsd)
    if config.suite_size:
        result["suite"] = suite_accuracy(net, tokenizer, config.suite_size, config.suite_seed, config.prompt.template,
                                         config.max_new_tokens, config.batch_size, config.suite_exclude,
                                         config.prompt.cutoff, config.suite_accuracy_per_family, ref_model)
        if "jsd" in result["suite"]:
            result["jsd_to_reference"]["suite"] = result["suite"].pop("jsd")
        if references is not None:
            result["suite"]["answer_nll_gap_closed"] = suite_gap_closed(
                result["suite"], references[0].get("suite"), references[1].get("suite"),
                (config.reference_dense, config.reference_pruned))
    journal = None
    if harness_tasks is not None:
        journal = _journal(out, model, adapter, config, device)
        scored = lm_eval_scores(net, tokenizer, harness_tasks, batch_size=config.batch_size,
                                limit=config.lm_eval_limit, num_fewshot=config.lm_eval_fewshot,
                                sample=config.lm_eval_sample, seed=config.lm_eval_seed, backend=config.lm_eval_backend,
                                whole=config.lm_eval_whole, journal=journal)
        result["lm_eval"] = scored["tasks"]
        result["lm_eval_compute"] = scored["compute"]
        if (mean := paper_mean(scored["tasks"])) is not None:
            result["paper_mean"] = mean
        if references is not None and all(ref.get("lm_eval") for ref in references):
            result["lm_eval_gap_closed"] = zero_shot_gap_closed(scored["tasks"], references[0], references[1],
                                                                (config.reference_dense, config.reference_pruned))
        if scratch is not None:
            scratch.cleanup()

    result["compute"] = evaluation_ledger(result, flop_params(net), flop_params(ref_model) if ref_model is not None
                                          else None, str(model), config.divergence_from).to_dict()
    del reference, ref_model
    result["seconds"] = round(time.perf_counter() - start, 2)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result, indent=2, default=str))
        (out / "eval.md").write_text(markdown_table(result))
    if journal is not None:  # its answers are in eval.json now
        journal.path.unlink(missing_ok=True)
    return result


def _journal(out, model: str, adapter: str | None, config: EvalConfig, device: str):
    """The lm-eval request journal of an evaluation written to ``out``: paser's scorer, a model
    whose files paser can identify; else None (the run does not resume inside a task)."""
    from paser.evaluation.packed_lm import RequestJournal  # lm-eval is an optional extra

    if out is None or config.lm_eval_backend != "paser":
        return None
    try:
        model_files = model_fingerprint(model)
    except ModelLoadError:
        return None
    identity = {"model": str(model), "model_files": model_files, "adapter": adapter,
                "adapter_files": files_fingerprint(adapter) if adapter else None, "dtype": config.dtype,
                "device": str(device)}
    return RequestJournal(Path(out) / "lm_eval_journal.jsonl", identity)
