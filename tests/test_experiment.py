"""The decisive recovery experiment's script at smoke size on tiny models: arms run, results are
written one file per arm, a rerun skips them, and the report compares PASER with random."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.slow
def test_smoke_experiment_runs_resumes_and_reports(tiny_pair, tmp_path, capsys):
    import decisive_experiment as exp

    dense, pruned = tiny_pair
    argv = ["--settings", "suite-25", "--dense", dense, "--pruned", pruned, "--smoke", "--out", str(tmp_path / "work"),
            "--results", str(tmp_path / "results"), "--arms", "rec:paser", "rec:random-0", "rec:random-1",
            "tok:paser", "tok:random-0", "tok:random-1", "rec:paser#1", "rec:paser~conv", "tok:paser@distill",
            "tok:random-0@distill", "tok:random-1@distill"]
    exp.main(argv)
    files = sorted(p.name for p in (tmp_path / "results" / "suite-25").glob("*.json"))
    assert files == sorted(["dense.json", "none.json", "rec-paser.json", "rec-random-0.json", "rec-random-1.json",
                            "tok-paser.json", "tok-random-0.json", "tok-random-1.json", "rec-paser-seed1.json",
                            "rec-paser-conv.json", "tok-paser-distill.json", "tok-random-0-distill.json",
                            "tok-random-1-distill.json"])
    row = json.loads((tmp_path / "results" / "suite-25" / "tok-paser.json").read_text())
    assert row["budget_unit"] == "tokens" and row["selected_tokens"] <= row["budget"]
    assert row["batch_unit"] == "tokens" and row["steps"] == 2
    assert row["suite"]["removed_overlap"] > 0  # the held-out suite leaves out the pool's prompts
    conv = json.loads((tmp_path / "results" / "suite-25" / "rec-paser-conv.json").read_text())
    assert conv["val_loss"] is not None and "stopped_early" in conv
    text = (tmp_path / "results" / "results.md").read_text()
    assert "rec:paser minus the random mean" in text and "tok:paser minus the random mean" in text
    assert text.startswith("## Summary: every method minus the random mean") and "| suite-25 | record budget |" in text
    assert "paired bootstrap 95%" in text and "Per family (suite-25" in text
    assert "tok: distillation against SFT" in text and "JSD to dense: PASER" in text
    assert "- rec:paser over recovery seeds [0, 1]:" in text and "- rec:paser~conv: " in text
    # the token budget's per-family table: PASER against the SFT random arms only (not their @distill runs)
    table = text.split("Per family (suite-25, 20% token budget)")[1].split("\n\n")[1].splitlines()[2:]
    family, *cells = [c.strip() for c in table[0].strip("|").split("|")]
    nll = {a: json.loads((tmp_path / "results" / "suite-25" / f"{a}.json").read_text())["suite"]["answer_nll"][family]
           for a in ("tok-paser", "tok-random-0", "tok-random-1")}
    expected = nll["tok-paser"] - (nll["tok-random-0"] + nll["tok-random-1"]) / 2
    assert float(cells[7]) == pytest.approx(expected, abs=1e-3)
    kd = json.loads((tmp_path / "results" / "suite-25" / "tok-paser-distill.json").read_text())
    assert kd["steps"] == row["steps"] and kd["selected_tokens"] == row["selected_tokens"]
    assert kd["jsd"]["suite"]["mean"] > 0 and len(kd["jsd"]["suite"]["per_record"]["jsd"]) == kd["suite"]["records"]
    capsys.readouterr()
    exp.main(argv)  # every arm is on file: nothing runs again
    assert ": metric " not in capsys.readouterr().out
    # an arm finished before the JSD was measured gets it from its saved adapter
    path = tmp_path / "results" / "suite-25" / "tok-random-0.json"
    before = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in before.items() if k != "jsd"}))
    exp.main([*argv, "--add-jsd"])
    assert json.loads(path.read_text())["jsd"]["suite"]["mean"] == pytest.approx(before["jsd"]["suite"]["mean"],
                                                                                 rel=1e-5)
    assert capsys.readouterr().out.count("JSD to dense added") == 1
    # the work folder is not committed: on a machine without it the report still prints from the arm JSONs
    # and says which table it left out, and why
    report = ["--report-only", "--out", str(tmp_path / "work"), "--results", str(tmp_path / "results")]
    exp.main(report)
    before = (tmp_path / "results" / "results.md").read_text()
    shutil.rmtree(tmp_path / "work")
    exp.main(report)
    after = (tmp_path / "results" / "results.md").read_text()
    assert after.split("Per family")[0] == before.split("Per family")[0]
    assert (f"Per family (suite-25, 20% token budget): not printed, the work folder lacks {tmp_path / 'work'}"
            f"/suite-25/pool.jsonl, ") in after and "Per family (suite-25, 20% token budget): degradation" in before


@pytest.mark.slow
def test_alpaca_smoke_reports_where_paser_put_its_tokens(tiny_pair, tmp_path):
    import decisive_experiment as exp

    from paser.data.pools import write_jsonl
    from paser.data.suite import generate_suite

    dense, pruned = tiny_pair
    alpaca = tmp_path / "alpaca.jsonl"  # Alpaca-layout records (the suite's, without id and family)
    write_jsonl(alpaca, [{k: r[k] for k in ("instruction", "input", "output")} for r in generate_suite(80, 3)])
    exp.main(["--settings", "alpaca-25", "--dense", dense, "--pruned", pruned, "--smoke", "--alpaca", str(alpaca),
              "--out", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
              "--arms", "tok:paser", "tok:random-0", "tok:random-1"])
    text = (tmp_path / "results" / "results.md").read_text()
    block = text.split("Per cluster (alpaca-25, 20% token budget)")[1].split("\n\n")
    table = block[1].splitlines()[2:]
    clusters = json.loads((tmp_path / "work" / "alpaca-25" / "subsets" / "tok-paser.clusters.json").read_text())
    assert len(table) == len(clusters["clusters"])
    # each cluster's PASER tokens are those its subset took there; the held-out records are all assigned
    taken = {c["cluster"]: c["selected_tokens"] for c in clusters["clusters"]}
    assert {int(r.split(" | ")[0][2:]): int(r.split(" | ")[3]) for r in table} == taken
    assert sum(int(r.split(" | ")[2]) for r in table) == 12
    assert "- favoured clusters [" in block[2] and "- starved clusters [" in block[2]
    # a subset selected again that is not the one the arm trained is not described as if it were
    path = tmp_path / "results" / "alpaca-25" / "tok-paser.json"
    trained = json.loads(path.read_text())
    path.write_text(json.dumps(trained | {"selected_tokens": trained["selected_tokens"] + 2}))
    exp.main(["--report-only", "--out", str(tmp_path / "work"), "--results", str(tmp_path / "results")])
    line = (tmp_path / "results" / "results.md").read_text().split("Per cluster (alpaca-25, 20% token budget)")[1]
    assert line.startswith(": not printed, the work folder's subsets are not the ones the arms trained (tok-paser has "
                           f"{trained['selected']} records and {trained['selected_tokens']:,} tokens, the arm trained ")
    path.write_text(json.dumps(trained))
    (tmp_path / "work" / "alpaca-25" / "subsets" / "tok-random-1.scores.parquet").unlink()
    exp.main(["--report-only", "--out", str(tmp_path / "work"), "--results", str(tmp_path / "results")])
    line = (tmp_path / "results" / "results.md").read_text().split("Per cluster (alpaca-25, 20% token budget)")[1]
    assert line.startswith(": not printed, the work folder lacks ") and line.split("\n")[0].count(".parquet") == 1


def test_arm_objectives_and_a_group_bootstrap():
    import decisive_experiment as exp
    import numpy as np

    assert exp.objective_of("tok:paser") == {"objective": "sft"}
    assert exp.objective_of("tok:random-0@distill") == {"objective": "distill"}
    assert exp.objective_of("tok:random-1@distill-jsd#2") == {"objective": "distill", "divergence": "jsd"}
    assert exp.objective_of("tok:random-1@distill-t2~conv") == {"objective": "distill", "temperature": 2.0}
    with pytest.raises(SystemExit, match="unknown objective option"):
        exp.objective_of("tok:paser@distill-kl2")
    assert exp.objective_of("tok:random-3@tokw") == {"objective": "sft", "token_weighting": 0.5,
                                                     "token_signal": "excess"}
    assert exp.objective_of("tok:paser@self") == {"objective": "sft", "responses": "dense", "answer_tokens": 128}
    assert exp.strat_sections("strat-c1i0d-1")["score"]["per_cluster"] == exp.STRAT_PER_CLUSTER
    assert exp.strat_sections("strat-c0i1d-0") == {"sample": {"cds_temperature": 0.0, "ies_temperature": 1.0,
                                                              "dedup": 0.95}, "score": {"signal": "jsd",
                                                                                        "per_cluster": None}}
    from paser.selection.settings import Settings  # a configuration without d keeps every record through Settings
    assert Settings.load(None, exp.strat_sections("strat-c0i0-1")).sample.dedup is None
    frozen = Settings.load(None, exp.strat_sections("strat")).sample  # strat alone: the frozen defaults
    assert (frozen.cds_temperature, frozen.ies_temperature, frozen.dedup) == (1.0, 1.0, 0.95)

    def row(values):  # a suite arm: two families, per-record answer NLL
        return {"suite": {"per_record": {"family": ["a", "a", "b"], "nll": list(values)}}}

    # several arms on one side: the interval is that of their mean, and a constant shift is exact
    lo, hi = exp.paired_bootstrap([row([1, 2, 3]), row([3, 4, 5])], [row([0, 1, 2]), row([2, 3, 4])], "suite")
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    one = exp.paired_bootstrap(row([1, 2, 3]), [row([0, 1, 2])], "suite")
    assert one == exp.paired_bootstrap([row([1, 2, 3])], [row([0, 1, 2])], "suite")
    assert np.all(np.isfinite(one))


def test_recovery_seed_and_convergence_lines():
    import decisive_experiment as exp

    def row(values, **extra):  # a suite arm: two families, per-record answer NLL, macro = mean of family means
        macro = ((values[0] + values[1]) / 2 + values[2]) / 2
        return {"suite": {"answer_nll_macro": macro, "per_record": {"family": ["a", "a", "b"], "nll": list(values)}},
                "steps": 50} | extra

    conv = {"planned_steps": 250, "stopped_early": True, "val_loss": 1.5, "best_step": 40}
    rows = {"rec:random-0": row([2, 2, 2]), "rec:random-1": row([4, 4, 4]),
            "rec:paser": row([1, 1, 1]), "rec:paser#1": row([2, 2, 2]), "rec:paser#2": row([3, 3, 3]),
            "rec:paser@distill#1": row([9, 9, 9]),  # another objective's seed, without its seed 0: no line
            "rec:paser@tokw": row([1, 1, 1]), "rec:paser@tokw#1": row([3, 3, 3]), "rec:paser@tokw#2": row([2, 2, 2]),
            "rec:paser#1~conv": row([8, 8, 8], **conv),  # re-seeded ~conv: not a recovery seed here
            "rec:paser~conv": row([0, 0, 0], **conv), "rec:random-0~conv": row([1, 1, 1], **conv),
            "rec:random-1~conv": row([3, 3, 3], **conv), "rec:paser@tokw~conv": row([1, 1, 1], **conv)}
    seeds = exp.seed_lines(rows, "suite")
    assert "random subsets 3.0000 ± 1.4142 over 2 subsets" in seeds[1]
    assert seeds[2].startswith("- rec:paser over recovery seeds [0, 1, 2]: 2.0000 ± 1.0000 (1.0000, 2.0000, 3.0000)")
    assert "mean minus the random mean -1.0000 (paired bootstrap 95% over held-out records [-1.0000, -1.0000]" \
        in seeds[2]
    # seeds 1, 2, 3 against subsets 2, 4: difference -1, standard error sqrt(1/3 + 2/2), Welch's df
    # (4/3)^2 / ((1/3)^2 / 2 + 1) = 1.684, t quantile 5.1765: -1 -+ 5.977
    assert "over runs, Welch t 95% with the seeds and the random subsets as samples [-6.9770, +4.9770])" in seeds[2]
    # a recovery variant retrained is judged by the same rule: its seeds against the SFT random subsets
    assert seeds[3].startswith("- rec:paser@tokw over recovery seeds [0, 1, 2]: 2.0000 ± 1.0000 "
                               "(1.0000, 3.0000, 2.0000); its mean minus the random mean -1.0000")
    assert len(seeds) == 4
    lines = exp.convergence_lines(rows, "suite")
    assert "- rec:paser~conv: 0.0000 after 50 of 250 planned steps (stopped early; best validation loss 1.5000 at " \
           "step 40, the adapter kept); at 50 steps 1.0000" in lines
    last = lines[-1]
    assert last.startswith("- rec:paser minus the converged random mean (rec:random-0, rec:random-1): -2.0000")
    assert "at the recipe's steps, the same subsets: -2.0000 [-2.0000, -2.0000]" in last
    # a recovery variant converged is set against the converged SFT random arms too
    assert lines[-2].startswith("- rec:paser@tokw minus the converged random mean (rec:random-0, rec:random-1): "
                                "-1.0000") and "the same subsets: -2.0000" in lines[-2]


def test_strat_sweep_choice_follows_the_registered_rule():
    import decisive_experiment as exp

    def row(macro):
        return {"suite": {"answer_nll_macro": macro}}

    rows = {"tok:random-0": row(1.30), "tok:random-1": row(1.34)}  # sd 0.0283, half 0.0141
    values = {"c0i0": (1.33, 1.33), "c0i0d": (1.32, 1.32), "c1i0d": (1.31, 1.30), "c0i1d": (1.30, 1.29),
              "c1i1d": (1.31, 1.31)}
    for config, (a, b) in list(values.items())[:-1]:
        rows[f"tok:strat-{config}-0"], rows[f"tok:strat-{config}-1"] = row(a), row(b)
    rows["tok:strat-c1i1d-0"] = row(1.31)
    assert exp.strat_choice_lines(rows, "suite")[-1] == "- choice: not yet (every configuration needs both seeds)"
    rows["tok:strat-c1i1d-1"] = row(1.31)
    lines = exp.strat_choice_lines(rows, "suite")
    assert "random subsets' sd 0.0283, half of it 0.0141" in lines[1]
    assert "- strat-c0i1d (scores every record): 1.2950 (1.3000, 1.2900)" in lines
    # best 1.295 (c0i1d); within 0.0141 of it (<= 1.3091): c1i0d 1.305, which scores fewer records
    assert lines[-1].startswith("- choice by the registered rule: strat-c1i0d (within half the random sd of the "
                                "best: strat-c1i0d, strat-c0i1d;")
    rows["tok:strat-c0i0d-0"] = row(1.29)  # c0i0d now 1.305 (no model at all) is near too, and wins
    assert exp.strat_choice_lines(rows, "suite")[-1].startswith("- choice by the registered rule: strat-c0i0d")
    rows["tok:strat-c0i1d-0"] = row(1.25)  # now only c0i1d is near the best
    chosen = exp.strat_choice_lines(rows, "suite")[-1]
    assert "strat-c0i1d (within half the random sd of the best: strat-c0i1d;" in chosen


def test_summary_compares_every_method_with_the_random_mean(tmp_path):
    import decisive_experiment as exp

    def row(arm, values, selection=0.0):  # a suite arm as in the test above, its JSD and compute
        macro = ((values[0] + values[1]) / 2 + values[2]) / 2
        return {"arm": arm, "steps": 50,
                "suite": {"answer_nll_macro": macro, "per_record": {"family": ["a", "a", "b"], "nll": list(values)}},
                "jsd": {"suite": {"mean": values[0] / 8, "per_record": {"jsd": [v / 8 for v in values]}}},
                "compute": {"selection": {"flops_total": selection}, "recovery": {"flops_total": 10.0}}}

    folder = tmp_path / "suite-25"
    folder.mkdir()
    for arm, values, selection in (("rec:random-0", [2, 2, 2], 0), ("rec:random-1", [4, 4, 4], 0),
                                   ("rec:longest", [5, 5, 5], 0), ("rec:uniform", [3, 3, 3], 25),
                                   ("rec:paser", [1, 1, 1], 25), ("tok:paser", [1, 1, 1], 25),
                                   ("tok:random-0", [2, 2, 2], 0)):  # one random seed: no comparison at this budget
        (folder / f"{exp._file(arm)}.json").write_text(json.dumps(row(arm, values, selection)))
    table = exp.summary(exp.compare_all(tmp_path)).splitlines()
    body = [line for line in table if line.startswith("| suite-25")]
    assert [line.split(" | ")[4] for line in body] == ["rec:paser", "rec:uniform", "rec:longest"]
    # JSD 0.125 against 0.375; selection 25 + recovery 10 against random's 0 + 10
    assert body[0] == ("| suite-25 | record budget | 50 | 3.0000 ± 1.4142 (2) | rec:paser | 1.0000 | -2.0000 | "
                       "[-2.0000, -2.0000] | [-2.0000, -2.0000] | below all | -0.2500 [-0.2500, -0.2500] | 3.50 | "
                       "candidate: recovery seeds #1, #2 pending |")
    assert body[1].endswith("| +0.0000 | [+0.0000, +0.0000] | [+0.0000, +0.0000] | inside | +0.0000 [+0.0000, "
                            "+0.0000] | 3.50 | level |")
    assert body[2].endswith("| +2.0000 | [+2.0000, +2.0000] | [+2.0000, +2.0000] | above all | +0.2500 [+0.2500, "
                            "+0.2500] | 1.00 | worse |")

    def paser_verdict():
        return [line for line in exp.summary(exp.compare_all(tmp_path)).splitlines()
                if line.startswith("| suite-25 | record budget") and " | rec:paser | " in line][0].split(" | ")[-1]

    (folder / f"{exp._file('rec:paser#1')}.json").write_text(json.dumps(row("rec:paser#1", [1, 1, 1], 25)))
    assert paser_verdict() == "candidate: recovery seeds #2 pending |"
    # rule (c): seeds 0-2 at 1, 1 and 8 average 3.3333, not below the random mean 3
    (folder / f"{exp._file('rec:paser#2')}.json").write_text(json.dumps(row("rec:paser#2", [8, 8, 8], 25)))
    assert paser_verdict() == "not confirmed: mean over recovery seeds 0-2 3.3333, not below the random mean |"
    (folder / f"{exp._file('rec:paser#2')}.json").write_text(json.dumps(row("rec:paser#2", [5, 5, 5], 25)))
    assert paser_verdict() == "beats random |"  # 2.3333 < 3
    # the sweep's choice on another setting is named the frozen strat; on the sweep's own it is a sweep arm
    (folder / "rec-strat-c1i1d-0.json").write_text(json.dumps(row("rec:strat-c1i1d-0", [3, 3, 3], 25)))
    sweep = tmp_path / "suite-15"
    sweep.mkdir()
    for arm in ("rec:random-0", "rec:random-1", "rec:strat-c1i1d-0"):
        (sweep / f"{exp._file(arm)}.json").write_text(json.dumps(row(arm, [2, 3, 4], 0)))
    names = [line.split(" | ")[:5] for line in exp.summary(exp.compare_all(tmp_path)).splitlines()
             if "strat" in line]
    assert dict((n[0], n[4]) for n in names) == {"| suite-15": "rec:strat-c1i1d-0",
                                                 "| suite-25": "rec:strat-c1i1d-0 (strat, frozen)"}
    verdicts = {line.split(" | ")[0]: line.split(" | ")[-1] for line in exp.summary(exp.compare_all(tmp_path))
                .splitlines() if "strat" in line}  # the sweep's arms are not judged where they chose
    assert verdicts == {"| suite-15": "sweep arm (chooses the frozen strat; judged on the other settings) |",
                        "| suite-25": "level |"}


def test_equal_compute_arms_scale_the_budget_and_are_compared_apart(tmp_path):
    import decisive_experiment as exp

    def row(arm, values, selection, recovery=10.0):  # compute in TFLOP
        return {"arm": arm, "steps": 50, "selected": 3,
                "suite": {"answer_nll_macro": sum(values) / 3,
                          "per_record": {"family": ["a", "a", "b"], "nll": list(values)}},
                "compute": {"selection": {"flops_total": selection * 1e12},
                            "recovery": {"flops_total": recovery * 1e12}}}

    rows = {"tok:random-0": row("tok:random-0", [2, 2, 2], 0), "tok:random-1": row("tok:random-1", [4, 4, 4], 0),
            "tok:paser": row("tok:paser", [1, 1, 1], 25)}
    # paser spent 25 + 10 against random's 10: 3.5 times the 20% token budget
    assert exp.equal_compute_budget(rows, "tok", "paser") == "0.700000tok"
    with pytest.raises(SystemExit, match="has not run"):
        exp.equal_compute_budget(rows, "tok", "uniform")
    with pytest.raises(SystemExit, match="token budget"):
        exp.equal_compute_budget(rows, "rec", "paser")
    rows["tok:paser"]["compute"]["selection"]["flops_total"] = 45e12  # 5.5 x 20%: more than the pool
    with pytest.raises(SystemExit, match="whole pool"):
        exp.equal_compute_budget(rows, "tok", "paser")
    assert exp._file("tok:random-0=paser") == "tok-random-0-eq-paser"
    rows |= {"tok:random-0=paser": row("tok:random-0=paser", [0, 0, 0], 0, 30),
             "tok:random-1=paser": row("tok:random-1=paser", [0.5, 0.5, 0.5], 0, 40)}
    assert [r["arm"] for r in exp.random_arms(rows, "tok")] == ["tok:random-0", "tok:random-1"]  # not the = arms
    lines = exp.equal_compute_lines(rows, "suite")
    assert lines[1].startswith("At equal total compute")
    # paser 1.0 against 0.0 and 0.5 at its compute: +0.75 on every record, above all; 55 TFLOP against 35
    assert lines[2] == ("- tok:paser 1.0000 against 2 random subsets at its compute 0.2500 ± 0.3536 (records 3/3, "
                        "steps 50/50): +0.7500 [+0.7500, +0.7500] over held-out records; over families "
                        "[+0.7500, +0.7500], above all; compute 55.00 TFLOP against 35.00 (mean)")
    assert exp.equal_compute_lines({k: v for k, v in rows.items() if k != "tok:random-1=paser"}, "suite") == []


def test_an_equal_compute_target_may_be_a_recovery_variant(tmp_path):
    """``tok:random-K=paser@tokw``: random subset K, trained by plain SFT, at the total compute of
    PASER's subset trained token-weighted; the @ belongs to the target, not to the arm's recovery."""
    import types

    import decisive_experiment as exp

    def row(arm, selection, recovery):  # compute in TFLOP
        return {"arm": arm, "compute": {"selection": {"flops_total": selection * 1e12},
                                        "recovery": {"flops_total": recovery * 1e12}}}

    arm = "tok:random-0=paser@tokw"
    assert exp.base_arm(arm) == arm and exp.base_arm("tok:paser@tokw#1") == "tok:paser"
    assert exp.compute_target(arm) == "tok:paser@tokw" and exp._file(arm) == "tok-random-0-eq-paser-tokw"
    assert exp.objective_of(arm) == {"objective": "sft"}
    rows = {"tok:random-0": row("tok:random-0", 0, 10), "tok:random-1": row("tok:random-1", 0, 10),
            "tok:paser": row("tok:paser", 25, 10), "tok:paser@tokw": row("tok:paser@tokw", 25, 12)}
    assert exp.equal_compute_budget(rows, "tok", "paser@tokw") == "0.740000tok"  # (25 + 12) / 10 x 20%
    (tmp_path / "select").mkdir()
    pd.DataFrame({"n_tokens": [10, 30]}).to_parquet(tmp_path / "select" / "tokens.parquet")
    args = types.SimpleNamespace(batch_size=4, micro_batch_size=2, micro_batch_tokens=None, learning_rate=3e-4,
                                 max_steps=None, epochs=2, dense="dense-model")
    plain = exp.recovery_config(arm, {"work": tmp_path}, args)
    assert (plain.loss.objective, plain.loss.teacher, plain.loss.token_weighting, plain.steps.batch_tokens) == (
        "sft", None, 0.0, 80)
    weighted = exp.recovery_config("tok:paser@tokw", {"work": tmp_path}, args)
    assert (weighted.loss.teacher, weighted.loss.token_weighting) == ("dense-model", 0.5)
    with pytest.raises(SystemExit, match="unknown arm"):
        exp.main(["--settings", "suite-25", "--arms", "tok:random-0=nosuch@tokw", "--out", str(tmp_path / "w"),
                  "--results", str(tmp_path / "r")])


@pytest.mark.slow
def test_cluster_lines_split_favoured_and_starved_clusters():
    import decisive_experiment as exp
    import numpy as np

    def row(nll):  # an Alpaca arm: per held-out record its summed NLL over 2 tokens
        return {"heldout": {"per_record": {"nll_sum": [2 * v for v in nll], "tokens": [2] * len(nll)}}}

    where = np.array([0, 0, 1, 1, 2])  # the five held-out records' clusters
    paser = row([1.0, 1.0, 3.0, 3.0, 2.0])  # better than random on cluster 0, worse on 1, level on 2
    randoms = [row([2.0, 2.0, 2.0, 2.0, 2.0]), row([2.0, 2.0, 2.0, 2.0, 2.0])]
    lines = exp.cluster_lines(paser, randoms, where, {0: 0.1, 1: 0.3, 2: 0.2},
                              paser_tokens={0: 50, 1: 10}, random_tokens={0: 20.0, 1: 30.0, 2: 5.0})
    table = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert [line.split(" | ")[0] for line in table] == ["| 1", "| 2", "| 0"]  # by CDS, highest first
    assert table[0] == "| 1 | 0.3000 | 2 | 10 | 30.0 | +1.0000 |"
    assert table[1] == "| 2 | 0.2000 | 1 | 0 | 5.0 | +0.0000 |"
    assert table[2] == "| 0 | 0.1000 | 2 | 50 | 20.0 | -1.0000 |"
    favoured, starved = (line for line in lines if line.startswith("- "))
    assert favoured.startswith("- favoured clusters [0] (2 held-out records): PASER minus the random mean -1.0000")
    assert favoured.endswith("[-1.0000, -1.0000])")
    assert starved.startswith("- starved clusters [1, 2] (3 held-out records): PASER minus the random mean +0.6667")


@pytest.mark.slow
def test_recovery_cost_arms_run_and_report_compute(tiny_pair, tmp_path):
    """The recovery-cost experiment's arms at smoke size: a strat sweep arm (CDS from a per-cluster
    sample), token weighting on random subsets and on PASER's, adaptive rounds and their frozen
    control; each arm records its compute, and the report compares them with random."""
    import decisive_experiment as exp

    dense, pruned = tiny_pair
    arms = ["tok:random-0", "tok:random-1", "tok:paser", "tok:strat-c1i0d-0", "tok:random-0@tokw",
            "tok:random-1@tokw", "tok:paser@tokw", "tok:adaptive", "tok:rounds", "tok:random-0@self",
            "tok:random-2=random-1"]
    exp.main(["--settings", "suite-25", "--dense", dense, "--pruned", pruned, "--smoke", "--out",
              str(tmp_path / "work"), "--results", str(tmp_path / "results"), "--micro-batch-tokens", "256",
              "--arms", *arms])
    folder = tmp_path / "results" / "suite-25"
    rows = {a: json.loads((folder / f"{exp._file(a)}.json").read_text()) for a in arms}
    assert all(r["compute"]["recovery"]["flops_total"] > 0 for r in rows.values())
    assert rows["tok:random-0"]["compute"]["selection"]["flops_total"] == 0  # random needs no model
    # 16 records a cluster: at smoke size every cluster is smaller, so the sample is the whole pool
    assert rows["tok:paser"]["compute"]["selection"]["flops_total"] >= rows["tok:strat-c1i0d-0"]["compute"][
        "selection"]["flops_total"] > 0
    assert rows["tok:random-0@tokw"]["token_weighting"]["strength"] == exp.TOKW_STRENGTH
    assert rows["tok:random-0@tokw"]["steps"] == rows["tok:random-0"]["steps"]
    # self-data distillation: the same records and steps, on the dense model's answers, generation counted
    assert rows["tok:random-0@self"]["steps"] == rows["tok:random-0"]["steps"]
    assert rows["tok:random-0@self"]["selected_tokens"] == rows["tok:random-0"]["selected_tokens"]  # its subset
    assert rows["tok:random-0@self"]["compute"]["recovery"]["flops_by_stage"]["dense answers"] > 0
    # random subset 2 at random-1's total compute: the budget scaled by random-1's compute over the randoms' mean
    ratio = exp.compute_ratio([rows["tok:random-1"]], [rows["tok:random-0"], rows["tok:random-1"]])
    assert rows["tok:random-2=random-1"]["budget"] == pytest.approx(rows["tok:random-0"]["budget"] * ratio, abs=1)
    assert "tok:random-2=random-1" not in [r["arm"] for r in exp.random_arms(exp.load_rows(
        tmp_path / "results", "suite-25"), "tok")]
    assert len(rows["tok:adaptive"]["adaptive"]) == exp.ADAPTIVE["rounds"]
    shares = [r["shares"] for r in rows["tok:rounds"]["adaptive"]]
    assert all(s == shares[0] for s in shares)  # the control's shares never move
    text = (tmp_path / "results" / "results.md").read_text()
    assert "tok:random@tokw (2 subsets)" in text and "| tok:paser@tokw |" in text and "| tok:adaptive |" in text
    assert "tok:random@self (1 subsets)" in text
    assert "compute (selection + recovery) / random's" in text
    # an arm that ran before the ledger gets its compute counted from its folders, the same figures
    recovery_json = tmp_path / "work" / "suite-25" / "recover" / "tok-paser" / "recovery.json"
    done = json.loads(recovery_json.read_text())
    recovery_json.write_text(json.dumps({k: v for k, v in done.items() if k != "compute"}))
    row = rows["tok:paser"]
    (folder / "tok-paser.json").write_text(json.dumps({k: v for k, v in row.items() if k != "compute"}))
    exp.main(["--settings", "suite-25", "--dense", dense, "--pruned", pruned, "--smoke", "--out",
              str(tmp_path / "work"), "--results", str(tmp_path / "results"), "--micro-batch-tokens", "256",
              "--arms", *arms, "--add-compute"])
    again = json.loads((folder / "tok-paser.json").read_text())["compute"]
    assert again["selection"]["flops_total"] == pytest.approx(row["compute"]["selection"]["flops_total"])
    assert again["recovery"]["flops_total"] == pytest.approx(row["compute"]["recovery"]["flops_total"])


def test_verdict_reads_the_mean_over_random_subsets_as_its_own_repeats():
    import decisive_experiment as exp

    below = {"records": (-0.3, -0.1), "place": "below all"}
    assert exp.verdict(below, {}, "tok:random@tokw (5 subsets)", [{}] * 5, [2.0, 3.0], "suite") == "beats random"
    assert exp.verdict(below, {}, "tok:random@tokw (2 subsets)", [{}] * 2, [2.0, 3.0], "suite") == \
        "pending: 2 of 5 subsets (candidate so far)"
    # fewer than five subsets: no verdict either way, the reading so far beside it
    above = {"records": (0.1, 0.3), "place": "inside"}
    assert exp.verdict(above, {}, "tok:random@tokw (2 subsets)", [{}] * 2, [2.0, 3.0], "suite") == \
        "pending: 2 of 5 subsets (worse so far)"
    assert exp.verdict(above, {}, "tok:random@tokw (5 subsets)", [{}] * 5, [2.0, 3.0], "suite") == "worse"
    # below every seed but the interval reaches zero, or inside the seeds with the interval below zero: level
    assert exp.verdict({"records": (-0.3, 0.01), "place": "below all"}, {}, "tok:paser", {}, [2.0], "suite") == "level"
    assert exp.verdict({"records": (-0.3, -0.1), "place": "inside"}, {}, "tok:paser", {}, [2.0], "suite") == "level"


def test_the_whole_pool_is_reported_beside_the_token_budget_and_not_judged():
    import decisive_experiment as exp

    def row(arm, value, recovery):
        return {"arm": arm, "steps": 50, "suite": {"answer_nll_macro": value,
                                                  "per_record": {"family": ["a", "b"], "nll": [value, value]}},
                "compute": {"selection": {"flops_total": 0.0}, "recovery": {"flops_total": recovery}}}

    rows = {"tok:random-0": row("tok:random-0", 2.0, 10.0), "tok:random-1": row("tok:random-1", 3.0, 10.0),
            "full": row("full", 1.0, 50.0)}
    (unit, _, found), = exp.comparisons(rows, "suite")
    full, = found
    assert unit == "tok" and full["arm"] == "full" and full["diff"] == -1.5 and full["compute"] == 5.0
    assert full["place"] == "below all" and full["verdict"] == "reference (the whole pool, not at equal tokens)"


def test_the_fourth_settings_method_is_the_lowest_mean_over_the_other_three():
    import decisive_experiment as exp

    def found(*pairs):  # (arm, method minus random) at the 20% token budget
        return [("tok", (2.0, 0.1, 5), [{"arm": a, "diff": d} for a, d in pairs])]

    values = {"strat": -0.03, "random@tokw": -0.01, "paser@tokw": 0.02, "adaptive": -0.02, "rounds": 0.0,
              "random@self": 0.01, "paser@self": -0.04}
    compared = {}
    for n, setting in enumerate(("suite-25", "suite-15", "alpaca-25")):
        pairs = [(f"tok:{exp.FROZEN_STRAT}", values["strat"] + n * 0.01), ("tok:paser", -0.5), ("full", -1.0),
                 ("tok:strat-c0i0-0", -0.9), ("tok:random@self (4 subsets)", -0.9)]
        pairs += [(f"tok:{m} (5 subsets)" if m.startswith("random@") else f"tok:{m}", v)
                  for m, v in values.items() if m != "strat" and (m != "random@self" or n < 2)]
        compared[setting] = ({}, found(*pairs))
    lines = exp.fourth_setting_choice_lines(compared)
    # paser, full, the sweep's other arms and four of five subsets are no candidates; random@self lacks alpaca-25
    assert "- strat: suite-25 -0.0300, suite-15 -0.0200, alpaca-25 -0.0100; mean -0.0200" in lines
    assert "- random@self: suite-25 +0.0100, suite-15 +0.0100, alpaca-25 not run; mean: not yet" in lines
    assert lines[-1] == "- choice: not yet (random@self not run on every setting)"
    compared["alpaca-25"][1][0][2].append({"arm": "tok:random@self (5 subsets)", "diff": 0.01})
    assert exp.fourth_setting_choice_lines(compared)[-1] == "- choice by the registered rule: paser@self"


def test_the_fourth_settings_choice_is_made_early_only_when_the_missing_runs_cannot_change_it():
    import decisive_experiment as exp

    def compared_with(self_diff):  # random@self run on suite-25 and suite-15 only; random means 2.0
        out = {}
        for setting in ("suite-25", "suite-15", "alpaca-25"):
            pairs = [(f"tok:{exp.FROZEN_STRAT}", -0.03)] + [(f"tok:{m}", 0.05) for m in
                                                           ("paser@tokw", "adaptive", "rounds", "paser@self")]
            pairs += [("tok:random@tokw (5 subsets)", 0.05)]
            if setting != "alpaca-25":
                pairs += [("tok:random@self (5 subsets)", self_diff)]
            out[setting] = ({}, [("tok", (2.0, 0.1, 5), [{"arm": a, "diff": d} for a, d in pairs])])
        return out

    # (1.0 + 1.0 - 2.0) / 3 = 0.0: above strat's -0.03 whatever alpaca-25 gives, since NLL >= 0
    last = exp.fourth_setting_choice_lines(compared_with(1.0))[-1]
    assert last.startswith("- choice by the registered rule: strat (before random@self ran on every setting")
    assert "random@self's at least +0.0000" in last
    # (0.95 + 0.95 - 2.0) / 3 = -0.0333: alpaca-25 could still put it below strat
    assert exp.fourth_setting_choice_lines(compared_with(0.95))[-1] == (
        "- choice: not yet (random@self not run on every setting)")
