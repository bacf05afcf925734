"""Degradation scoring across engines: the pruned twin, the scoring plan, models loaded once per
worker, shard scoring, the two-pass path, and collecting the shards into one table.

A ``ScoringPlan`` (small and picklable) names the scoring fingerprint, the two models and the
shards' record ranges. ``run_scoring`` scores a plan and collects it: the shards one after another
in this process (``score_shards_here``), or mapped over workers by a function the caller passes
(the Prefect flow maps them over its task runner: this process, Dask or Ray); either way every
shard is ``score_planned_shard``, and scores do not depend on where it ran.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from paser import progress
from paser.cache import cache_dir, write_folder
from paser.config import to_mapping
from paser.devices import resolve_dtype, scoring_device
from paser.errors import PaserError, ShardError
from paser.ledger import flop_params
from paser.models.load import check_same_tokenizer, load_model, load_pair, load_tokenizer, model_fingerprint
from paser.models.pruning import prune
from paser.selection.runfolder import atomic_parquet, fingerprint, read_run_pool, scored_rows, seal, stage_fingerprint
from paser.selection.settings import Settings
from paser.selection.shards import collect_shards, score_pool_two_pass, score_shard_file, shard_path, shard_ranges


def twin_folder(settings: Settings) -> Path:
    cfg = settings.select
    prune_cfg = dataclasses.replace(settings.prune, ratio=cfg.prune_ratio)
    key = fingerprint(model_fingerprint(cfg.dense), to_mapping(prune_cfg))
    # pruned on a GPU, float rounding may rank near-equal groups differently: a twin of its own
    on = "" if twin_device(settings) == "cpu" else "-cuda"
    return cache_dir() / "twins" / f"{Path(str(cfg.dense)).name}-pruned-{key}{on}"


def twin_device(settings: Settings) -> str:
    """Where paser prunes its own twin: the scoring device (GPU 0 of a GPU machine), else CPU."""
    device = scoring_device(settings.score.device)
    return "cuda" if device.startswith("cuda") and settings.score.device in (None, "cuda") else device


def twin_reference(settings: Settings) -> str:
    """The pruned model: given, or paser's own prune of the dense model (made once, cached)."""
    cfg = settings.select
    if cfg.pruned is not None:
        return cfg.pruned
    folder = twin_folder(settings)
    if not (folder / "paser_pruned.json").is_file():
        progress.announce(f"pruning {cfg.dense} by {cfg.prune_ratio:.0%} into paser's twin on "
                          f"{twin_device(settings)} (once; cached in {folder.parent})")
        prune_cfg = dataclasses.replace(settings.prune, ratio=cfg.prune_ratio)

        device = twin_device(settings)
        on_gpu = device.startswith("cuda")

        def make(tmp: Path) -> None:
            # pruned on a GPU, the twin is saved in the dtype scoring loads it in (bf16: half the disk and
            # host memory of fp32), and the device is emptied for the scoring workers that come next
            prune(cfg.dense, tmp, prune_cfg, trust_pickle=cfg.trust_pickle, device=device,
                  save_dtype=settings.score.dtype if on_gpu and settings.score.dtype != "auto" else None)
            if on_gpu:
                import gc

                import torch

                gc.collect()
                torch.cuda.empty_cache()

        write_folder(folder, make, "paser_pruned.json")  # a process that finished the same twin first wins
    return str(folder)


@dataclass
class ScoringPlan:
    """One scoring run: its fingerprint, the two model references and the shards' record ranges.
    Small and picklable, so shards can be handed to Dask or Ray workers."""

    run: str
    fingerprint: str
    dense: str
    pruned: str
    shards: list[tuple[int, int]]
    rows: list[int] | None = None
    """The pool positions scored, in order (``score.per_cluster``); None: every record. Shard
    ranges index this list."""

    @property
    def shard_dir(self) -> Path:
        return Path(self.run) / "scores" / self.fingerprint

    def records(self) -> list:
        """The records this plan scores, in order (shard ranges index them)."""
        return read_run_pool(Path(self.run), self.rows, fields=False)

    def shard_records(self, index: int) -> list:
        """The records of shard ``index`` alone (a worker parses only the shards it scores)."""
        lo, hi = self.shards[index]
        return read_run_pool(Path(self.run), self.rows[lo:hi] if self.rows is not None else range(lo, hi),
                             fields=False)


def plan_scoring(settings: Settings, run: Path, pruned_ref: str) -> ScoringPlan:
    rows = scored_rows(settings, run)
    n = len(pd.read_parquet(run / "pool.parquet", columns=["id"])) if rows is None else len(rows)
    return ScoringPlan(str(run), stage_fingerprint("score", settings, run, pruned_ref), settings.select.dense,
                       pruned_ref, shard_ranges(n, settings.score.shard_size), rows)


_LOADED: dict = {}
_LOADED_LOCK = threading.Lock()


def loaded_pair(settings: Settings, plan: ScoringPlan):
    """The dense and pruned models of ``plan``, loaded once per process and reused for every shard
    this process scores (a Dask or Ray worker keeps them between shards)."""
    scfg = settings.score
    device = scoring_device(scfg.device)
    dtype = resolve_dtype(scfg.dtype, device)
    key = (model_fingerprint(plan.dense), model_fingerprint(plan.pruned), dtype, device,
           settings.select.trust_pickle)
    with _LOADED_LOCK:
        if key not in _LOADED:
            _LOADED.clear()
            progress.announce(f"loading {plan.dense} and {plan.pruned} on {device} ({dtype})")
            _LOADED[key] = load_pair(plan.dense, plan.pruned, dtype=dtype, device=device,
                                     trust_pickle=settings.select.trust_pickle)
        return _LOADED[key]


def release_models() -> None:
    """Drop the models ``loaded_pair`` keeps in this process, and the CUDA memory they held."""
    with _LOADED_LOCK:
        _LOADED.clear()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_planned_shard(settings: Settings, plan: ScoringPlan, index: int) -> dict:
    """Score shard ``index`` of ``plan`` unless its file exists; returns a small report (record
    range, worker, seconds). A failure raises ``ShardError`` naming the shard and its records."""
    lo, hi = plan.shards[index]
    report = {"shard": index, "records": [lo, hi], "worker": f"{socket.gethostname()}:{os.getpid()}",
              "computed": False, "seconds": 0.0}
    if shard_path(plan.shard_dir, index).is_file():
        return report
    start = time.perf_counter()
    shown = progress.active(plan.fingerprint)  # a display in this process (local engine, in-process)
    on_batch = None if shown is None else (lambda n, tokens: shown.batch(index, n, tokens))
    try:
        dense, pruned = loaded_pair(settings, plan)
        score_shard_file(dense.model, pruned.model, dense.tokenizer, plan.shard_records(index), settings.score,
                         shard_path(plan.shard_dir, index), on_batch)
    except PaserError:
        raise
    except Exception as err:
        ids = pd.read_parquet(Path(plan.run) / "pool.parquet", columns=["id"])["id"]
        if plan.rows is not None:
            ids = ids.iloc[plan.rows].reset_index(drop=True)
        raise ShardError(f"{plan.run}: scoring shard {index} (records {lo}..{hi - 1}, ids {ids[lo]!r}.."
                         f"{ids[hi - 1]!r}) failed: {type(err).__name__}: {err}",
                         transient=isinstance(err, OSError)) from err

    return report | {"computed": True, "seconds": round(time.perf_counter() - start, 3),
                     "models": {"dense": dense.describe(), "pruned": pruned.describe()},
                     "flop_params": {"dense": flop_params(dense.model), "pruned": flop_params(pruned.model)}}


def finish_scoring(settings: Settings, plan: ScoringPlan, reports: list[dict], described: dict | None = None,
                   counted: dict | None = None) -> Path:
    """Collect the finished shards into degradation.parquet, with models.json and scoring.json."""
    run = Path(plan.run)
    scores = collect_shards(plan.records(), settings.score, plan.shard_dir)
    atomic_parquet(scores, run / "degradation.parquet")
    computed = [r for r in reports if r.get("computed")]
    described = described or (computed[0]["models"] if computed else {})
    # the ledger's parameter counts: from this run's models, else from an earlier models.json of the same models
    counted = counted or (computed[0].get("flop_params", {}) if computed else {})
    earlier = json.loads((run / "models.json").read_text()) if (run / "models.json").is_file() else {}
    (run / "models.json").write_text(json.dumps({
        which: {"reference": ref, "fingerprint": model_fingerprint(ref),
                "description": described.get(which, "reused finished shards"),
                "flop_params": counted.get(which) or (earlier.get(which, {}).get("flop_params")
                                                     if earlier.get(which, {}).get("fingerprint")
                                                     == model_fingerprint(ref) else None)}
        for which, ref in (("dense", plan.dense), ("pruned", plan.pruned))}, indent=2))
    (run / "scoring.json").write_text(json.dumps({
        "fingerprint": plan.fingerprint, "shards": sorted(reports, key=lambda r: r["shard"])}, indent=2))
    seal(run / "degradation.parquet", plan.fingerprint)
    release_models()
    return run / "degradation.parquet"


def _score_two_pass(settings: Settings, plan: ScoringPlan) -> dict:
    cfg, scfg = settings.select, settings.score
    device = scoring_device(scfg.device)
    kwargs = dict(dtype=resolve_dtype(scfg.dtype, device), trust_pickle=cfg.trust_pickle, device=device)
    described, counted = {}, {}

    def load(which: str, reference: str):
        loaded = load_model(reference, **kwargs, tokenizer_from=plan.dense if which == "pruned" else None)
        described[which], counted[which] = loaded.describe(), flop_params(loaded.model)
        return loaded.model

    tokenizer = load_tokenizer(plan.dense, cfg.trust_pickle) or load_model(plan.dense, **kwargs).tokenizer
    pruned_tok = load_tokenizer(plan.pruned, cfg.trust_pickle, tokenizer_from=plan.dense)
    if pruned_tok is not None:
        check_same_tokenizer(tokenizer, pruned_tok, plan.dense, plan.pruned)
    score_pool_two_pass(lambda: load("dense", plan.dense), lambda: load("pruned", plan.pruned), tokenizer,
                        plan.records(), scfg, plan.shard_dir, progress=cfg.progress)
    return described, counted


def scoring_progress(settings: Settings, plan: ScoringPlan) -> progress.ScoringProgress:
    """The scoring display of ``plan``, registered so that shards scored in this process report
    their batches to it until it is closed."""
    total = plan.shards[-1][1] if plan.shards else 0
    shards = f"{len(plan.shards)} shard{'s' if len(plan.shards) != 1 else ''}"
    progress.announce(f"scoring degradation of {total:,} records ({shards}, engine {settings.distribute.engine})")
    shown = progress.ScoringProgress(total, "degradation (JSD, both models)", settings.select.progress)
    progress.register(plan.fingerprint, shown)
    return shown


def score_shards_here(settings: Settings, plan: ScoringPlan) -> list[dict]:
    """Every shard of ``plan`` in this process, one after another, on one progress display."""
    reports = []
    with scoring_progress(settings, plan) as shown:
        for i, (lo, hi) in enumerate(plan.shards):
            reports.append(score_planned_shard(settings, plan, i))
            shown.shard_done(i, hi - lo, reports[-1]["computed"])
    return reports


ShardMap = Callable[[Settings, ScoringPlan], list[dict]]


def run_scoring(settings: Settings, plan: ScoringPlan, map_shards: ShardMap | None = None) -> Path:
    """Score ``plan`` and collect it into degradation.parquet. ``score.two_pass`` scores in this
    process, one model loaded at a time; otherwise ``map_shards`` (default ``score_shards_here``)
    scores the shards and returns their reports."""
    if settings.score.two_pass:
        return finish_scoring(settings, plan, [], *_score_two_pass(settings, plan))
    return finish_scoring(settings, plan, (map_shards or score_shards_here)(settings, plan))
