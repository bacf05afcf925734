"""paser compare: arms parsed once, budgets at equal compute, the paired bootstrap against a direct
computation, the verdict rule both ways, and a comparison on tiny models that reports, resumes and
refuses to mix settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from paser.comparison import stats
from paser.comparison.arms import parse_arm, parse_arms
from paser.comparison.config import CompareConfig
from paser.comparison.runner import Setup, budget_of, write_atomic
from paser.errors import ConfigError, DataError, PaserError

pytestmark = pytest.mark.usefixtures("prefect_api")  # flows here run against the test process's one Prefect server

BUDGETS = {"tok": "0.2tok", "rec": 0.2}


def test_arm_names_parse_into_typed_arms():
    arm = parse_arm("tok:random-3", BUDGETS)
    assert (arm.method, arm.budget, arm.seed, arm.recovery_seed, arm.is_random) == ("random", "tok", 3, 0, True)
    strat = parse_arm("tok:strat-c1i0d-1", BUDGETS)
    assert strat.strat == (1.0, 0.0, True) and strat.seed == 1
    assert strat.selection()["score"]["per_cluster"] == 16  # CDS from a sample, IES not needed
    assert strat.selection()["sample"] == {"cds_temperature": 1.0, "ies_temperature": 0.0, "dedup": 0.95}
    assert parse_arm("tok:strat-c1i1", BUDGETS).selection()["score"]["per_cluster"] is None
    seeded = parse_arm("rec:paser@distill-jsd-t2#2", BUDGETS)
    assert seeded.recovery_seed == 2 and not seeded.is_random and seeded.subset_name == "rec:paser"
    assert seeded.recovery("dense") == {"seed": 2, "objective": "distill", "teacher": "dense", "divergence": "jsd",
                                        "temperature": 2.0}
    assert parse_arm("tok:paser@tokw", BUDGETS).recovery("d")["token_weighting"] == 0.5
    matched = parse_arm("tok:random-1=strat-c1i0d", BUDGETS)
    assert matched.at_compute_of == "tok:strat-c1i0d" and not matched.is_random
    assert matched.file == "tok-random-1-eq-strat-c1i0d"
    assert parse_arm("tok:loss_gap", BUDGETS).selection()["score"]["signal"] == "loss_gap"
    assert parse_arm("none", BUDGETS).reference


@pytest.mark.parametrize("name, words", [
    ("day:random-0", "budget 'day' is not one of"), ("tok:magic", "unknown method 'magic'"),
    ("tok:paser-c1i0", "configures strat"), ("tok:paser@sing", "unknown recovery variant"),
    ("tok:paser=random-0", "only a plain random subset"), ("random-0", "not none, dense or BUDGET:METHOD"),
])
def test_bad_arm_names_say_what_is_wrong(name, words):
    with pytest.raises(ConfigError, match=words):
        parse_arm(name, BUDGETS)


def test_arm_lists_add_references_and_check_dependencies():
    arms = parse_arms(["tok:random-0", "tok:paser"], BUDGETS)
    assert [a.name for a in arms] == ["none", "dense", "tok:random-0", "tok:paser"]
    with pytest.raises(ConfigError, match="listed twice"):
        parse_arms(["tok:paser", "tok:paser"], BUDGETS)
    with pytest.raises(ConfigError, match="which is not an arm"):
        parse_arms(["tok:random-0", "tok:random-1=paser"], BUDGETS)
    with pytest.raises(ConfigError, match="needs random subsets"):
        parse_arms(["tok:paser", "tok:random-1=paser", "rec:random-0"], BUDGETS)


def _ledger(flops: float) -> dict:
    return {"flops_total": flops}


def _setup(tmp_path, arms: list[str], budgets=None) -> Setup:
    cfg = CompareConfig(budgets=budgets or BUDGETS, arms=arms, out=str(tmp_path))
    return Setup(cfg, tmp_path, None, None, "pruned", None, None, {}, parse_arms(arms, cfg.budgets), {})


def test_budget_at_equal_compute_from_the_ledgers(tmp_path):
    setup = _setup(tmp_path, ["tok:random-0", "tok:random-1", "tok:paser", "tok:random-2=paser", "rec:random-0",
                              "rec:paser", "rec:random-1=paser"], {"tok": "0.2tok", "rec": 0.2})
    arm = next(a for a in setup.arms if a.name == "tok:random-2=paser")
    with pytest.raises(ConfigError, match="must finish first"):
        budget_of(arm, setup)
    for name, selection, recovery in (("tok:random-0", 0, 10.0), ("tok:random-1", 0, 14.0), ("tok:paser", 6.0, 12.0)):
        write_atomic(setup.results / f"{name.replace(':', '-')}.json",
                     {"arm": name, "compute": {"selection": _ledger(selection), "recovery": _ledger(recovery)}})
    # PASER spent 18 where random subsets spent 12 on average: a random subset of 1.5 x 20% of the tokens
    assert budget_of(arm, setup) == "0.300000tok"
    assert budget_of(setup.arms[2], setup) == "0.2tok"  # any other arm: its budget's
    write_atomic(setup.results / "tok-paser.json",
                 {"arm": "tok:paser", "compute": {"selection": _ledger(60.0), "recovery": _ledger(12.0)}})
    with pytest.raises(ConfigError, match="more than recovery on the whole pool"):
        budget_of(arm, setup)
    with pytest.raises(ConfigError, match="fraction of the pool's tokens"):
        budget_of(next(a for a in setup.arms if a.name == "rec:random-1=paser"), setup)


def _rows(values: np.ndarray, tasks=("a", "b")) -> list[dict]:
    """Arms' rows whose lm-eval items are ``values`` (arms x tasks x items, 0/1)."""
    return [{"arm": f"arm{i}", "zeroshot": {"tasks": {t: {"metric": "acc", "items": {
        "doc_id": list(range(values.shape[2])), "acc": values[i, j].tolist()}} for j, t in enumerate(tasks)}}}
        for i in range(values.shape[0])]


def test_paired_bootstrap_matches_a_direct_computation():
    rng = np.random.default_rng(1)
    items = (rng.random((4, 2, 300)) < np.array([0.62, 0.55, 0.5, 0.52])[:, None, None]).astype(float)
    gs = stats.groups(_rows(items), "zeroshot")
    direct_values = items.mean(2).mean(1)  # per task mean, then the mean over tasks
    assert np.allclose(stats.metric_value(gs), direct_values)
    lo, hi = stats.paired_bootstrap(gs, 1, draws=4000, seed=0)
    # direct: resample every task's items with replacement (the same for every arm), many times
    draws = []
    other = np.random.default_rng(7)
    for _ in range(4000):
        picks = [other.integers(0, 300, 300) for _ in range(2)]
        per_arm = np.mean([items[:, j, p].mean(1) for j, p in enumerate(picks)], axis=0)
        draws.append(per_arm[0] - per_arm[1:].mean())
    d_lo, d_hi = np.percentile(draws, [2.5, 97.5])
    assert lo == pytest.approx(d_lo, abs=0.006) and hi == pytest.approx(d_hi, abs=0.006)
    assert lo < direct_values[0] - direct_values[1:].mean() < hi
    # the same items moved by a constant: every draw gives that constant; identical arms give zero
    shifted = stats.groups(_rows(np.stack([items[1] + 0.25, items[1]])), "zeroshot")
    assert stats.paired_bootstrap(shifted, 1, draws=200) == pytest.approx((0.25, 0.25))
    same = stats.groups(_rows(np.stack([items[0], items[0]])), "zeroshot")
    assert stats.paired_bootstrap(same, 1, draws=200) == (0.0, 0.0)


@pytest.mark.parametrize("setting, metric, families", [("suite-25", "suite_nll", True),
                                                       ("alpaca-25", "heldout_nll", False)])
def test_the_recovery_experiments_committed_intervals_are_these_statistics(setting, metric, families):
    """bench/results/recovery-cost/results.md was written before the statistics moved into
    paser.comparison: its PASER line reproduces from the committed arms, digit for digit."""
    root = Path(__file__).resolve().parents[1] / "bench" / "results" / "recovery-cost"
    rows = [json.loads((root / setting / f"tok-{a}.json").read_text())
            for a in ("paser", *(f"random-{k}" for k in range(5)))]
    line = next(ln for ln in (root / "results.md").read_text().splitlines()
                if ln.startswith(f"| {setting} | 20% token budget |") and "| tok:paser |" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    gs = stats.groups(rows, metric)
    values = stats.metric_value(gs)
    assert f"{values[0] - values[1:].mean():+.4f}" == cells[6]
    lo, hi = stats.paired_bootstrap(gs, 1)
    assert f"[{lo:+.4f}, {hi:+.4f}]" == cells[7]
    if families:
        lo, hi = stats.group_bootstrap(gs, 1)
        assert f"[{lo:+.4f}, {hi:+.4f}]" == cells[8]


def test_heldout_nll_is_a_ratio_of_sums_and_items_must_match():
    rows = [{"arm": f"a{i}", "heldout": {"per_record": {"id": ["x", "y"], "nll_sum": [2.0 + i, 6.0],
                                                        "tokens": [2, 6]}}} for i in range(2)]
    gs = stats.groups(rows, "heldout_nll")
    assert stats.metric_value(gs) == pytest.approx([8 / 8, 9 / 8])
    rows[1]["heldout"]["per_record"]["id"] = ["y", "x"]
    with pytest.raises(DataError, match="other items"):
        stats.groups(rows, "heldout_nll")


@pytest.mark.parametrize("higher, value, interval, expected", [
    (True, 0.60, (0.01, 0.05), "beats random"), (True, 0.60, (-0.01, 0.05), "level"),
    (True, 0.40, (-0.05, -0.01), "loses"), (True, 0.50, (0.01, 0.05), "level"),
    (False, 1.80, (-0.05, -0.01), "beats random"), (False, 2.20, (0.01, 0.05), "loses"),
    (False, 2.20, (-0.01, 0.05), "level"),
])
def test_verdict_rule_both_ways(higher, value, interval, expected):
    randoms = [0.45, 0.5, 0.55] if higher else [1.9, 2.0, 2.1]
    assert stats.verdict(value, randoms, interval, higher) == expected


@pytest.mark.parametrize("folder, config, metric", [("zeroshot-claim", "zeroshot-25", None),
                                                     ("suite20k-claim", "suite20k-25", None),
                                                     ("suite20k-claim", "suite20k-25", "zeroshot")])
def test_the_committed_reports_are_what_paser_compare_renders(tmp_path, folder, config, metric):
    """Every committed comparison report is rendered again, word for word, from the committed arms
    (all but its first line, which names the folder, and the picture). bench/results/zeroshot-claim
    (arms run by the bench at a pinned commit) reads as a comparison folder of its config, and its
    seven-task means are the evaluation's own."""
    import shutil

    from paser.comparison import compare

    root = Path(__file__).resolve().parents[1]
    committed = root / "bench" / "results" / folder
    shutil.copytree(committed / "arms", tmp_path / "arms")
    shutil.copyfile(committed / "compare.json", tmp_path / "compare.json")
    extra = {"metric": metric} if metric else {}
    result = compare(root / "configs" / "compare" / f"{config}.yaml", report_only=True, picture=False,
                     out=str(tmp_path), **extra)

    def body(text: str) -> str:
        return "\n".join(ln for ln in text.splitlines()[1:] if not ln.startswith("![")).strip()

    name = "report-zeroshot.md" if metric else "report.md"
    assert body(result.report.read_text()) == body((committed / name).read_text())
    if folder == "zeroshot-claim":
        assert result.rows and "dense" in result.rows
        table = result.report.read_text().split("## Per task")[1]
        for arm, row in result.rows.items():
            cells = next(ln for ln in table.splitlines() if ln.startswith(f"| {arm} |")).strip("|").split("|")
            assert float(cells[8]) == pytest.approx(row["zeroshot"]["paper_mean"]["mean"], abs=6e-5)


def test_the_compute_bench_reads_each_arms_ledger(capsys):
    """bench/compare_compute.py prints each committed arm's selection and recovery FLOPs as its
    ledger holds them, and its total against the random subsets' mean."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("compare_compute", root / "bench" / "compare_compute.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    folder = root / "bench" / "results" / "suite20k-claim"
    bench.main([str(folder)])
    lines = [ln.strip("| ").split(" | ") for ln in capsys.readouterr().out.splitlines() if ln.startswith("| tok4:")]
    printed = {cells[0]: cells for cells in lines}
    found = json.loads((folder / "arms" / "tok4-strat-c1i0d.json").read_text())["compute"]
    cells = printed["tok4:strat-c1i0d"]
    assert float(cells[3].split()[0]) == pytest.approx(found["selection"]["flops_total"] / 1e12, abs=0.006)
    assert float(cells[4]) == pytest.approx(found["recovery"]["flops_total"] / 1e12, abs=0.006)
    assert cells[6] == "1.34x" and printed["tok4:random-0"][6] == "1.00x"


def test_the_generated_suite_is_one_pool_for_every_arm(tmp_path):
    from paser.comparison.runner import split_pool

    pool, heldout = split_pool(CompareConfig(suite_records=30, suite_seed=1), tmp_path)
    lines = Path(pool).read_text().splitlines()
    assert heldout is None and len(lines) == 30
    assert split_pool(CompareConfig(suite_records=30, suite_seed=1), tmp_path) == (pool, None)  # written once
    pool, heldout = split_pool(CompareConfig(suite_records=30, pool_records=20, heldout_records=6), tmp_path / "b")
    kept, held = (Path(f).read_text().splitlines() for f in (pool, heldout))
    assert len(kept) == 20 and len(held) == 6 and not set(kept) & set(held)


def test_bad_input_fails_before_any_arm_runs(tiny_pair, tmp_path):
    from paser.comparison import compare

    dense, pruned = tiny_pair
    base = {"dense": dense, "pruned": pruned, "metric": "heldout_nll", "heldout": str(tmp_path / "held.json"),
            "arms": ["tok:random-0", "tok:random-1", "tok:paser"], "out": str(tmp_path / "cmp")}
    with pytest.raises(PaserError, match="nothing.json"):
        compare(overrides={"compare": base | {"pool": str(tmp_path / "nothing.json")},
                           "evaluate": {"suite_size": 0}})
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i}"}) + "\n" for i in range(5)))
    with pytest.raises(ValueError, match="above the pool"):  # the CLI prints it as one line
        compare(overrides={"compare": base | {"pool": str(pool), "budgets": {"tok": 50},
                                              "out": str(tmp_path / "cmp2")}, "evaluate": {"suite_size": 0}})
    assert not list(tmp_path.rglob("arms/*.json"))


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs" /
                                                         "compare").glob("*.yaml")))
def test_every_shipped_comparison_config_reads(name, tmp_path):
    from paser.comparison import compare

    config = Path(__file__).resolve().parents[1] / "configs" / "compare" / name
    result = compare(config, report_only=True, picture=False, out=str(tmp_path))
    assert result.rows == {} and "not enough arms" in result.summary


def test_the_folder_refuses_other_arms_settings_but_not_another_reading(tmp_path):
    from paser.comparison.runner import remember

    def settings(**compare):
        return {"compare": {"pool": "a.json", "budgets": {"tok": "0.2tok"}, "metric": "zeroshot", "arms": ["x"],
                            "out": "o", "bootstrap": 2000, "new": 3} | compare, "recover": {"lr": 1, "added": 0},
                "evaluate": {}, "selection": {}}

    # "new" and "added": settings paser gained after the folder was started, at their defaults
    defaults = {"compare": {"pool": None, "budgets": {}, "metric": "zeroshot", "arms": [], "out": "o",
                            "bootstrap": 2000, "new": 3}, "recover": {"lr": 1, "added": 0}, "evaluate": {}}
    started = settings()
    del started["compare"]["new"], started["recover"]["added"]  # a folder started before they existed
    remember(tmp_path, started, defaults)
    remember(tmp_path, settings(metric="heldout_nll", bootstrap=500, arms=["y"], out="p"), defaults)
    remember(tmp_path, settings(budgets={"tok": "0.2tok", "rec": 0.2}), defaults)  # a budget added
    held = json.loads((tmp_path / "compare.json").read_text())
    assert held["compare"]["budgets"] == {"tok": "0.2tok", "rec": 0.2} and "metric" not in held["compare"]
    for changed, words in ((settings(pool="b.json"), "compare.pool"), (settings(new=4), "compare.new"),
                           (settings(budgets={"tok": "0.1tok"}), "compare.budgets.tok")):
        with pytest.raises(ConfigError, match=words):
            remember(tmp_path, changed, defaults)
    with pytest.raises(ConfigError, match="recover.lr"):
        remember(tmp_path, settings() | {"recover": {"lr": 2, "added": 0}}, defaults)
    # a folder started when the prompt format was keys of the recover section holds it as the prompt's
    old, recover = tmp_path / "old", {"lr": 1, "added": 0}
    remember(old, settings() | {"recover": recover | {"template": "alpaca", "cutoff": 256}}, defaults)
    remember(old, settings() | {"recover": recover | {"prompt": {"template": "alpaca", "cutoff": 256}}}, defaults)
    with pytest.raises(ConfigError, match="recover.prompt"):
        remember(old, settings() | {"recover": recover | {"prompt": {"template": "alpaca", "cutoff": 512}}}, defaults)


def test_the_summary_says_what_to_use():
    from paser.comparison.report import Line, summary

    cfg = CompareConfig()
    won = Line("tok:strat", "tok", 0.45, 0.02, (0.01, 0.03), (0.0, 0.04), "better than all", 2e12, 1.6,
               "beats random over 3 recovery seeds (mean 0.4500, [+0.0100, +0.0300])")
    equal = Line("tok:strat at equal compute", "tok", 0.45, 0.005, (-0.005, 0.015), (0.0, 0.01), "inside", 2e12, 1.0,
                 "level")
    lost = Line("tok:paser", "tok", 0.40, -0.03, (-0.05, -0.01), (-0.06, 0.0), "worse than all", 5e12, 3.0, "loses")
    text = summary(cfg, [won, equal, lost], "twin")
    assert text[0].startswith("**On twin, at budget tok: use tok:strat.** It beats random subsets")
    assert "at 1.60x their compute. Against random subsets trained at its total compute: level (+0.0050" in text[0]
    assert text[2] == "Lost to random: tok:paser."
    text = summary(cfg, [lost], "twin")
    assert text[0].startswith("**On twin: use a random subset.**") and "tok:paser loses" in text[0]


def test_budgets_on_the_command_line():
    from paser.cli.commands import budget_pairs

    assert budget_pairs(["tok=0.2tok", "rec=0.2", "n=100"]) == {"tok": "0.2tok", "rec": 0.2, "n": 100}
    for bad in ("tok", "=0.2", "tok=lots"):
        with pytest.raises(ValueError):
            budget_pairs([bad])


def test_config_refuses_what_cannot_work():
    with pytest.raises(ValueError, match="set heldout_records too"):
        CompareConfig(pool_records=10)
    with pytest.raises(ValueError, match="neither a count"):
        CompareConfig(budgets={"tok": "lots"})


@pytest.mark.slow
def test_compare_on_tiny_models_reports_resumes_and_refuses_other_settings(tiny_pair, tmp_path, monkeypatch):
    import paser
    import paser.comparison.runner as runner
    from paser.comparison import compare

    dense, pruned = tiny_pair
    overrides = {"compare": {"dense": dense, "pruned": pruned, "pool": None, "suite_records": 60, "pool_records": 48,
                             "heldout_records": 12, "budgets": {"tok": "0.25tok"}, "metric": "heldout_nll",
                             "arms": ["tok:random-0", "tok:random-1", "tok:random-2", "tok:paser"],
                             "bootstrap": 200, "out": str(tmp_path / "cmp")},
                 "recover": {"max_steps": 2, "batch_size": 4}, "evaluate": {"suite_size": 0, "batch_size": 8}}
    result = compare(overrides=overrides)
    arms = sorted(p.name for p in (tmp_path / "cmp" / "arms").glob("*.json"))
    assert arms == ["dense.json", "none.json", "tok-paser.json", "tok-random-0.json", "tok-random-1.json",
                    "tok-random-2.json"]
    row = json.loads((tmp_path / "cmp" / "arms" / "tok-paser.json").read_text())
    assert row["steps"] == 2 and row["batch_unit"] == "tokens" and len(row["heldout"]["per_record"]["id"]) == 12
    assert row["compute"]["selection"]["flops_total"] > 0 and row["jsd"]["heldout"]["mean"] > 0
    assert row["code"]["paser"] == paser.__version__ and "commit" in row["code"]
    verdicts = result.verdicts()
    assert verdicts["tok:paser"] in ("beats random", "loses", "level") or verdicts["tok:paser"].startswith("candidate")
    text = result.report.read_text()
    assert "| tok:paser | tok |" in text and (tmp_path / "cmp" / "compare.png").is_file()
    paser_line = next(ln for ln in result.lines if ln.arm == "tok:paser")
    values = {a: json.loads((tmp_path / "cmp" / "arms" / f"{a}.json").read_text())["heldout"]["nll"]
              for a in ("tok-paser", "tok-random-0", "tok-random-1", "tok-random-2")}
    assert paser_line.difference == pytest.approx(values["tok-paser"] - np.mean([values[f"tok-random-{k}"]
                                                                                 for k in range(3)]), abs=1e-6)
    # a rerun runs nothing; an arm whose result is lost is evaluated again from its finished recovery
    (tmp_path / "cmp" / "arms" / "tok-random-1.json").unlink()
    ran = []
    monkeypatch.setattr(runner, "select_subset", lambda arm, setup, f=runner.select_subset: ran.append(arm.name)
                        or f(arm, setup))
    compare(overrides=overrides)
    assert ran == ["tok:random-1"]
    recovery = json.loads((tmp_path / "cmp" / "recover" / "tok-random-1" / "recovery.json").read_text())
    assert recovery["resumed_from_step"] == 2  # nothing trained again
    again = json.loads((tmp_path / "cmp" / "arms" / "tok-random-1.json").read_text())
    assert again["steps"] == 2
    # the same folder with another recipe would mix arms that do not compare
    with pytest.raises(ConfigError, match="recover.max_steps"):
        compare(overrides=overrides | {"recover": {"max_steps": 3, "batch_size": 4}})
    # arms may be added; the report reads only the config's arms
    fewer = compare(overrides=overrides | {"compare": overrides["compare"] | {"arms": ["tok:random-0",
                                                                                      "tok:random-1"]}},
                    report_only=True)
    assert "tok:paser" not in fewer.rows
    # the Prefect flow walks the same stages: of an added arm's list it runs only the new arm
    from paser.flows.compare import compare_flow

    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cmp" / "arms").glob("*.json")}
    more = overrides | {"compare": overrides["compare"] | {"arms": [*overrides["compare"]["arms"], "tok:longest"]}}
    report = compare_flow(None, more).report
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cmp" / "arms").glob("*.json")}
    assert set(after) - set(before) == {"tok-longest.json"} and all(after[k] == v for k, v in before.items())
    assert "| tok:longest | tok |" in report.read_text()
    # the command line: the report of the finished arms, its summary printed
    import yaml
    from typer.testing import CliRunner

    from paser.cli import app

    config = tmp_path / "cmp.yaml"
    config.write_text(yaml.safe_dump(more))
    shown = CliRunner().invoke(app, ["compare", "--config", str(config), "--report-only"])
    assert shown.exit_code == 0, shown.output
    assert shown.output.startswith("**On ") and f"report: {tmp_path / 'cmp' / 'report.md'}" in shown.output
    flowed = CliRunner().invoke(app, ["compare", "--config", str(config), "--report-only", "--flow"])
    assert flowed.exit_code == 0 and flowed.output == shown.output, flowed.output  # the same, through Prefect
    wrong = CliRunner().invoke(app, ["compare", "--config", str(config), "--arms", "tok:nothing", "--no-flow"])
    assert wrong.exit_code == 2 and "unknown method 'nothing'" in wrong.output
    # across machines: through the flow on a local Dask cluster, the new arms run on its workers
    spread = more | {"compare": more["compare"] | {"arms": [*more["compare"]["arms"], "tok:random-3", "tok:shortest"]},
                     "distribute": {"engine": "dask", "workers": 2}}
    report = compare_flow(None, spread).report
    rows = {json.loads(p.read_text())["arm"]: p.stat().st_mtime_ns for p in (tmp_path / "cmp" / "arms").glob("*.json")}
    assert {"tok:random-3", "tok:shortest"} <= set(rows) and "| tok:shortest | tok |" in report.read_text()
    here = f":{os.getpid()}"
    ran = [json.loads((tmp_path / "cmp" / "arms" / f"{a}.json").read_text())["process"]
           for a in ("tok-random-3", "tok-shortest", "tok-paser")]
    assert not ran[0].endswith(here) and not ran[1].endswith(here) and ran[2].endswith(here)
    assert all(rows[json.loads((tmp_path / "cmp" / "arms" / k).read_text())["arm"]] == v for k, v in after.items())
