"""The decisive recovery experiment's script at smoke size on tiny models: arms run, results are
written one file per arm, a rerun skips them, and the report compares PASER with random."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
    assert "paired bootstrap 95%" in text and "Per family (suite-25" in text
    assert "tok: distillation against SFT" in text and "JSD to dense: PASER" in text
    # the token budget's per-family table: PASER against the SFT random arms only (not their @distill runs)
    table = text.split("Per family (suite-25, 20% token budget)")[1].split("\n\n")[1].splitlines()[2:]
    family, *cells = [c.strip() for c in table[0].strip("|").split("|")]
    nll = {a: json.loads((tmp_path / "results" / "suite-25" / f"{a}.json").read_text())["suite"]["answer_nll"][family]
           for a in ("tok-paser", "tok-random-0", "tok-random-1")}
    expected = nll["tok-paser"] - (nll["tok-random-0"] + nll["tok-random-1"]) / 2
    assert float(cells[6]) == pytest.approx(expected, abs=1e-3)
    kd = json.loads((tmp_path / "results" / "suite-25" / "tok-paser-distill.json").read_text())
    assert kd["steps"] == row["steps"] and kd["selected_tokens"] == row["selected_tokens"]
    assert kd["jsd"]["suite"]["mean"] > 0 and len(kd["jsd"]["suite"]["per_record"]["jsd"]) == kd["suite"]["records"]
    capsys.readouterr()
    exp.main(argv)  # every arm is on file: nothing runs again
    assert "metric" not in capsys.readouterr().out
    # an arm finished before the JSD was measured gets it from its saved adapter
    path = tmp_path / "results" / "suite-25" / "tok-random-0.json"
    before = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in before.items() if k != "jsd"}))
    exp.main([*argv, "--add-jsd"])
    assert json.loads(path.read_text())["jsd"]["suite"]["mean"] == pytest.approx(before["jsd"]["suite"]["mean"],
                                                                                 rel=1e-5)
    assert capsys.readouterr().out.count("JSD to dense added") == 1


def test_arm_objectives_and_a_group_bootstrap():
    import decisive_experiment as exp
    import numpy as np

    assert exp.objective_of("tok:paser") == {"objective": "sft"}
    assert exp.objective_of("tok:random-0@distill") == {"objective": "distill"}
    assert exp.objective_of("tok:random-1@distill-jsd#2") == {"objective": "distill", "divergence": "jsd"}
    assert exp.objective_of("tok:random-1@distill-t2~conv") == {"objective": "distill", "temperature": 2.0}
    with pytest.raises(SystemExit, match="unknown objective option"):
        exp.objective_of("tok:paser@distill-kl2")

    def row(values):  # a suite arm: two families, per-record answer NLL
        return {"suite": {"per_record": {"family": ["a", "a", "b"], "nll": list(values)}}}

    # several arms on one side: the interval is that of their mean, and a constant shift is exact
    lo, hi = exp.paired_bootstrap([row([1, 2, 3]), row([3, 4, 5])], [row([0, 1, 2]), row([2, 3, 4])], "suite")
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    one = exp.paired_bootstrap(row([1, 2, 3]), [row([0, 1, 2])], "suite")
    assert one == exp.paired_bootstrap([row([1, 2, 3])], [row([0, 1, 2])], "suite")
    assert np.all(np.isfinite(one))
