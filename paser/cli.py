"""The ``paser`` command line: a thin face over the Python API.

    paser select                      # the embedded default
    paser select --data pool.json --dense DENSE --pruned PRUNED --budget 0.2 --out runs/x
    paser prune smollm2-135m-instruct --ratio 0.25 --out runs/smollm2-pruned-25

Errors a user can fix (``PaserError``) print one line and exit with status 2; no traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from paser.errors import PaserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Select the instruction samples that repair a pruned LLM, and recover it.")


def _offline_defaults() -> None:
    # paser never downloads at run time; a missing local file should fail fast, not hang on a hub.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")


def _fail(err: Exception) -> typer.Exit:
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


TRUST_HELP = ("Unpickle whole a pickle that paser's restricted reader refuses (it can run code hidden in the file); "
              "LLM-Pruner checkpoints need no flag.")


def _layer_range(text: str | None, option: str) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        start, end = (int(v) for v in text.split(":"))
    except ValueError:
        raise typer.BadParameter(f"expected START:END (e.g. 4:28), got {text!r}", param_hint=option) from None
    return start, end


@app.callback()
def _group(debug: Annotated[bool, typer.Option("--debug", help="Show Prefect's full logs, tracebacks of "
                                                                "input errors included.")] = False,
           quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No stage names and no progress bars; "
                                                                    "results and errors only.")] = False) -> None:
    """Select the instruction samples that repair a pruned LLM, and recover it."""
    from paser.progress import library_bars, set_quiet

    if debug:
        os.environ["PASER_DEBUG"] = "1"
    set_quiet(quiet)
    library_bars()


def _quiet_flows() -> None:
    """Errors the user can fix reach the terminal as one line, not as Prefect's tracebacks."""
    from flows import configure_prefect, hide_user_errors

    configure_prefect()
    import prefect.main  # noqa: F401  (sets up Prefect's logging handlers)

    hide_user_errors()


@app.command()
def prune(
    model: Annotated[str, typer.Argument(help="Model to prune: a built-in name, HF folder, .gguf file or "
                                              "LLM-Pruner checkpoint.")] = "smollm2-135m-instruct",
    out: Annotated[Path, typer.Option(help="Folder to write the pruned model to.")] = Path("runs/pruned"),
    ratio: Annotated[float | None, typer.Option(help="Fraction of heads and MLP channels to remove "
                                                     "per pruned layer (default 0.25).")] = None,
    attn_ratio: Annotated[float | None, typer.Option(help="Fraction of attention heads to remove "
                                                          "(default --ratio).")] = None,
    mlp_ratio: Annotated[float | None, typer.Option(help="Fraction of MLP channels to remove "
                                                         "(default --ratio).")] = None,
    attn_layers: Annotated[str | None, typer.Option(help="Layers START:END whose attention is pruned "
                                                         "(default: LLM-Pruner's proportions).")] = None,
    mlp_layers: Annotated[str | None, typer.Option(help="Layers START:END whose MLP is pruned.")] = None,
    importance: Annotated[str | None, typer.Option(help="taylor, l2 or random (default taylor).")] = None,
    gqa: Annotated[str | None, typer.Option(help="Under GQA remove query 'heads' in each group or whole "
                                                 "'groups' (default heads).")] = None,
    calibration: Annotated[str | None, typer.Option(help="Calibration data: instruction records or a .txt "
                                                         "file (default generated capability suite).")] = None,
    num_calibration: Annotated[int | None, typer.Option(help="Calibration samples (default 10).")] = None,
    round_to: Annotated[int | None, typer.Option(help="Round MLP widths to a multiple of this.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default 0).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config with a 'prune' section; options "
                                                     "given here override it.")] = None,
    export_pickle: Annotated[Path | None, typer.Option(help="Also write LLM-Pruner's pickle layout "
                                                            "to this file.")] = None,
    trust_pickle: Annotated[bool, typer.Option(help=TRUST_HELP)] = False,
    dtype: Annotated[str, typer.Option(help="Weights dtype while pruning and saving.")] = "float32",
    device: Annotated[str | None, typer.Option(help="Device of the calibration passes and pruning: cpu "
                                                    "(default), cuda or cuda:K.")] = None,
    flow: Annotated[bool, typer.Option("--flow/--no-flow", help="Run through the Prefect flow (default) or "
                                       "call the library directly.")] = True,
) -> None:
    """Prune attention heads and MLP channels, LLM-Pruner block-wise style, and save the model."""
    from paser.config import load_config
    from paser.pruning import PruneConfig
    from paser.pruning import prune as run_prune

    _offline_defaults()
    overrides = dict(ratio=ratio, attn_ratio=attn_ratio, mlp_ratio=mlp_ratio,
                     attn_layers=_layer_range(attn_layers, "--attn-layers"),
                     mlp_layers=_layer_range(mlp_layers, "--mlp-layers"), importance=importance,
                     gqa=gqa, calibration=calibration, num_calibration=num_calibration,
                     round_to=round_to, seed=seed)
    try:
        cfg = load_config(PruneConfig, config, "prune", overrides)
        typer.echo(f"pruning {model} ...", err=True)
        if flow:
            _quiet_flows()
            from flows.prune import prune_flow
            from paser.models import check_reference

            check_reference(model, trust_pickle)  # bad input fails here in one line, before Prefect starts

            result = prune_flow(model, str(out), str(config) if config else None, overrides,
                                str(export_pickle) if export_pickle else None, trust_pickle, dtype, device)
        else:
            result = run_prune(model, out, cfg, export_pickle=export_pickle, trust_pickle=trust_pickle,
                               dtype=dtype, device=device)
    except (PaserError, ValueError) as err:
        raise _fail(err) from None
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


@app.command()
def select(
    data: Annotated[str | None, typer.Option(help="Instruction pool: JSON, JSONL, CSV, Parquet or a datasets "
                                                  "folder (default: paser's generated capability suite).")] = None,
    dense: Annotated[str | None, typer.Option(help="Dense model reference (default smollm2-135m-instruct).")] = None,
    pruned: Annotated[str | None, typer.Option(help="Pruned model reference (default: paser prunes the dense "
                                                    "model at --prune-ratio, once, cached).")] = None,
    prune_ratio: Annotated[float | None, typer.Option(help="Ratio for the twin made when --pruned is not "
                                                           "given (default 0.25).")] = None,
    budget: Annotated[str | None, typer.Option(help="What to select: records as a count (100) or a fraction "
                                                    "(0.2), or tokens (prompt + response under the template "
                                                    "and cutoff) as an amount (40000tok) or a fraction of the "
                                                    "pool's tokens (0.2tok) (default 0.2).")] = None,
    out: Annotated[str | None, typer.Option(help="Run folder (default runs/select). Re-running on an existing "
                                                 "folder reuses every unchanged stage.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML settings (sections select, embed, manifold, "
                                                     "cluster, score, allocate, sample, adaptive, concepts, "
                                                     "prune, distribute).")] = None,
    layout: Annotated[str | None, typer.Option(help="alpaca, lamini, dolly, messages (chat turns) or sharegpt "
                                                    "(conversations) (default: detected).")] = None,
    split: Annotated[str | None, typer.Option(help="Split of a Hugging Face dataset id given as --data "
                                                   "(default train).")] = None,
    fields: Annotated[str | None, typer.Option(help="Field names of another layout: ROLE=FIELD pairs, e.g. "
                                                    "instruction=question,response=answer[,input=context,id=uid] "
                                                    "or messages=dialog.")] = None,
    strict: Annotated[bool | None, typer.Option("--strict/--lenient", help="Refuse records with an empty "
                                                "instruction or response instead of setting them aside.")] = None,
    suite_size: Annotated[int | None, typer.Option(help="Records of the generated suite (default 1000).")] = None,
    dtype: Annotated[str | None, typer.Option(help="Scoring weights dtype: auto (default: bfloat16 on a CUDA "
                                                             "GPU with bf16, else float32), float32, bfloat16, "
                                                             "float16.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Records per scoring forward pass.")] = None,
    template: Annotated[str | None, typer.Option(help="Prompt template: alpaca or chat.")] = None,
    cutoff: Annotated[int | None, typer.Option(help="Token cutoff of prompt + response (default 256).")] = None,
    clusters: Annotated[int | None, typer.Option(help="A fixed number of clusters (default: automatic).")] = None,
    cluster_method: Annotated[str | None, typer.Option(help="nmf or kmeans.")] = None,
    manifold: Annotated[str | None, typer.Option(help="diffusion or umap.")] = None,
    max_concepts: Annotated[int | None, typer.Option(help="Concepts per record for the consistency filter.")] = None,
    concepts: Annotated[bool | None, typer.Option("--concepts/--no-concepts", help="Apply the concept "
                                                  "consistency filter.")] = None,
    allocation: Annotated[str | None, typer.Option(help="largest_remainder, floor or uniform.")] = None,
    signal: Annotated[str | None, typer.Option(help="Degradation that CDS and IES use: jsd (the paper, default) "
                                                    "or loss_gap (pruned minus dense response NLL).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (default 0).")] = None,
    method: Annotated[str | None, typer.Option(help="paser (default); strat (tempered stratified: "
                                                    "--cds-temperature, --ies-temperature, --dedup); adaptive "
                                                    "(rounds of recovery, the adaptive section); baselines "
                                                    "random, full, longest, shortest, pruned_loss; ablations "
                                                    "uniform, random_order, no_cost, no_ccg, kmeans.")] = None,
    cds_temperature: Annotated[float | None, typer.Option(help="strat: cluster shares ~ size x (CDS / mean "
                                                               "CDS)^T (default 0: by size alone).")] = None,
    ies_temperature: Annotated[float | None, typer.Option(help="strat: records drawn ~ (IES / cluster mean)^T "
                                                               "(default 0: uniformly).")] = None,
    dedup: Annotated[float | None, typer.Option(help="strat: skip a record whose instruction has cosine >= this "
                                                     "with one already taken (default: keep all).")] = None,
    per_cluster: Annotated[int | None, typer.Option(help="Score only this many records per cluster (strat with "
                                                         "--ies-temperature 0; CDS with a 95% interval).")] = None,
    trust_pickle: Annotated[bool, typer.Option(help=TRUST_HELP)] = False,
    engine: Annotated[str | None, typer.Option(help="Where degradation shards run: local, dask or ray "
                                                    "(default local).")] = None,
    address: Annotated[str | None, typer.Option(help="Dask scheduler or Ray cluster address (default: start "
                                                     "a local cluster).")] = None,
    workers: Annotated[int | None, typer.Option(help="Workers of a local Dask/Ray cluster (default 2).")] = None,
    flow: Annotated[bool, typer.Option("--flow/--no-flow", help="Run through the Prefect flow (default) or "
                                       "call the stages directly.")] = True,
) -> None:
    """Select the instruction samples that best repair the pruned model (PASER)."""
    from paser.api import select as run_select
    from paser.data import parse_fields

    _offline_defaults()
    try:
        field_map = parse_fields(fields) if fields else None
    except PaserError as err:
        raise _fail(err) from None
    overrides = {
        "select": {"layout": layout, "strict": strict, "suite_size": suite_size, "method": method,
                   "field_map": field_map, "split": split},
        "score": {"dtype": dtype, "batch_size": batch_size, "template": template, "cutoff": cutoff,
                  "signal": signal, "per_cluster": per_cluster},
        "sample": {"cds_temperature": cds_temperature, "ies_temperature": ies_temperature, "dedup": dedup},
        "cluster": {"n_clusters": clusters, "method": cluster_method},
        "manifold": {"method": manifold},
        "concepts": {"max_concepts": max_concepts, "enabled": concepts},
        "allocate": {"method": allocation},
    }
    try:
        if flow:
            _quiet_flows()
        run = run_select(data=data, dense=dense, pruned=pruned, prune_ratio=prune_ratio, budget=budget, out=out,
                         config=config, trust_pickle=trust_pickle or None, seed=seed, engine=engine,
                         address=address, workers=workers, use_flow=flow, overrides=overrides)
    except (PaserError, ValueError) as err:
        raise _fail(err) from None
    import json

    summary = json.loads((run / "clusters.json").read_text())
    timings = json.loads((run / "timings.json").read_text())
    source = f"from {summary['K']} clusters" if "K" in summary else f"({summary['method']} baseline)"
    typer.echo(f"selected {summary['selected']} records, {summary['selected_tokens']} tokens "
               f"({summary['selected_response_tokens']} response tokens) {source}; budget {summary['budget']} "
               f"{summary['budget_unit']}")
    typer.echo("stage seconds: " + ", ".join(f"{k} {v['seconds']:.1f}{' (reused)' if v['reused'] else ''}"
                                             for k, v in timings.items()))
    from paser.ledger import Ledger

    typer.echo(Ledger.from_dict(json.loads((run / "manifest.json").read_text())["compute"]).line())
    typer.echo(f"run folder: {run} (selected.jsonl, scores.parquet, clusters.json, manifest.json, report.md)")


@app.command()
def recover(
    model: Annotated[str, typer.Argument(help="The pruned model: a paser-pruned folder, HF folder, .gguf, "
                                              "LLM-Pruner checkpoint or built-in name.")],
    data: Annotated[str, typer.Option(help="Training records: a run's selected.jsonl or any instruction "
                                           "file.")],
    out: Annotated[Path, typer.Option(help="Output folder (adapter/, merged/, checkpoints/, logs).")] = Path(
        "runs/recover"),
    config: Annotated[Path | None, typer.Option(help="YAML with a 'recover' section; options given here "
                                                     "override it.")] = None,
    val_data: Annotated[str | None, typer.Option(help="Validation records (default: --val-size of --data is "
                                                      "held out).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Epochs (default 2).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate (default 1e-4).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Effective batch size (default 64).")] = None,
    micro_batch_size: Annotated[int | None, typer.Option(help="Records per forward pass (default 4).")] = None,
    batch_tokens: Annotated[int | None, typer.Option(help="Form each optimizer step from about this many tokens "
                                                          "(prompt + response) instead of --batch-size records: "
                                                          "equal tokens give equal steps.")] = None,
    micro_batch_tokens: Annotated[int | None, typer.Option(help="Padded tokens per forward pass at most (records "
                                                                "sorted by length into passes; speed only).")] = None,
    token_weighting: Annotated[float | None, typer.Option(help="Token-weighted SFT, lambda in [0, 1]: each response "
                                                              "token's loss weighted (1 - lambda) + lambda x its "
                                                              "signal / the step's mean (default 0: plain SFT).")
                               ] = None,
    token_signal: Annotated[str | None, typer.Option(help="Token weighting's signal: excess (pruned minus dense "
                                                          "NLL, default) or jsd.")] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank (default 8).")] = None,
    lora_alpha: Annotated[int | None, typer.Option(help="LoRA alpha (default 16).")] = None,
    cutoff: Annotated[int | None, typer.Option(help="Token cutoff (default 256).")] = None,
    val_size: Annotated[float | None, typer.Option(help="Held-out validation fraction or count (default "
                                                        "0.05).")] = None,
    patience: Annotated[int | None, typer.Option(help="Stop once the validation loss has not improved for this "
                                                      "many evaluations (every eval_every steps) and keep the "
                                                      "best adapter (default: train every step).")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto (default: bfloat16 on a CUDA GPU with bf16, else "
                                                       "float32), float32 or bfloat16.")] = None,
    merge: Annotated[bool | None, typer.Option("--merge/--no-merge", help="Also save the merged model.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the LoRA initialisation, dropout and record order "
                                                  "(default 0); the validation split has its own (val_seed).")] = None,
    objective: Annotated[str | None, typer.Option(help="sft (default): learn the reference responses; distill: "
                                                       "learn the teacher's next-token distribution on them; mix: "
                                                       "both (--mix-weight is the sft share).")] = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher of distill/mix (default: the dense model of the "
                                                     "selection run whose selected.jsonl is --data).")] = None,
    divergence: Annotated[str | None, typer.Option(help="Distillation divergence: kl (default, forward "
                                                        "KL(teacher||student)) or jsd.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Distillation temperature (default 1).")] = None,
    mix_weight: Annotated[float | None, typer.Option(help="SFT share of --objective mix (default 0.5).")] = None,
    teacher_top_k: Annotated[int | None, typer.Option(help="Run the teacher alone first and cache its top-k "
                                                           "log-probabilities on disk (for pairs that do not fit "
                                                           "together; default: teacher in memory).")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="Clip gradients to this global norm (default 1; "
                                                             "0: no clipping).")] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute activations in the backward pass: less memory, more compute.")] = None,
    restart: Annotated[bool, typer.Option(help="Discard a checkpoint in --out instead of resuming.")] = False,
    trust_pickle: Annotated[bool, typer.Option(help=TRUST_HELP)] = False,
    flow: Annotated[bool, typer.Option("--flow/--no-flow", help="Run through the Prefect flow (default) or "
                                       "call the library directly.")] = True,
) -> None:
    """LoRA-recover a pruned model on selected records (LLM-Pruner's recipe by default). On several
    GPUs (or CPU processes): torchrun --nproc-per-node N --no-python paser recover ... --no-flow."""
    from paser.config import load_config
    from paser.recovery import RecoverConfig
    from paser.recovery import recover as run_recover

    _offline_defaults()
    overrides = dict(epochs=epochs, max_steps=max_steps, learning_rate=learning_rate, batch_size=batch_size,
                     micro_batch_size=micro_batch_size, batch_tokens=batch_tokens, r=lora_r, alpha=lora_alpha,
                     cutoff=cutoff, val_size=val_size, patience=patience, dtype=dtype, merge=merge, seed=seed,
                     objective=objective, teacher=teacher, divergence=divergence, temperature=temperature,
                     mix_weight=mix_weight, teacher_top_k=teacher_top_k, max_grad_norm=max_grad_norm,
                     gradient_checkpointing=gradient_checkpointing, micro_batch_tokens=micro_batch_tokens,
                     token_weighting=token_weighting, token_signal=token_signal)
    try:
        cfg = load_config(RecoverConfig, config, "recover", overrides)
        if flow:
            _quiet_flows()
            from flows.recovery import recovery_flow
            from paser.models import check_reference

            check_reference(model, trust_pickle)  # bad input fails here in one line, before Prefect starts
            recovery_flow(model, data, str(out), str(config) if config else None, overrides, val_data,
                          trust_pickle, restart)
        else:
            run_recover(model, data, out, cfg, val_data=val_data, trust_pickle=trust_pickle, restart=restart)
    except (PaserError, ValueError) as err:
        raise _fail(err) from None
    import json
    import os

    if int(os.environ.get("RANK", "0")):  # one of several processes: the first one reports
        return
    done = json.loads((out / "recovery.json").read_text())
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
    typer.echo(f"{done['steps']} steps (batches of {step}; {done['tokens_per_step']['mean']:.0f} tokens per step "
               f"on average) in {done['seconds']:.1f} s: {kind} loss {done['first_loss']:.4f} -> "
               f"{done['last_loss']:.4f}{val}")
    if done.get("adaptive"):
        rounds = done["adaptive"]["rounds"]
        typer.echo(f"adaptive: {len(rounds)} rounds of " + ", ".join(f"{r['records']}" for r in rounds)
                   + " records; shares of the last round " + " ".join(f"{x:.2f}" for x in rounds[-1]["shares"]))
    from paser.ledger import Ledger

    typer.echo(Ledger.from_dict(done["compute"]).line())
    typer.echo(f"adapter: {out / 'adapter'}")


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="Model reference (base, pruned, or merged).")],
    adapter: Annotated[str | None, typer.Option(help="A LoRA adapter folder to apply (paser recover's "
                                                     "adapter/).")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for eval.json and eval.md.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML with an 'evaluate' section.")] = None,
    text: Annotated[str | None, typer.Option(help="Plain-text file for perplexity (e.g. WikiText-2 test).")] = None,
    heldout: Annotated[str | None, typer.Option(help="Held-out instruction records for response NLL.")] = None,
    suite_size: Annotated[int | None, typer.Option(help="Capability-suite records for answer NLL and accuracy "
                                                        "per family (default 240; 0 skips).")] = None,
    suite_exclude: Annotated[list[str] | None, typer.Option(
        "--suite-exclude", help="Pool whose prompts are removed from the evaluation suite (repeatable): "
                                "'embedded' (default), a paser select run folder, or an instruction file.")] = None,
    reference_dense: Annotated[str | None, typer.Option(help="The dense model's eval.json (or folder): with "
                                                             "--reference-pruned, report the share of each family's "
                                                             "answer-NLL gap closed.")] = None,
    reference_pruned: Annotated[str | None, typer.Option(help="The pruned model's eval.json (or folder).")] = None,
    divergence_from: Annotated[str | None, typer.Option(help="A model (the dense one): report the mean token JSD "
                                                             "to it on the held-out responses and suite answers "
                                                             "(0: the same distributions).")] = None,
    suite_accuracy_per_family: Annotated[int | None, typer.Option(help="Suite records per family whose answers "
                                                                       "are generated for accuracy (default: "
                                                                       "all; 0: answer NLL only).")] = None,
    window: Annotated[int | None, typer.Option(help="LLM-Pruner perplexity window (default 128).")] = None,
    long_window: Annotated[int | None, typer.Option(help="Long perplexity window (default: model context, "
                                                         "at most 2048).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per forward pass (default 8).")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto (default: bfloat16 on a CUDA GPU with bf16, else "
                                                       "float32), float32 or bfloat16.")] = None,
    lm_eval_task: Annotated[list[str] | None, typer.Option(
        "--lm-eval-task", help="lm-evaluation-harness task (repeatable; extra 'eval'): 'paper' for the paper's "
                               "seven zero-shot tasks, an lm-eval task name, a local multiple-choice JSONL file "
                               "(query, choices, gold) or a task YAML.")] = None,
    lm_eval_limit: Annotated[int | None, typer.Option(help="Records per lm-eval task (default: all).")] = None,
    trust_pickle: Annotated[bool, typer.Option(help=TRUST_HELP)] = False,
    flow: Annotated[bool, typer.Option("--flow/--no-flow", help="Run through the Prefect flow (default) or "
                                       "call the library directly.")] = True,
) -> None:
    """Evaluate a model: perplexity, held-out response NLL, capability-suite accuracy, lm-eval tasks."""
    from paser.config import load_config
    from paser.evaluation import EvalConfig, markdown_table
    from paser.evaluation import evaluate as run_evaluate

    _offline_defaults()
    overrides = dict(text=text, heldout=heldout, suite_size=suite_size, suite_exclude=suite_exclude or None,
                     reference_dense=reference_dense, reference_pruned=reference_pruned,
                     divergence_from=divergence_from, suite_accuracy_per_family=suite_accuracy_per_family,
                     window=window, long_window=long_window,
                     batch_size=batch_size, dtype=dtype, lm_eval_tasks=lm_eval_task or None,
                     lm_eval_limit=lm_eval_limit)
    try:
        cfg = load_config(EvalConfig, config, "evaluate", overrides)
        if flow:
            _quiet_flows()
            from flows.recovery import evaluation_flow
            from paser.models import check_reference

            check_reference(model, trust_pickle)
            result = evaluation_flow(model, adapter, str(out) if out else None, str(config) if config else None,
                                     overrides, trust_pickle)
        else:
            result = run_evaluate(model, adapter, out, cfg, trust_pickle=trust_pickle)
    except (PaserError, ValueError) as err:
        raise _fail(err) from None
    from paser.ledger import Ledger

    typer.echo(markdown_table(result))
    typer.echo(Ledger.from_dict(result["compute"]).line())


@app.command()
def run(
    dense: Annotated[str | None, typer.Option(help="The dense model (default: the config's, else "
                                                   "smollm2-135m-instruct).")] = None,
    pruned: Annotated[str | None, typer.Option(help="A pruned model (default: the config's, else paser prunes "
                                                    "the dense one into OUT/pruned).")] = None,
    data: Annotated[str | None, typer.Option(help="Instruction pool (default: the generated suite).")] = None,
    budget: Annotated[str | None, typer.Option(help="Records to select (default 0.2).")] = None,
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/run"),
    config: Annotated[Path | None, typer.Option(help="One YAML for every stage (select sections, prune, "
                                                     "recover, evaluate).")] = None,
    objective: Annotated[str | None, typer.Option(help="Recovery objective: sft (default), distill (from the "
                                                       "dense model) or mix; overrides recover.objective.")] = None,
    method: Annotated[str | None, typer.Option(help="Selection method (paser select --method), e.g. adaptive: "
                                                    "recovery in rounds; overrides select.method.")] = None,
    trust_pickle: Annotated[bool, typer.Option(help=TRUST_HELP)] = False,
) -> None:
    """The whole pipeline: prune (optional) -> select -> recover -> evaluate dense, pruned and recovered."""
    _offline_defaults()
    try:
        from paser.api import build_settings
        from paser.models import check_reference

        settings = build_settings(data=data, dense=dense, pruned=pruned, budget=budget, config=config,
                                  overrides={"select": {"method": method}})
        dense, pruned = settings.select.dense, settings.select.pruned  # the config's unless given here
        check_reference(dense, trust_pickle)
        if pruned is not None:
            check_reference(pruned, trust_pickle, tokenizer_from=dense)
        from flows.pipeline import pipeline_flow

        _quiet_flows()

        if objective is not None:
            from paser.recovery import RecoverConfig

            RecoverConfig(objective=objective)  # a bad name fails here, before any stage
        overrides = ({"recover": {"objective": objective}} if objective else {}) | (
            {"select": {"method": method}} if method else {})
        folder = pipeline_flow(dense, pruned, data, budget, str(out), str(config) if config else None,
                               overrides=overrides or None, trust_pickle=trust_pickle)
    except (PaserError, ValueError) as err:
        raise _fail(err) from None
    typer.echo((Path(folder) / "run.md").read_text())
    typer.echo(f"run folder: {folder}")


@app.command()
def serve(
    deployment: Annotated[list[str] | None, typer.Argument(help="Deployments to serve: select, run, prune, "
                                                                "recover, evaluate (default: all).")] = None,
    api_url: Annotated[str | None, typer.Option(envvar="PREFECT_API_URL", help="The Prefect server's API, "
                                                "e.g. http://127.0.0.1:4200/api.")] = None,
    limit: Annotated[int | None, typer.Option(help="Most flow runs at once (default: no limit).")] = None,
) -> None:
    """Serve paser's deployments (paser-select/select, paser-run/run, ...) to a Prefect server."""
    _offline_defaults()
    if not api_url:
        raise _fail(PaserError("paser serve needs a Prefect server: start one with "
                               "'prefect server start --host 127.0.0.1' and pass --api-url "
                               "http://127.0.0.1:4200/api (or set PREFECT_API_URL)"))
    os.environ["PREFECT_API_URL"] = api_url
    from flows.deployments import serve as serve_deployments

    try:
        serve_deployments(deployment or None, limit=limit)
    except PaserError as err:
        raise _fail(err) from None


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except PaserError as err:
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        sys.exit(2)


if __name__ == "__main__":  # python -m paser.cli (accelerate launch -m paser.cli ...)
    main()
