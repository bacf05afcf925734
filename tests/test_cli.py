"""The `paser` command line: thin over the API, one-line errors, non-zero exits."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from paser.cli import app

pytestmark = pytest.mark.usefixtures("prefect_api")  # flows here run against the test process's one Prefect server
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def test_prune_command(tiny_model_dir, tmp_path):
    out = tmp_path / "pruned"
    result = runner.invoke(app, ["prune", str(tiny_model_dir), "--ratio", "0.25", "--out", str(out),
                                 "--importance", "l2", "--attn-layers", "0:4", "--mlp-layers", "0:4",
                                 "--round-to", "8"])
    assert result.exit_code == 0, result.output
    assert "parameters before:" in result.output and "parameters after:" in result.output
    assert "time:" in result.output
    assert (out / "paser_pruned.json").is_file()


def test_prune_with_config_file(tiny_model_dir, tmp_path):
    cfg = tmp_path / "prune.yaml"
    cfg.write_text("prune:\n  ratio: 0.5\n  importance: l2\n  attn_layers: [0, 4]\n")
    result = runner.invoke(app, ["prune", str(tiny_model_dir), "--out", str(tmp_path / "o"),
                                 "--config", str(cfg), "--mlp-ratio", "0.25"])
    assert result.exit_code == 0, result.output
    import json

    marker = json.loads((tmp_path / "o" / "paser_pruned.json").read_text())
    assert marker["pruning"]["ratio"] == 0.5 and marker["pruning"]["mlp_ratio"] == 0.25
    assert marker["layers"][0]["intermediate_size"] == 128  # MLP range default starts at layer 1
    assert marker["layers"][1]["intermediate_size"] == 96


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    assert result.output.strip().splitlines()[-1] == lines[0], "the error is the last thing printed"
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_model_exits_nonzero(tmp_path):
    _one_line_error(runner.invoke(app, ["prune", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]),
                    "missing: no such file or folder")


def test_pickle_without_trust_flag(tmp_path, tiny_tokenizer):
    import datetime

    import torch

    from paser.models.pruning import export_llm_pruner_pickle
    from tests.conftest import build_model

    path = export_llm_pruner_pickle(build_model(tiny_tokenizer), tiny_tokenizer, tmp_path / "m.bin")
    ok = runner.invoke(app, ["prune", str(path), "--out", str(tmp_path / "o"), "--importance", "l2"])
    assert ok.exit_code == 0, ok.output  # LLM-Pruner's layout: read safely, no flag needed
    other = tmp_path / "other.bin"
    torch.save({"model": build_model(tiny_tokenizer), "tokenizer": tiny_tokenizer, "day": datetime.date.today()},
               other)
    _one_line_error(runner.invoke(app, ["prune", str(other), "--out", str(tmp_path / "p")]),
                    "needs datetime.date, which is outside the allowlist", "--trust-pickle")
    ok = runner.invoke(app, ["prune", str(other), "--out", str(tmp_path / "p"), "--trust-pickle",
                             "--importance", "l2"])
    assert ok.exit_code == 0, ok.output


def test_unknown_config_key(tiny_model_dir, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("prune:\n  ratoi: 0.5\n")
    _one_line_error(runner.invoke(app, ["prune", str(tiny_model_dir), "--config", str(cfg)]),
                    "bad.yaml: prune: unknown key(s) ['ratoi']")


def test_wrong_type_in_config(tiny_model_dir, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("prune:\n  num_calibration: many\n")
    _one_line_error(runner.invoke(app, ["prune", str(tiny_model_dir), "--config", str(cfg)]),
                    "prune.num_calibration: expected an integer, got str 'many'")


def test_ratio_out_of_range(tiny_model_dir, tmp_path):
    _one_line_error(runner.invoke(app, ["prune", str(tiny_model_dir), "--ratio", "1.5"]),
                    "ratio must be in [0, 1), got 1.5")


def test_bad_layer_range(tiny_model_dir):
    result = runner.invoke(app, ["prune", str(tiny_model_dir), "--attn-layers", "four"])
    assert result.exit_code == 2 and "START:END" in result.output


def test_serving_deployments_without_a_server_says_how_to_start_one():
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run([sys.executable, str(ROOT / "flows" / "deployments.py")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line, no traceback
    assert "prefect server start --host 127.0.0.1" in done.stderr and "PREFECT_API_URL" in done.stderr
    wrong = subprocess.run([sys.executable, str(ROOT / "flows" / "deployments.py"), "selekt"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "unknown deployment(s) ['selekt']" in wrong.stderr


def test_prune_through_the_flow_gives_the_same_model(tiny_model_dir, tmp_path):
    import json

    args = ["prune", str(tiny_model_dir), "--importance", "l2", "--attn-layers", "0:4"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "flow"), "--flow"]).exit_code == 0
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "direct")]).exit_code == 0
    marker = [json.loads((tmp_path / d / "paser_pruned.json").read_text()) for d in ("flow", "direct")]
    assert marker[0]["layers"] == marker[1]["layers"]
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("flow", "direct")]
    assert weights[0] == weights[1]


def test_recover_and_evaluate_commands(tiny_model_dir, tmp_path):
    import json

    from paser.data.pools import write_jsonl
    from paser.data.suite import generate_suite

    data = tmp_path / "train.jsonl"
    write_jsonl(data, generate_suite(24, seed=3))
    result = runner.invoke(app, ["recover", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "r"),
                                 "--max-steps", "2", "--batch-size", "8", "--micro-batch-size", "4",
                                 "--val-size", "4", "--no-flow"])
    assert result.exit_code == 0, result.output
    assert "2 steps (batches of 8 records;" in result.output
    assert (tmp_path / "r" / "adapter" / "adapter_config.json").is_file()
    result = runner.invoke(app, ["recover", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "t"),
                                 "--max-steps", "2", "--batch-tokens", "300", "--seed", "2", "--val-size", "4",
                                 "--flow"])  # through Prefect: the same lines from the same recovery.json
    assert result.exit_code == 0, result.output
    done = json.loads((tmp_path / "t" / "recovery.json").read_text())
    assert "(batches of about 300 tokens;" in result.output and done["settings"]["batch_tokens"] == 300
    assert done["settings"]["seed"] == 2
    result = runner.invoke(app, ["evaluate", str(tiny_model_dir), "--adapter", str(tmp_path / "r" / "adapter"),
                                 "--suite-size", "12", "--out", str(tmp_path / "e"), "--flow"])
    assert result.exit_code == 0, result.output
    assert "capability-suite accuracy (answer found), all" in result.output
    assert "capability-suite answer NLL, macro average" in result.output
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["adapter"] == str(tmp_path / "r" / "adapter")


def test_recover_distill_through_the_flow(tiny_pair, tmp_path):
    import json

    from paser.data.pools import write_jsonl
    from paser.data.suite import generate_suite

    dense, pruned = tiny_pair
    data = tmp_path / "train.jsonl"
    write_jsonl(data, generate_suite(16, seed=3))
    args = ["recover", pruned, "--data", str(data), "--max-steps", "2", "--batch-size", "8", "--micro-batch-size",
            "4", "--val-size", "0", "--objective", "distill"]
    _one_line_error(runner.invoke(app, [*args, "--out", str(tmp_path / "x")]), "learns from a teacher", "--teacher")
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "d"), "--teacher", dense, "--divergence", "jsd",
                                 "--temperature", "2", "--teacher-top-k", "32"])
    assert result.exit_code == 0, result.output
    assert f"distill from {dense} (jsd, temperature 2.0, teacher top-32 cache on disk) loss" in result.output
    assert json.loads((tmp_path / "d" / "recovery.json").read_text())["settings"]["temperature"] == 2.0


def test_recover_bad_inputs_are_one_line(tiny_model_dir, tmp_path):
    _one_line_error(runner.invoke(app, ["recover", str(tmp_path / "missing"), "--data", "x.json"]),
                    "no such file or folder")
    _one_line_error(runner.invoke(app, ["recover", str(tiny_model_dir), "--data", str(tmp_path / "none.json"),
                                        "--no-flow"]), "none.json")
    _one_line_error(runner.invoke(app, ["evaluate", str(tiny_model_dir), "--adapter", str(tmp_path),
                                        "--no-flow"]), "not a LoRA adapter folder")


def test_run_takes_its_models_from_the_config(tmp_path):
    from paser.selection.settings import build_settings

    def models(dense, pruned, sections):  # as paser run and its flow resolve them
        select = build_settings(dense=dense, pruned=pruned, overrides=sections).select
        return select.dense, select.pruned

    sections = {"select": {"dense": "d", "pruned": "p"}}
    assert models(None, None, sections) == ("d", "p")
    assert models("D", None, sections) == ("D", "p")
    assert models(None, None, {}) == ("smollm2-135m-instruct", None)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"select:\n  dense: {tmp_path / 'my-dense'}\n")
    _one_line_error(runner.invoke(app, ["run", "--config", str(cfg), "--out", str(tmp_path / "r")]),
                    f"{tmp_path / 'my-dense'}: no such file or folder")


def test_prefect_console_hides_user_errors_and_keeps_bugs():
    import logging

    from paser.errors import DataError
    from paser.flows import HideUserErrors

    def record(exc, message="Task run failed with exception"):
        return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, message, None,
                                 (type(exc), exc, None))

    f = HideUserErrors()
    assert not f.filter(record(DataError("bad record")))
    assert f.filter(record(RuntimeError("a bug")))
    finished = logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1,
                                 "Finished in state Failed('Task run encountered an exception DataError: x')", None,
                                 None)
    assert not f.filter(finished)


_INJECT = """
import sys
from paser.selection import pipeline
from paser.errors import DataError
def fail(*args, **kwargs):
    raise DataError("pool.jsonl: line 3: field 'output': raised inside a task")
pipeline.stage_embed = fail
sys.argv = ["paser", *sys.argv[1:]]
from paser.cli import main
main()
"""


@pytest.mark.slow
def test_user_error_inside_a_flow_is_one_line(tiny_pair, tmp_path, prefect_api):
    import os
    import subprocess

    dense, pruned = tiny_pair
    args = ["select", "--dense", dense, "--pruned", pruned, "--suite-size", "40", "--out", str(tmp_path / "run"),
            "--flow"]
    env = os.environ | {"PREFECT_API_URL": prefect_api}  # the test's server: no temporary one started in each run
    quiet = subprocess.run([sys.executable, "-c", _INJECT, *args], capture_output=True, text=True, timeout=300,
                           env=env)
    # progress lines ("12:13:16 paser: reading the pool ...") come first; then the error alone
    lines = [line for line in quiet.stderr.splitlines() if "it/s]" not in line and line.strip()
             and not re.match(r"\d\d:\d\d:\d\d paser: ", line)]
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr, quiet.stderr
    assert lines == ["error: pool.jsonl: line 3: field 'output': raised inside a task"], lines
    assert quiet.stderr.strip().splitlines()[-1] == lines[0]
    # --debug shows where it was raised; in this process too (no flow: its logs are not the path)
    loud = subprocess.run([sys.executable, "-c", _INJECT, "--debug", *args[:-1]], capture_output=True, text=True,
                          timeout=300, env=env)
    assert loud.returncode == 2 and "Traceback" in loud.stderr and "in fail" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == lines[0]


def test_select_field_map_on_the_command_line(tiny_pair, tmp_path):
    import json

    from paser.data.pools import write_jsonl
    from paser.data.suite import generate_suite

    dense, pruned = tiny_pair
    data = tmp_path / "qa.jsonl"
    write_jsonl(data, [{"question": r["instruction"], "answer": r["output"]} for r in generate_suite(40, seed=2)])
    args = ["select", "--data", str(data), "--dense", dense, "--pruned", pruned, "--budget", "0.25",
            "--clusters", "4", "--no-flow", "--out", str(tmp_path / "run")]
    _one_line_error(runner.invoke(app, args), "qa.jsonl: record 0 has fields ['answer', 'question']", "--fields")
    _one_line_error(runner.invoke(app, [*args, "--fields", "question"]), "ROLE=FIELD")
    result = runner.invoke(app, [*args, "--fields", "instruction=question,response=answer"])
    assert result.exit_code == 0, result.output
    first = json.loads((tmp_path / "run" / "selected.jsonl").read_text().splitlines()[0])
    assert {"question", "answer"} <= set(first) and "instruction" not in first


def test_every_command_keeps_its_options():
    """The option sets of every command, as they were before the CLI was built from the configs
    (tests/data/cli_options.json): generating the options must neither add nor lose one."""
    import json
    from pathlib import Path

    import typer

    expected = json.loads((Path(__file__).parent / "data" / "cli_options.json").read_text())
    commands = typer.main.get_command(app).commands
    found = {name: sorted({o for p in cmd.params for o in (*p.opts, *p.secondary_opts)})
             for name, cmd in sorted(commands.items())}
    assert found == expected
