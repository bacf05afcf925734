"""The deployment path end to end: a real Prefect server on 127.0.0.1, ``flows/deployments.py``, a run
triggered with ``prefect deployment run``, watched to COMPLETED, then the outputs checked."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import selection_settings as settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, seconds: float, what: str, procs):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: {p.args[:3]} exited with {p.returncode}")
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what}: not ready after {seconds} s")


def _found(url: str) -> bool:
    """The API answers ``url`` (a GET) with 200: the server is up, or the deployment exists."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_served_selection_deployment_completes(tmp_path, tiny_pair):
    models = tiny_pair
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                        "PREFECT_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
                        "PREFECT_RUNNER_POLL_FREQUENCY": "1"}  # the served runner looks for new runs every second
    (tmp_path / "prefect-home").mkdir()
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("server", "serve")}
    server = subprocess.Popen([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=logs["server"], stderr=subprocess.STDOUT, start_new_session=True)
    serve = None
    try:
        _wait(lambda: _found(f"{api}/health"), 180, "prefect server", [server])
        serve = subprocess.Popen([sys.executable, ROOT / "flows" / "deployments.py", "select", "--api-url", api],
                                 env=env, cwd=tmp_path, stdout=logs["serve"], stderr=subprocess.STDOUT,
                                 start_new_session=True)
        _wait(lambda: _found(f"{api}/deployments/name/paser-select/select"), 180, "serving", [server, serve])
        s = settings(models, tmp_path / "runs" / "served").to_dict()
        params = {"budget": "12", "out": str(tmp_path / "runs" / "served"), "overrides": s}
        run = subprocess.run([BIN / "prefect", "deployment", "run", "paser-select/select", "--params",
                              json.dumps(params), "--watch", "--watch-interval", "1", "--watch-timeout", "300"],
                             env=env, capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "COMPLETED" in (run.stdout + run.stderr).upper()
        out = tmp_path / "runs" / "served"
        assert sum(1 for _ in (out / "selected.jsonl").open()) == 12
        assert json.loads((out / "manifest.json").read_text())["settings"]["select"]["budget"] == 12
    finally:
        for proc in (serve, server):
            if proc is not None:
                _stop(proc)
        for fh in logs.values():
            fh.close()
