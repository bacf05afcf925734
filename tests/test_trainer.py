"""Recovery on Hugging Face's Trainer: the micro-batch plan, and data parallelism over two CPU
processes (torchrun, gloo) ending with the adapter of one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paser.recovery.trainer import micro_batches
from tests.conftest import FAST


def test_every_process_gets_the_same_number_of_micro_batches_per_step():
    steps = [[0, 1, 2, 3, 4], [5, 6], [7]]
    order, accumulation = micro_batches(steps, 2, 1)
    assert accumulation == 3 and order == [[0, 1], [2, 3], [4], [5, 6], [], [], [7], [], []]
    order, accumulation = micro_batches(steps, 2, 2)
    # process p takes micro-batches p, p + 2, ...: two per step each, every record once
    assert accumulation == 2 and len(order) == 3 * 2 * 2
    for s, step in enumerate(steps):
        chunk = order[4 * s:4 * s + 4]
        assert sorted(i for part in chunk for i in part) == step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_end_with_the_adapter_of_one(tiny_model_dir, train_file, tmp_path):  # noqa: F811
    """``torchrun --nproc-per-node 2 --no-python paser recover ... --no-flow``: each step's
    micro-batches are split over two gloo processes; the token-weighted loss and gradient averaging
    give the step of one process. Dropout off (its masks follow the micro-batch a process draws);
    clipping on, so the float-order tolerance is Adam's on near-zero gradients. The validation
    records are split between the processes (7: unequal shares) and give the loss of one."""
    from safetensors.torch import load_file

    from paser.recovery import recover

    settings = dict(FAST, dropout=0.0, max_steps=4, val_size=7)
    recover(str(tiny_model_dir), train_file, tmp_path / "one", **settings)
    config = tmp_path / "recover.yaml"
    config.write_text("recover:\n" + "".join(f"  {k}: {v}\n" for k, v in settings.items()))
    cli = Path(sys.executable).parent / "paser"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(_free_port()), "--no-python", str(cli), "--quiet", "recover", str(tiny_model_dir), "--data",
            train_file, "--out", str(tmp_path / "two"), "--no-flow", "--config", str(config)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "recovery.json").read_text())
    assert summary["processes"] == 2 and summary["accumulation"] == 1 and summary["steps"] == 4
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-4, rtol=1e-3)
    logs = [[json.loads(line) for line in (tmp_path / f / "train_log.jsonl").read_text().splitlines()]
            for f in ("one", "two")]
    assert [e["loss"] for e in logs[1]] == pytest.approx([e["loss"] for e in logs[0]], rel=1e-5)
    val = [[(e["step"], e["val_loss"]) for e in log if "val_loss" in e] for log in logs]
    assert [s for s, _ in val[0]] == [2, 4] and [s for s, _ in val[1]] == [2, 4]
    assert [v for _, v in val[1]] == pytest.approx([v for _, v in val[0]], rel=1e-5)


def test_gradient_checkpointing_recomputes_activations_and_keeps_the_adapter(tiny_model_dir, train_file, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from paser.recovery import recover

    settings = dict(FAST, dropout=0.0, max_steps=2, val_size=0)
    recover(str(tiny_model_dir), train_file, tmp_path / "plain", **settings)
    recover(str(tiny_model_dir), train_file, tmp_path / "ckpt", gradient_checkpointing=True, **settings)
    a, b = (load_file(tmp_path / f / "adapter" / "adapter_model.safetensors") for f in ("plain", "ckpt"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
    summaries = [json.loads((tmp_path / f / "recovery.json").read_text()) for f in ("plain", "ckpt")]
    assert [s["activation_checkpointing"] for s in summaries] == [False, True]


def test_recovery_uses_the_current_checkpointing_names(tiny_model_dir, train_file, tmp_path):  # noqa: F811
    """transformers 5 renamed gradient checkpointing to activation checkpointing and warns on the old
    names; a recovery, with checkpointing on, warns about neither."""
    import warnings

    from paser.recovery import recover

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*checkpointing.*", category=FutureWarning)
        result = recover(str(tiny_model_dir), train_file, tmp_path / "run", **dict(FAST, max_steps=2, val_size=0,
                                                                                   gradient_checkpointing=True))
    assert json.loads((result.out / "recovery.json").read_text())["activation_checkpointing"] is True
    with warnings.catch_warnings():  # loading the adapter back, as paser evaluate --adapter does
        warnings.filterwarnings("error", message=".*checkpointing.*", category=FutureWarning)
        from paser.evaluation.metrics import load_for_eval

        load_for_eval(str(tiny_model_dir), str(result.out / "adapter"))


def test_one_process_on_a_machine_of_several_gpus_does_not_wrap_in_data_parallel(tmp_path):
    """Simulated: the Trainer of one process seeing four GPUs would wrap the model in
    nn.DataParallel; paser's arguments keep it on one."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from paser.recovery import RecoverConfig
    from paser.recovery.lora import one_device, training_arguments
    from paser.recovery.trainer import RecoveryTrainer

    model = get_peft_model(LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, vocab_size=64)),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    args = training_arguments(RecoverConfig(), tmp_path, 2, 1, "cpu", 1)

    def wrapped(gpus: int, fix: bool):
        args._n_gpu = gpus  # as a single process seeing `gpus` devices has it
        if fix:
            one_device(args, 1)
        trainer = RecoveryTrainer(model=model, args=args, config=RecoverConfig(), data=None, loss_fn=None,
                                  targets_fn=None, schedule_fn=None)
        return trainer._wrap_model(model)

    assert isinstance(wrapped(4, fix=False), torch.nn.DataParallel)  # what the Trainer does on its own
    assert wrapped(4, fix=True) is model


def test_a_single_process_refuses_a_gpu_other_than_the_first(tiny_model_dir, train_file, tmp_path):  # noqa: F811
    from paser.errors import ConfigError
    from paser.recovery import recover

    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=1"):
        recover(str(tiny_model_dir), train_file, tmp_path / "run", **dict(FAST, device="cuda:1"))


@pytest.mark.slow
def test_under_torchrun_the_teacher_cache_is_built_once(tiny_pair, train_file, tmp_path):  # noqa: F811
    """Two gloo processes distilling from a top-k cache: the first builds it, the second waits and
    reads it (it used to build the same parts into the same folder, and a stale fingerprint could
    delete the folder under the other's feet)."""
    dense, pruned = tiny_pair
    settings = dict(FAST, dropout=0.0, max_steps=2, val_size=0, objective="distill", teacher=dense,
                    teacher_top_k=16)
    config = tmp_path / "recover.yaml"
    config.write_text("recover:\n" + "".join(f"  {k}: {v}\n" for k, v in settings.items()))
    cli = Path(sys.executable).parent / "paser"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(_free_port()), "--no-python", str(cli), "recover", pruned, "--data", train_file, "--out",
            str(tmp_path / "two"), "--no-flow", "--config", str(config)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("alone over") == 1, done.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "recovery.json").read_text())["processes"] == 2
