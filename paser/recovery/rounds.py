"""Adaptive recovery in rounds (``--method adaptive``, paser.selection.adaptive): each round's
records drawn with the current cluster shares, trained, the gaps measured on the probe, the shares
moved; one optimizer and schedule over every round, resumable round by round.

    python -c "from paser.recovery.rounds import recover_in_rounds; print(recover_in_rounds.__doc__)"
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np

from paser.cache import write_json
from paser.data.pools import load_pool
from paser.errors import ConfigError
from paser.ledger import flop_params
from paser.recovery.config import RecoverConfig
from paser.recovery.job import Job, RecoveryResult
from paser.recovery.losses import Example, scored_tokens, validation_rows
from paser.recovery.plan import cut_into, epoch_order
from paser.recovery.teacher import load_dense, resolve_teacher
from paser.selection.adaptive import draw_round, plan_path, remaining_gap, round_seed, round_steps, update_shares
from paser.selection.runfolder import selection_table
from paser.selection.settings import Settings


def recover_in_rounds(model: str, data: str, out: Path, config: RecoverConfig, plan: dict,
                      val_data: str | None = None, trust_pickle: bool = False, restart: bool = False) -> RecoveryResult:
    """Recovery of an adaptive selection (its ``plan``, rounds.json): round after round, draw the
    round's records with the current cluster shares, train them for the recipe's epochs (one
    optimizer and learning-rate schedule over every round), measure each cluster's remaining gap on
    the probe and move the shares (paser.selection.adaptive). Each round's draw and gaps are kept in
    OUT/rounds.json, so a killed run resumes in the round it was in and draws what it drew."""
    _check_rounds(config, plan)
    run = Path(plan["run"])
    settings = Settings.from_dict(json.loads((run / "settings.json").read_text()))
    pool, table = selection_table(settings, run)
    by_id = {r.id: r for r in pool}
    val = load_pool(val_data).records if val_data is not None else []
    identity = [hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest(), "adaptive rounds"]
    job = Job.open(model, data, out, config, trust_pickle, restart, identity)
    config, val_ex = job.config, job.encode(val)
    reference = resolve_teacher(config, str(run / "selected.jsonl"))
    history_path = out / "rounds.json"
    if restart:
        history_path.unlink(missing_ok=True)
    history = json.loads(history_path.read_text()) if history_path.is_file() else {}
    if history.get("fingerprint") != job.fingerprint:
        history = {"fingerprint": job.fingerprint, "rounds": []}
    job.start([])
    probe_ex = job.encode([by_id[i] for i in plan["probe"]])
    probe_labels = table.set_index("id").loc[plan["probe"], "cluster"].to_numpy()
    k = plan["clusters"]
    probe_tokens, probe_positions = sum(len(e.ids) for e in probe_ex), sum(scored_tokens(e) for e in probe_ex)

    def measure(net) -> list[float]:  # each cluster's mean response NLL on its probe records
        sums, counts = validation_rows(net, probe_ex, job.pad_id, job.device, config.steps.micro_batch_size)
        total = np.bincount(probe_labels, weights=sums, minlength=k)
        tokens = np.bincount(probe_labels, weights=counts, minlength=k)
        return np.where(tokens > 0, total / np.maximum(tokens, 1), np.nan).tolist()

    def count(name: str, params: dict, reused: bool) -> None:  # a probe pass in the ledger
        job.ledger.forward("probe", name, params, probe_tokens, probe_positions, reused=reused)

    reused = "dense" in history
    if not reused:  # the probe under the dense model (loaded once) and the pruned one
        dense = load_dense(reference, config, trust_pickle, job.device)
        history["dense"], history["dense_params"] = measure(dense.model), flop_params(dense.model)
        del dense
        history["pruned"] = measure(job.peft_model)  # the adapters start at zero: the pruned model
        write_json(history_path, history)
    count(str(reference), history["dense_params"], reused)
    count(str(model), job.student_params, reused)
    epochs = int(config.steps.epochs)
    per_epoch = (math.floor(plan["budget"] / config.steps.batch_tokens + 0.5) if plan["unit"] == "tokens"
                 else math.ceil(plan["budget"] / config.steps.batch_size))
    per_round = round_steps(plan["amounts"], max(per_epoch, len(plan["amounts"])))
    total = epochs * sum(per_round)
    shares, base, taken = np.asarray(plan["base_shares"]), np.asarray(plan["base_shares"]), set(plan["probe"])
    train_ex: list[Example] = []
    steps: list[list[int]] = []
    t0 = time.perf_counter()
    for r, amount in enumerate(plan["amounts"]):
        if r < len(history["rounds"]):  # drawn before a resume: the same records
            shares, ids = np.asarray(history["rounds"][r]["shares"]), history["rounds"][r]["ids"]
        else:
            ids = draw_round(table, shares, amount, plan["unit"], taken, round_seed(plan["seed"], r)).selected["id"]
            ids = ids.tolist()
            history["rounds"].append({"round": r + 1, "shares": shares.tolist(), "ids": ids})
            write_json(history_path, history)
        taken |= set(ids)
        first = len(train_ex)
        train_ex += job.encode([by_id[i] for i in ids])
        lengths = [len(e.ids) for e in train_ex]
        if per_round[r] > len(ids):
            raise ConfigError(f"round {r + 1} drew {len(ids)} records, fewer than its {per_round[r]} steps; "
                              "use fewer rounds or a larger budget")
        for epoch in range(epochs):
            order = [first + i for i in epoch_order(len(ids), epoch, config.steps.seed + 1_000 * (r + 1))]
            steps += cut_into(order, lengths, per_round[r])
        record = history["rounds"][r]
        if len(job.log) < len(steps) and not job.finished:
            job.train(train_ex, val_ex, steps, total, stop_at=len(steps))
        elif "rho" not in record and r + 1 < len(plan["amounts"]):  # killed between training and measuring
            job.load_checkpoint_adapter()
        if r + 1 < len(plan["amounts"]):
            count(str(model), job.student_params, "rho" in record)
        if r + 1 < len(plan["amounts"]) and "rho" not in record:
            record["nll"] = measure(job.peft_model)
            rho = remaining_gap(np.asarray(record["nll"]), np.asarray(history["dense"]),
                                np.asarray(history["pruned"]))
            finite = np.isfinite(rho)  # a cluster without probe records keeps the mean: no move
            rho = np.where(finite, rho, float(shares[finite] @ rho[finite]) / max(shares[finite].sum(), 1e-12))
            record["rho"] = rho.tolist()
            record["next_shares"] = update_shares(shares, base, rho, plan["settings"]["step"],
                                                  plan["settings"]["floor"]).tolist()
            write_json(history_path, history)
        if r + 1 < len(plan["amounts"]):
            shares = np.asarray(record["next_shares"])
    if job.finished:
        job.load_finished_adapter()
    seconds = time.perf_counter() - t0
    rounds = [{"round": h["round"], "records": len(h["ids"]),
               "tokens": int(sum(len(e.ids) for e in job.encode([by_id[i] for i in h["ids"]]))),
               "shares": h["shares"], "rho": h.get("rho")} for h in history["rounds"]]
    result = job.finish(train_ex, val_ex, steps, seconds,
                        data_summary={"data": str(data), "train_records": len(train_ex), "val_records": len(val)},
                      extra={"adaptive": {"plan": str(plan_path(data)), "rounds": rounds,
                                          "probe_records": len(probe_ex), "dense_probe_nll": history["dense"],
                                          "pruned_probe_nll": history["pruned"]}})
    job.release()
    return result


def _check_rounds(config: RecoverConfig, plan: dict) -> None:
    """What adaptive rounds support: SFT, whole epochs, the budget's unit in the batches."""
    if config.loss.objective != "sft" or config.loss.token_weighting > 0:
        raise ConfigError("adaptive rounds train with plain SFT (objective sft, token_weighting 0)")
    steps = config.steps
    if steps.epochs != int(steps.epochs) or steps.max_steps is not None or steps.patience is not None:
        raise ConfigError("adaptive rounds train whole epochs per round: no fractional epochs, max_steps or patience")
    if (plan["unit"] == "tokens") != (config.steps.batch_tokens is not None):
        raise ConfigError(f"an adaptive budget in {plan['unit']} trains in batches of {plan['unit']}: "
                          + ("give batch_tokens (--batch-tokens)" if plan["unit"] == "tokens"
                             else "leave batch_tokens out"))
