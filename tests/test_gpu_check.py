"""The GPU check's CPU smoke run: the script that runs on a GPU machine works end to end here, with
tiny shapes, and writes every figure it promises."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.slow
def test_gpu_check_smoke_run(tmp_path):
    import gpu_check

    gpu_check.main(["--smoke", "--out", str(tmp_path / "gpu.json")])
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["auto_dtype"] == "float32" and report["device"] == "cpu"
    assert report["prune"]["params_after"] < report["prune"]["params_before"]
    assert [r["batch_size"] for r in report["scoring"]] == [8] and report["scoring"][0]["tokens_per_s"] > 0
    assert [r["objective"] for r in report["recovery"]] == ["sft", "distill"]
    assert report["dask"]["devices"] == ["cpu"] * report["dask"]["workers"]
