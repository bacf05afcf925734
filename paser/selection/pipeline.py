"""The selection pipeline's stages as functions of a run folder.

Each stage reads what earlier stages wrote into the run folder (``paser.selection.runfolder``) and writes
its own output there, sealed with a fingerprint of everything it depends on; a stage whose
fingerprint matches is skipped. So re-selecting at another budget reuses embeddings, clusters and
scores (no model is loaded), and changing the clustering settings re-runs clustering and what
follows, nothing before it. ``run_selection`` runs them in order in this process; the Prefect
flow in ``paser/flows/selection.py`` calls these same functions as tasks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from paser.data.pools import Pool, Record, load_pool, write_jsonl
from paser.data.suite import suite_pool
from paser.errors import ConfigError
from paser.models.load import check_same_tokenizer, load_model, load_tokenizer
from paser.selection.adaptive import PLAN
from paser.selection.budget import parse_budget, take_in_order
from paser.selection.clustering import SpectralClusterer
from paser.selection.concepts import cluster_names
from paser.selection.configs import SelectConfig
from paser.selection.degradation import token_table
from paser.selection.embedding import (
    SentenceEmbedder,
    embed_texts,
    instruction_texts,
    load_precomputed,
    precomputed_file,
)
from paser.selection.manifold import learn_manifold, neighbour_search
from paser.selection.report import write_report
from paser.selection.runfolder import (
    STAGE_OUTPUTS,
    Stage,
    atomic_parquet,
    atomic_parquet_parts,
    is_fresh,
    read_run_pool,
    run_folder,
    seal,
    selection_embeddings,
    selection_table,
    stage_fingerprint,
)
from paser.selection.scoring import ShardMap, plan_scoring, run_scoring, twin_folder, twin_reference
from paser.selection.settings import Settings

# ---------------------------------------------------------------- data


def read_input_pool(cfg: SelectConfig) -> Pool:
    if cfg.data is None:
        return suite_pool(cfg.suite_size, cfg.seed)
    return load_pool(cfg.data, layout=cfg.layout, field_map=cfg.field_map, strict=cfg.strict, split=cfg.split)


def stage_output(settings: Settings, run: Path, stage: str, make, fp: str | None = None) -> Path:
    """The stage's output file in ``run``: reused when its fingerprint matches, else written by
    ``make(path, fingerprint)`` and sealed with the fingerprint; timed either way. ``fp``: the
    fingerprint when the caller has it already (the flow, which keys Prefect's cache on it)."""
    path = run / STAGE_OUTPUTS[stage]
    fp = fp or stage_fingerprint(stage, settings, run)
    with Stage(run, stage) as st:
        if is_fresh(path, fp):
            st.reused = True
        else:
            make(path, fp)
            seal(path, fp)
    return path


def stage_data(settings: Settings, run: Path, fp: str | None = None) -> Path:
    """Validate the pool once and store it in the run folder."""
    def make(path: Path, fp: str) -> None:
        pool = read_input_pool(settings.select)
        atomic_parquet_parts(pool_frames(pool.records), path)
        (run / "data.json").write_text(json.dumps({
            "source": str(pool.source) if pool.source else "generated capability suite",
            "layout": pool.layout, "records": len(pool), "fingerprint": fp,
            "field_map": dataclasses.asdict(pool.field_map),
            "rejected": [dataclasses.asdict(r) for r in pool.rejected],
        }, indent=2))

    return stage_output(settings, run, "data", make, fp)


POOL_ROWS_PER_GROUP = 100_000  # records per row group of pool.parquet, built and written one at a time


def pool_frames(records: list[Record]):
    """pool.parquet's rows, ``POOL_ROWS_PER_GROUP`` records a frame (at least one frame): a pool
    of millions is never copied whole into a frame and Arrow beside its records."""
    for lo in range(0, max(len(records), 1), POOL_ROWS_PER_GROUP):
        part = records[lo:lo + POOL_ROWS_PER_GROUP]
        yield pd.DataFrame({
            "id": [r.id for r in part],
            "instruction": [r.instruction for r in part],
            "input": [r.input for r in part],
            "response": [r.response for r in part],
            "fields": [json.dumps(r.fields, ensure_ascii=False, default=str) for r in part],
            "index": [r.index for r in part],
            "context": [json.dumps(list(r.context), ensure_ascii=False) for r in part],
        })


def dense_tokenizer(settings: Settings):
    """The dense model's tokenizer (scoring and recovery count tokens with it)."""
    cfg = settings.select
    return (load_tokenizer(cfg.dense, cfg.trust_pickle)
            or load_model(cfg.dense, trust_pickle=cfg.trust_pickle).tokenizer)


def stage_tokens(settings: Settings, run: Path) -> Path:
    """Count every record's prompt and response tokens (the dense tokenizer, the template, the
    cutoff): what a token budget spends and what every method reports, models not needed."""
    return stage_output(settings, run, "tokens", lambda path, fp: atomic_parquet(
        token_table(dense_tokenizer(settings), read_run_pool(run, fields=False), settings.prompt), path))


def resolve_run_budget(settings: Settings, run: Path) -> tuple[int, str]:
    """The budget in its unit (records or tokens) for the run's pool (its tokens.parquet); a
    ConfigError when the pool cannot hold it or a token budget is below the shortest record. Runs
    right after the token count, before any embedding or model."""
    budget = parse_budget(settings.select.budget)
    tokens = pd.read_parquet(run / "tokens.parquet", columns=["n_tokens"])["n_tokens"]
    try:
        amount = budget.resolve(len(tokens), int(tokens.sum()))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if budget.tokens and len(tokens) and amount < int(tokens.min()):
        raise ConfigError(f"budget of {amount} tokens is smaller than the shortest record "
                          f"({int(tokens.min())} tokens under the {settings.prompt.cutoff}-token cutoff)")
    return amount, budget.unit


# ---------------------------------------------------------------- embed and cluster


def stage_embed(settings: Settings, run: Path, fp: str | None = None) -> Path:
    cfg = settings.embed
    embedder = SentenceEmbedder(cfg.model, cfg.batch_size, cfg.device, progress=settings.select.progress)

    def make(path: Path, fp: str) -> None:
        if cfg.precomputed:
            ids = pd.read_parquet(run / "pool.parquet", columns=["id"])["id"].astype(str).tolist()
            np.save(path, load_precomputed(cfg.precomputed, ids, embedder.dimension()))
            (run / "embed_cost.json").unlink(missing_ok=True)  # made elsewhere: not in this run's ledger
            return
        texts = instruction_texts(read_run_pool(run, fields=False), cfg.include_input)
        np.save(path, embed_texts(texts, cfg, embedder=embedder))
        (run / "embed_cost.json").write_text(json.dumps(embedder.cost(texts), indent=2))  # the compute ledger's line

    return stage_output(settings, run, "embed", make, fp)


def stage_cluster(settings: Settings, run: Path, fp: str | None = None) -> Path:
    seed = settings.select.seed

    def make(path: Path, fp: str) -> None:
        x = np.load(run / "embeddings.npy")
        coords, eigenvalues = learn_manifold(x, settings.manifold, random_state=seed)
        np.savez(run / "manifold.npz", coords=coords, eigenvalues=eigenvalues)
        clusterer = SpectralClusterer.from_config(settings.cluster, seed, settings.select.progress).fit(
            coords, eigenvalues if settings.manifold.method == "diffusion" else None)
        ids = pd.read_parquet(run / "pool.parquet", columns=["id"])["id"]
        atomic_parquet(pd.DataFrame({"id": ids, "cluster": clusterer.labels_}), path)
        (run / "cluster_fit.json").write_text(json.dumps({
            "k": int(clusterer.k_), "n_clusters": int(clusterer.n_clusters_),
            "knee_k": clusterer.knee_k_, "knee_band": clusterer.knee_band_,
            "k_selection": settings.cluster.k_selection, "k_reason": clusterer.k_reason_,
            "knee_height": clusterer.knee_height_, "flat_curve": clusterer.flat_, "eigengap_k": clusterer.eigengap_k_,
            # one eigenvalue 1 per connected component of the kNN graph (at most n_components + 1 counted)
            "graph_components": int(np.sum(np.asarray(eigenvalues) == 1.0)) if settings.manifold.method == "diffusion"
            else None,
            "k_curve": clusterer.k_curve_, "eigenvalues": [float(v) for v in eigenvalues],
            "method": settings.cluster.method, "manifold": settings.manifold.method,
            "neighbors": neighbour_search(len(x), settings.manifold) if settings.manifold.method == "diffusion"
            else None,
        }, indent=2))

    return stage_output(settings, run, "cluster", make, fp)


# ---------------------------------------------------------------- degradation


def stage_twin(settings: Settings, run: Path) -> str:
    """The pruned model's reference, making paser's twin first when none was given (timed)."""
    with Stage(run, "twin") as st:
        st.reused = settings.select.pruned is not None or (twin_folder(settings) / "paser_pruned.json").is_file()
        return twin_reference(settings)


def stage_score(settings: Settings, run: Path, map_shards: ShardMap | None = None) -> Path:
    """Score the degradation of every record (reused when the run folder holds it for these models
    and settings) against the twin of ``stage_twin``. ``map_shards``: how the shards run (default:
    one after another in this process; the flow maps them over its engine)."""
    path = run / "degradation.parquet"
    pruned_ref = twin_reference(settings)  # made by the twin stage before this one
    with Stage(run, "score") as st:
        plan = plan_scoring(settings, run, pruned_ref)
        if is_fresh(path, plan.fingerprint):
            st.reused = True
            return path
        return run_scoring(settings, plan, map_shards)


# ---------------------------------------------------------------- select and write


def selection_summary(method: str, amount: int, unit: str, selected: pd.DataFrame, every_record: bool = False) -> dict:
    """What every method's clusters.json and manifest say about the selection: the budget in its
    unit (``every_record``: the method took every record, whatever the budget) and the selection in
    records, tokens (prompt + response) and response tokens."""
    return {"method": method, "budget": int(amount), "budget_unit": unit, "every_record": every_record,
            "selected": int(len(selected)),
            "selected_tokens": int(selected["n_tokens"].sum()),
            "selected_response_tokens": int(selected["n_response"].sum())}


def _write_selected(run: Path, records: list[Record], selected: pd.DataFrame, extra) -> None:
    """selected.jsonl: each selected record in the input's layout plus paser's fields, in rank order."""
    by_id = {r.id: r for r in records}
    write_jsonl(run / "selected.jsonl", [
        dict(by_id[row.id].fields) | {"paser_id": row.id} | extra(row)
        | {"paser_tokens": int(row.n_tokens), "paser_rank": int(row.rank)}
        for row in selected.itertuples()])


def stage_select(settings: Settings, run: Path) -> Path:
    """The clustered method's pick over the saved scores and clusters (for PASER: allocation, IES
    ranking and the concept filter); writes the outputs."""
    method = settings.method
    with Stage(run, "select"):
        forget_plan(run)
        records, table = selection_table(settings, run)
        result = method.pick(settings, table, settings.select.budget, selection_embeddings(settings, run), run)
        out = result.table
        atomic_parquet(out.assign(concepts=out["concepts"].map(list)), run / "scores.parquet")
        _write_selected(run, records, result.selected, lambda row: {
            "paser_cluster": int(row.cluster), "paser_jsd": float(row.jsd), "paser_loss_gap": float(row.loss_gap),
            "paser_ies": float(row.ies)})
        fit = json.loads((run / "cluster_fit.json").read_text())
        names = cluster_names(out["cluster"], out["concepts"])
        (run / "clusters.json").write_text(json.dumps(
            selection_summary(method.name, result.budget, result.unit, result.selected) | {
                "signal": result.signal, "K": fit["k"], "n_clusters": fit["n_clusters"], "knee_k": fit["knee_k"],
                "knee_band": fit.get("knee_band"), "k_selection": fit.get("k_selection", "knee"),
                "eigengap_k": fit["eigengap_k"], "k_curve": fit["k_curve"], "k_reason": fit.get("k_reason"),
                "flat_curve": fit.get("flat_curve"), **method.summary(settings, run),
                "clusters": [{"cluster": c, "name": names.get(c, ""), "size": int(result.sizes[c]),
                              "cds": float(result.cds[c]), **cds_interval(out, c, result.signal),
                              "allocation": int(result.allocation[c]),
                              "selected": int(result.selected_per_cluster[c]),
                              "selected_tokens": int(result.selected_tokens_per_cluster[c]),
                              "rejected": int(result.rejected_per_cluster[c])}
                             for c in range(len(result.sizes))],
            }, indent=2))
    return run / "selected.jsonl"


def forget_plan(run: Path) -> None:
    """Remove an earlier adaptive selection's plan from ``run`` before a selection is written:
    beside another selection's selected.jsonl it would make recovery train in rounds."""
    (run / PLAN).unlink(missing_ok=True)


def cds_interval(table: pd.DataFrame, cluster: int, signal: str) -> dict:
    """How many of ``cluster``'s records were scored, and a 95% t interval of its CDS (the mean of
    their ``signal``) from them: the sampling error of a CDS measured on a sample (per_cluster),
    or of the cluster's mean in general. None where fewer than two were scored."""
    from scipy import stats

    values = table.loc[table["cluster"] == cluster, signal].to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return {"cds_scored": int(len(values)), "cds_ci": None}
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return {"cds_scored": int(len(values)), "cds_ci": [float(values.mean() - half), float(values.mean() + half)]}


def stage_baseline(settings: Settings, run: Path) -> Path:
    """An ordered method (the baselines), in the same output files as PASER (selected.jsonl in the
    input's layout, scores.parquet, clusters.json with no clusters) so that recovery and evaluation
    treat every arm alike: records are taken in the method's order while the next one fits the
    budget (records or tokens), or all of them (full)."""
    method = settings.method
    with Stage(run, "select"):
        forget_plan(run)
        records = read_run_pool(run)
        table = pd.read_parquet(run / "tokens.parquet")
        if settings.scored:
            scores = pd.read_parquet(run / "degradation.parquet").drop(columns=["n_prompt", "n_response", "truncated"])
            table = table.merge(scores, on="id", how="left", validate="one_to_one")
        table["response_chars"] = [len(r.response) for r in records]
        order = method.order(settings, table)
        amount, unit = resolve_run_budget(settings, run)
        if method.takes_all:
            chosen = order.tolist()
            amount = int(table["n_tokens"].sum()) if unit == "tokens" else len(table)
        else:
            cost = table["n_tokens"].to_numpy() if unit == "tokens" else np.ones(len(table), dtype=np.int64)
            chosen = take_in_order(order, cost, amount)
        rank = np.zeros(len(records), dtype=np.int64)
        rank[chosen] = np.arange(1, len(chosen) + 1)
        table["status"] = np.where(rank > 0, "selected", "unvisited")
        table["rank"] = rank
        if settings.scored:  # records without a scored token
            table.loc[~np.isfinite(table["nll_pruned"]), "status"] = "unscored"
        atomic_parquet(table.drop(columns=["response_chars"]), run / "scores.parquet")
        selected = table[rank > 0].sort_values("rank")
        _write_selected(run, records, selected, lambda row: {})
        (run / "clusters.json").write_text(json.dumps(
            selection_summary(method.name, amount, unit, selected, method.takes_all) | {"clusters": []}, indent=2))
    return run / "selected.jsonl"


def preflight(settings: Settings) -> None:
    """Check what can be checked cheaply before any stage starts, so a bad input fails in a
    second with one clear message: the pool, a record budget against its size, the model
    references, a file of embeddings given, and (when the pruned model is given) that the two
    tokenizers match. A token budget is checked once the tokens are counted, the stage right after
    the data; the embeddings' ids and dimension when the embedding stage reads them."""
    cfg = settings.select
    if settings.embed.precomputed and settings.clustered:
        precomputed_file(settings.embed.precomputed)
    pool = read_input_pool(cfg)
    budget = parse_budget(cfg.budget)
    if not budget.tokens:
        budget.resolve(len(pool))
    # loading a tokenizer resolves its model reference: a missing or refused model fails here
    dense_tok = load_tokenizer(cfg.dense, cfg.trust_pickle)
    if not settings.scored:
        return  # random, full, longest, shortest and strat at temperature 0 use the tokenizer only
    if cfg.pruned is not None:
        # an LLM-Pruner checkpoint is imported here (once, cached), so a refusal comes before any stage
        pruned_tok = load_tokenizer(cfg.pruned, cfg.trust_pickle, tokenizer_from=cfg.dense)
        if dense_tok is not None and pruned_tok is not None:
            check_same_tokenizer(dense_tok, pruned_tok, cfg.dense, cfg.pruned)


def stage_budget(settings: Settings, run: Path) -> Path:
    """Count every record's tokens, then check the budget against them (before any model loads)."""
    path = stage_tokens(settings, run)
    resolve_run_budget(settings, run)
    return path


def stage_report(settings: Settings, run: Path) -> Path:
    return write_report(settings, run)


@dataclass(frozen=True)
class Step:
    """One stage of ``paser select``: its name (the Prefect task's), the function of (settings, run
    folder) that runs it, the run folder output whose fingerprint it is reused by (``cached``;
    Prefect's cache key is that fingerprint, which the flow computes once and passes to ``run``), and
    whether it scores shards (``shards``: the flow passes it how to map them over its engine)."""

    name: str
    run: Callable[..., object]
    cached: str | None = None
    shards: bool = False


def stages(settings: Settings) -> list[Step]:
    """The recipe of ``paser select``: the stages the settings' method needs, in order.
    ``run_selection`` walks it in this process; the Prefect flow (paser/flows/selection.py) walks the
    same list as tasks."""
    steps = [Step("load data", stage_data, "data"), Step("count tokens", stage_budget)]
    if settings.clustered:  # PASER, its ablations, strat, adaptive; the baselines need no clusters
        steps += [Step("embed instructions", stage_embed, "embed"),
                  Step("find capability clusters", stage_cluster, "cluster")]
    if settings.scored:  # random, full, longest, shortest and strat at temperature 0 load no model
        steps += [Step("pruned twin", stage_twin), Step("score degradation", stage_score, shards=True)]
    steps.append(Step("allocate, rank and filter", stage_select) if settings.clustered
                 else Step("baseline selection", stage_baseline))
    return [*steps, Step("write report", stage_report)]


def run_selection(settings: Settings) -> Path:
    """``paser select`` in this process, without Prefect: every stage of the recipe in order."""
    run = run_folder(settings)
    for step in stages(settings):
        step.run(settings, run)
    return run
