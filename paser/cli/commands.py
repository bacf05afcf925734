"""The commands: which config fields each offers (its option table), and what it does with them.
Every option's help is its field's docstring; the options that are not settings (a model, ``--out``,
``--config``, ``--flow``) are declared here once.

    paser select | prune | recover | evaluate | compare | run  (paser COMMAND --help)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from paser.api import compare as run_compare
from paser.api import evaluate as run_evaluate
from paser.api import prune as run_prune
from paser.api import recover as run_recover
from paser.api import run as run_all
from paser.api import select as run_select
from paser.cli.app import app, dispatch, fail
from paser.cli.options import REQUIRED, Opt, command, config_option, flow_option, plain, trust_option
from paser.comparison.config import CompareConfig
from paser.data.pools import parse_fields
from paser.data.prompts import PromptFormat
from paser.errors import PaserError
from paser.evaluation.config import EvalConfig
from paser.models.config import PruneConfig
from paser.recovery.config import RecoverConfig
from paser.selection.budget import parse_budget
from paser.selection.configs import STAGE_CONFIGS


def layer_range(text: str) -> tuple[int, int]:
    try:
        start, end = (int(v) for v in text.split(":"))
    except ValueError:
        raise typer.BadParameter(f"expected START:END (e.g. 4:28), got {text!r}") from None
    return start, end


def dedup_value(text: str) -> float | str:
    """``--dedup``: a cosine similarity, or off."""
    if text.strip().lower() in ("off", "none", "null"):
        return "off"
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"expected a cosine similarity in (0, 1] or off, got {text!r}") from None


def fields_map(text: str) -> dict:
    try:
        return parse_fields(text)
    except PaserError as err:
        raise fail(err) from None


# ---------------------------------------------------------------- select

SELECT = [Opt("select", name) for name in ("data", "dense", "pruned", "prune_ratio")] + [
    Opt("select", "budget", convert=lambda text: parse_budget(text).setting), Opt("select", "out"),
    Opt("select", "layout"), Opt("select", "split"),
    Opt("select", "field_map", "--fields", fields_map, str), Opt("select", "strict", "--strict/--lenient"),
    Opt("select", "suite_size"), Opt("score", "dtype"), Opt("score", "batch_size"), Opt("prompt", "template"),
    Opt("prompt", "cutoff"), Opt("cluster", "n_clusters", "--clusters"), Opt("cluster", "method", "--cluster-method"),
    Opt("manifold", "method", "--manifold"), Opt("embed", "precomputed", "--embeddings"),
    Opt("concepts", "max_concepts"),
    Opt("concepts", "enabled", "--concepts/--no-concepts"), Opt("allocate", "method", "--allocation"),
    Opt("score", "signal"), Opt("select", "seed"), Opt("select", "method"), Opt("sample", "cds_temperature"),
    Opt("sample", "ies_temperature"), Opt("sample", "dedup", convert=dedup_value, kind=str),
    Opt("score", "per_cluster"),
    Opt("select", "trust_pickle", "--trust-pickle/--no-trust-pickle"), Opt("distribute", "engine"),
    Opt("distribute", "address"), Opt("distribute", "workers"),
]


@command(app, "select", SELECT, {"prompt": PromptFormat, **STAGE_CONFIGS},
         after=[config_option("sections prompt, select, embed, manifold, cluster, score, allocate, sample, adaptive, "
                              "concepts, prune, distribute"), flow_option()])
def select(values: dict, config: Path | None, flow: bool) -> None:
    """Select the instruction samples that best repair the pruned model (PASER)."""
    result = dispatch(lambda: run_select(config, flow=flow, **values))
    run = result.out
    summary = json.loads((run / "clusters.json").read_text())
    timings = json.loads((run / "timings.json").read_text())
    source = f"from {summary['K']} clusters" if "K" in summary else f"({summary['method']} baseline)"
    typer.echo(f"selected {summary['selected']} records, {summary['selected_tokens']} tokens "
               f"({summary['selected_response_tokens']} response tokens) {source}; budget {summary['budget']} "
               f"{summary['budget_unit']}")
    typer.echo("stage seconds: " + ", ".join(f"{k} {v['seconds']:.1f}{' (reused)' if v['reused'] else ''}"
                                             for k, v in timings.items()))
    typer.echo(_ledger_line(result.compute))
    typer.echo(f"run folder: {run} (selected.jsonl, scores.parquet, clusters.json, manifest.json, report.md)")


def _ledger_line(compute: dict) -> str:
    from paser.ledger import Ledger

    return Ledger.from_dict(compute).line()


# ---------------------------------------------------------------- prune

PRUNE = [Opt("prune", "ratio"), Opt("prune", "attn_ratio"), Opt("prune", "mlp_ratio"),
         Opt("prune", "attn_layers", convert=layer_range, kind=str),
         Opt("prune", "mlp_layers", convert=layer_range, kind=str), Opt("prune", "importance"), Opt("prune", "gqa"),
         Opt("prune", "calibration"), Opt("prune", "num_calibration"), Opt("prune", "round_to"), Opt("prune", "seed")]
MODEL_HELP = "a built-in name, Hugging Face folder, .gguf file or LLM-Pruner checkpoint"


@command(app, "prune", PRUNE, {"prune": PruneConfig},
         before=[plain("model", str, typer.Argument(help=f"Model to prune: {MODEL_HELP}."), "smollm2-135m-instruct"),
                 plain("out", Path, typer.Option(help="Folder to write the pruned model to."), Path("runs/pruned"))],
         after=[config_option("a 'prune' section"),
                plain("export_pickle", Path | None, typer.Option(help="Also write LLM-Pruner's pickle layout to this "
                                                                      "file.")),
                trust_option(),
                plain("dtype", str, typer.Option(help="Weights dtype while pruning and saving."), "float32"),
                plain("device", str | None, typer.Option(help="Device of the calibration passes and pruning: cpu "
                                                              "(default), cuda or cuda:K.")),
                flow_option()])
def prune(values: dict, model: str, out: Path, config: Path | None, export_pickle: Path | None, trust_pickle: bool,
          dtype: str, device: str | None, flow: bool) -> None:
    """Prune attention heads and MLP channels, LLM-Pruner block-wise style, and save the model."""
    typer.echo(f"pruning {model} ...", err=True)
    result = dispatch(lambda: run_prune(config, flow=flow, model=model, out=out, export_pickle=export_pickle,
                                        trust_pickle=trust_pickle, dtype=dtype, device=device, prune=values["prune"]))
    before, after = result.shapes_before, result.shapes_after
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    typer.echo(f"parameters before: {result.params_before:,}")
    typer.echo(f"parameters after:  {result.params_after:,} ({100 * result.kept_fraction:.1f}% kept)")
    if changed:
        a, b = before[changed[0]], after[changed[0]]
        typer.echo(f"layers pruned: {len(changed)} of {len(before)} (e.g. layer {changed[0]}: heads "
                   f"{a.num_heads}/{a.num_kv_heads} -> {b.num_heads}/{b.num_kv_heads}, MLP "
                   f"{a.intermediate_size} -> {b.intermediate_size})")
    typer.echo(f"time: {result.seconds:.1f} s (pruning, without loading and saving)")
    typer.echo(f"saved: {result.out}")
    if "pickle" in result.extras:
        typer.echo(f"LLM-Pruner pickle: {result.extras['pickle']}")


# ---------------------------------------------------------------- recover

RECOVER = [Opt("recover", name) for name in (
    "epochs", "max_steps", "learning_rate", "batch_size", "micro_batch_size", "batch_tokens", "micro_batch_tokens",
    "token_weighting", "token_signal")] + [Opt("recover", "r", "--lora-r"), Opt("recover", "alpha", "--lora-alpha")] + [
    Opt("prompt", name) for name in ("template", "cutoff")] + [
    Opt("recover", name) for name in ("val_size", "patience", "dtype")] + [
    Opt("recover", "merge", "--merge/--no-merge"), Opt("recover", "seed")] + [
    Opt("recover", name) for name in ("objective", "teacher", "divergence", "temperature", "mix_weight",
                                      "teacher_top_k", "max_grad_norm", "responses", "answer_tokens")] + [
    Opt("recover", "gradient_checkpointing", "--gradient-checkpointing/--no-gradient-checkpointing")]


@command(app, "recover", RECOVER, {"recover": RecoverConfig, "prompt": PromptFormat},
         before=[plain("model", str, typer.Argument(help=f"The pruned model: a paser-pruned folder, {MODEL_HELP}."),
                       REQUIRED),
                 plain("data", str, typer.Option(help="Training records: a run's selected.jsonl (an adaptive "
                                                      "selection's recovers in rounds) or any instruction file."),
                       REQUIRED),
                 plain("out", Path, typer.Option(help="Output folder (adapter/, merged/, checkpoints/, logs)."),
                       Path("runs/recover"))],
         after=[config_option("a 'recover' section"),
                plain("val_data", str | None, typer.Option(help="Validation records (default: --val-size of --data "
                                                               "is held out).")),
                plain("restart", bool, typer.Option(help="Discard a checkpoint in --out instead of resuming."), False),
                trust_option(), flow_option()])
def recover(values: dict, model: str, data: str, out: Path, config: Path | None, val_data: str | None,
            restart: bool, trust_pickle: bool, flow: bool) -> None:
    """LoRA-recover a pruned model on selected records (LLM-Pruner's recipe by default). On several
    GPUs (or CPU processes), each process running the command: torchrun --nproc-per-node N --no-python
    paser recover ..."""
    dispatch(lambda: run_recover(config, flow=flow, model=model, data=data, out=out, val_data=val_data,
                                 trust_pickle=trust_pickle, restart=restart, **values))
    if int(os.environ.get("RANK", "0")):  # one of several processes: the first one reports
        return
    _recovery_lines(json.loads((out / "recovery.json").read_text()), out)


def _recovery_lines(done: dict, out: Path) -> None:
    if done["resumed_from_step"]:
        typer.echo(f"resumed from step {done['resumed_from_step']}")
    val = f", validation loss {done['val_loss']:.4f}" if done["val_loss"] is not None else ""
    step = (f"about {done['settings']['batch_tokens']} tokens" if done["batch_unit"] == "tokens"
            else f"{done['settings']['batch_size']} records")
    kind = done["objective"]
    if isinstance(kind, dict):
        kind = (f"{kind['objective']} from {kind['teacher']} ({kind['divergence']}, temperature "
                f"{kind['temperature']}, teacher {kind['teacher_targets']})")
    if done.get("token_weighting"):
        weighting = done["token_weighting"]
        kind += f", token-weighted by {weighting['signal']} (lambda {weighting['strength']})"
    if done.get("dense_answers"):
        answers = done["dense_answers"]
        kind += (f" on {answers['model']}'s own answers ({answers['generated_now']} generated now, the rest cached; "
                 f"{answers['kept_file_response']} kept the file's response)")
    typer.echo(f"{done['steps']} steps (batches of {step}; {done['tokens_per_step']['mean']:.0f} tokens per step "
               f"on average) in {done['seconds']:.1f} s: {kind} loss {done['first_loss']:.4f} -> "
               f"{done['last_loss']:.4f}{val}")
    if done.get("adaptive"):
        rounds = done["adaptive"]["rounds"]
        typer.echo(f"adaptive: {len(rounds)} rounds of " + ", ".join(f"{r['records']}" for r in rounds)
                   + " records; shares of the last round " + " ".join(f"{x:.2f}" for x in rounds[-1]["shares"]))
    typer.echo(_ledger_line(done["compute"]))
    typer.echo(f"adapter: {out / 'adapter'}")


# ---------------------------------------------------------------- evaluate

EVALUATE = [Opt("evaluate", name) for name in ("text", "heldout", "suite_size", "suite_exclude", "reference_dense",
                                               "reference_pruned", "divergence_from", "suite_accuracy_per_family",
                                               "window", "long_window", "batch_size", "dtype")] + [
    Opt("evaluate", "lm_eval_tasks", "--lm-eval-task"), Opt("evaluate", "lm_eval_limit"),
    Opt("evaluate", "lm_eval_sample"), Opt("evaluate", "lm_eval_whole"), Opt("evaluate", "lm_eval_seed"),
    Opt("evaluate", "lm_eval_backend"), Opt("prompt", "template"), Opt("prompt", "cutoff")]


@command(app, "evaluate", EVALUATE, {"evaluate": EvalConfig, "prompt": PromptFormat},
         before=[plain("model", str, typer.Argument(help="Model reference (base, pruned, or merged)."), REQUIRED),
                 plain("adapter", str | None, typer.Option(help="A LoRA adapter folder to apply (paser recover's "
                                                               "adapter/).")),
                 plain("out", Path | None, typer.Option(help="Folder for eval.json and eval.md."))],
         after=[config_option("an 'evaluate' section"), trust_option(), flow_option()])
def evaluate(values: dict, model: str, adapter: str | None, out: Path | None, config: Path | None,
             trust_pickle: bool, flow: bool) -> None:
    """Evaluate a model: perplexity, held-out response NLL, capability-suite accuracy, lm-eval tasks."""
    from paser.evaluation.report import markdown_table

    result = dispatch(lambda: run_evaluate(config, flow=flow, model=model, adapter=adapter, out=out,
                                           trust_pickle=trust_pickle, **values))
    typer.echo(markdown_table(result.results))
    typer.echo(_ledger_line(result.compute))


# ---------------------------------------------------------------- compare


def budget_pairs(texts: list[str]) -> dict:
    """``--budget tok=0.2tok --budget rec=0.2``: named budgets."""
    found = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"--budget {text!r}: expected NAME=BUDGET, e.g. tok=0.2tok or rec=0.2")
        found[name.strip()] = parse_budget(value.strip()).setting
    return found


COMPARE = [Opt("compare", name) for name in ("pool", "pool_records", "heldout_records", "heldout", "dense", "pruned",
                                             "prune_ratio", "metric", "bootstrap", "recovery_seeds", "out")] + [
    Opt("compare", "arms", "--arms", lambda text: [a.strip() for a in text.split(",") if a.strip()], str),
    Opt("compare", "budgets", "--budget", budget_pairs, list[str]),
    Opt("distribute", "engine"), Opt("distribute", "address"), Opt("distribute", "workers")]


@command(app, "compare", COMPARE, {"compare": CompareConfig, "distribute": STAGE_CONFIGS["distribute"]},
         after=[config_option("a 'compare' section, and the 'recover', 'evaluate' and selection sections every arm "
                              "shares"),
                plain("report_only", bool, typer.Option(help="Run no arm: write the report from the finished ones."),
                      False), flow_option()])
def compare(values: dict, config: Path | None, report_only: bool, flow: bool) -> None:
    """Does selection pay on this model, at this budget? Arms trained alike, judged against random subsets."""
    overrides = {section: {k: v for k, v in fields.items() if v is not None} for section, fields in values.items()}
    report = dispatch(lambda: run_compare(config, flow=flow, report_only=report_only, **overrides)).report
    text = report.read_text()
    typer.echo(text.split("\n\n", 1)[1].split("\n\nPrimary metric")[0])
    typer.echo(f"report: {report}")


# ---------------------------------------------------------------- run

RUN = [Opt("select", "dense"), Opt("select", "pruned"), Opt("select", "data"), Opt("select", "budget"),
       Opt("recover", "objective"), Opt("select", "method"), Opt("prompt", "template"), Opt("prompt", "cutoff")]


@command(app, "run", RUN, {"select": STAGE_CONFIGS["select"], "recover": RecoverConfig, "prompt": PromptFormat},
         after=[plain("out", Path, typer.Option(help="Run folder."), Path("runs/run")),
                config_option("one file for every stage: select sections, prune, recover, evaluate"),
                trust_option(), flow_option()])
def run(values: dict, out: Path, config: Path | None, trust_pickle: bool, flow: bool) -> None:
    """The whole pipeline: prune (optional) -> select -> recover -> evaluate dense, pruned and recovered."""
    chosen = {section: {k: v for k, v in fields.items() if v is not None} for section, fields in values.items()}
    result = dispatch(lambda: run_all(config, flow=flow, out=out, trust_pickle=trust_pickle, **chosen))
    typer.echo((result.out / "run.md").read_text())
    typer.echo(f"run folder: {result.out}")
