"""The GPU check's CPU smoke run: the script a GPU machine runs goes through paser's own code paths
here, with tiny shapes, and what it reports holds together."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.usefixtures("prefect_api")  # flows here run against the test process's one Prefect server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.slow
def test_gpu_check_smoke_run(tmp_path, monkeypatch):
    import gpu_check

    monkeypatch.setenv("PASER_CACHE_DIR", str(tmp_path / "cache"))
    work = tmp_path / "work"
    gpu_check.main(["--smoke", "--work", str(work), "--out", str(tmp_path / "gpu.json")])
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["auto_dtype"] == "float32" and report["device"] == "cpu"
    # the twin is paser's own, pruned from the saved dense folder
    assert (Path(report["twin"]["folder"]) / "paser_pruned.json").is_file()
    rows = {r["name"]: r for r in report["scoring"]}
    assert set(rows) == {"default", "batch-tokens-512", "two-pass"}
    # the FLOPs are the run's own ledger: the same work whatever the batches
    assert rows["default"]["ledger_flops"] == rows["batch-tokens-512"]["ledger_flops"] > 0
    scores = {name: pd.read_parquet(work / name / "degradation.parquet") for name in rows}
    pd.testing.assert_series_equal(scores["default"]["jsd"], scores["batch-tokens-512"]["jsd"], rtol=1e-4)
    # two-pass compares over the dense top-k plus one bucket: a lower bound of the exact JSD
    assert (scores["two-pass"]["jsd"] <= scores["default"]["jsd"] + 1e-6).all()
    assert [r["objective"] for r in report["recovery"]] == ["sft", "distill"]
    assert all(r["steps"] == 2 and r["dtype"] == "float32" and r["ledger_flops"] > 0 for r in report["recovery"])
    distill, sft = report["recovery"][1]["ledger_flops"], report["recovery"][0]["ledger_flops"]
    assert distill > sft  # the teacher's forward passes are counted
    assert report["dask"]["workers"] == 2 and report["dask"]["shards"] == 4
