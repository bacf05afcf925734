"""Every GPU check of paser in one command, through paser's own code paths: a Llama-2-7B-shaped
dense model with random weights built on the device and saved, paser's twin pruned from it on the
GPU, degradation scoring of the saved pair as ``paser select`` runs it (one process, token-budget
batches, two-pass, and a 2-worker local Dask cluster sharing the GPU), and LoRA recovery on the
Trainer path (SFT and distillation, the auto dtype).

    python bench/gpu_check.py --out $OUT/gpu_check.json      # on a GPU machine: 7B shapes, bf16, < 8 minutes
    python bench/gpu_check.py --smoke                        # anywhere: tiny shapes, the same code paths

Figures (printed as they come, and written as JSON to --out):
- ``auto`` dtype on this device;
- twin: ``paser.selection.scoring.twin_reference`` (Taylor on calibration samples in fp32, gradients kept on
  the host, saved in the scoring dtype): seconds and peak device memory;
- scoring: ``paser.select``'s degradation stage on the saved folders, per
  configuration: seconds, records/s, tokens/s, FLOPs by paser's ledger (what the run's manifest
  says it computed: 2 x non-embedding parameters per token read, the vocabulary head at the scored
  positions only, the shared preamble counted for every record), MFU against the card's bf16 dense
  peak (--peak-tflops, else by name), peak device memory;
- recovery: ``paser.recover`` (Hugging Face's Trainer, bf16 autocast where the weights
  are bf16), SFT and distillation from the dense model in memory: seconds, tokens/s, peak memory,
  and the ledger's FLOPs;
- Dask: the same scoring through the flow on a local 2-worker cluster, each shard claiming half of
  the one GPU: seconds, the device each worker scored on.
Records are paser's generated capability suite, tokenized by a small BPE trained on it (token ids
cover part of the vocabulary; the projection's cost does not depend on which).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from paser.data.suite import suite_tokenizer  # noqa: E402
from paser.devices import default_device, resolve_dtype, visible_gpus  # noqa: E402

# bf16 dense tensor-core peak in TFLOP/s (vendor figures, no sparsity)
PEAK_BF16 = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
             "L40S": 362.0, "A10G": 70.0, "L4": 121.0}
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=8, vocab_size=512, max_position_embeddings=512)


def save_dense(shape: dict, tokenizer, folder: Path, device: str, dtype: str) -> Path:
    """A Llama of ``shape`` with random weights, made on ``device`` in ``dtype`` and saved (a
    Hugging Face folder, as a user's dense model is)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from paser.models.load import resolve_dtype as torch_dtype

    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch_dtype(dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    release(device)
    return folder


def release(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def peak_tflops(device: str, given: float | None) -> float | None:
    if given or not device.startswith("cuda"):
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class Memory:
    """Peak device memory allocated inside a block (CUDA), in GiB; None on CPU."""

    def __init__(self, device: str):
        self.cuda, self.peak = device.startswith("cuda"), None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def settings_for(work: Path, dense: Path, records: int, name: str, score: dict, distribute: dict | None = None):
    from paser.selection.settings import Settings

    return Settings.load(None, {
        "select": {"dense": str(dense), "suite_size": records, "budget": 0.2, "out": str(work / name),
                   "prune_ratio": 0.2, "progress": False},
        "prune": {"num_calibration": 10},
        "score": score, "cluster": {"k_max": 8}, "distribute": distribute or {}})


def check_twin(work: Path, dense: Path, records: int, device: str) -> tuple[str, dict]:
    """paser's own twin of the dense model, pruned on the scoring device."""
    from paser.selection.scoring import twin_reference

    with Memory(device) as mem:
        start = time.perf_counter()
        pruned = twin_reference(settings_for(work, dense, records, "twin", {}))
        seconds = time.perf_counter() - start
    return pruned, {"seconds": round(seconds, 2), "peak_gib": mem.peak, "folder": pruned}


def check_scoring(work: Path, dense: Path, pruned: str, records: int, device: str, name: str, score: dict,
                  peak: float | None) -> dict:
    """The selection pipeline on the saved pair with ``score`` settings: its degradation stage's
    time, FLOPs by the run's own ledger, and peak device memory."""
    import paser

    settings = settings_for(work, dense, records, name, score)
    settings.select.pruned = pruned
    with Memory(device) as mem:
        run = paser.select(**settings.to_dict()).out
    seconds = json.loads((run / "timings.json").read_text())["score"]["seconds"]
    compute = json.loads((run / "manifest.json").read_text())["compute"]
    lines = [e for e in compute["entries"] if e["stage"] == "score"]
    flops, tokens = sum(e["flops"] for e in lines), lines[0]["tokens"]
    return {"name": name, "score": score, "seconds": round(seconds, 2), "records_per_s": round(records / seconds, 1),
            "tokens_per_s": round(tokens / seconds, 1), "ledger_flops": flops,
            "mfu": round(flops / seconds / (peak * 1e12), 4) if peak else None, "peak_gib": mem.peak}


def check_recovery(work: Path, dense: Path, pruned: str, selected: Path, device: str, steps: int) -> list[dict]:
    """``paser recover`` on the twin: SFT, then distillation from the dense model in memory."""
    import paser

    rows = []
    for objective in ("sft", "distill"):
        with Memory(device) as mem:
            result = paser.recover(model=pruned, data=selected, out=work / f"recover-{objective}", max_steps=steps,
                                   batch_size=16, micro_batch_size=4, val_size=0, objective=objective,
                                   teacher=str(dense), save_every=10 ** 6, progress=False)
        done = json.loads((result.out / "recovery.json").read_text())
        tokens = done["tokens_per_step"]["mean"] * done["steps"]
        rows.append({"objective": objective, "steps": done["steps"], "dtype": done["settings"]["dtype"],
                     "seconds": done["seconds"], "tokens_per_s": round(tokens / done["seconds"], 1),
                     "ledger_flops": done["compute"]["flops_total"], "peak_gib": mem.peak})
        release(device)
    return rows


def check_dask(work: Path, dense: Path, pruned: str, records: int, device: str) -> dict:
    """Scoring through the flow on a local Dask cluster of two workers sharing the one GPU."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        return {"skipped": "the dask extra is not installed"}
    import paser

    # four shards, so that both workers score some
    settings = settings_for(work, dense, records, "dask", {"shard_size": max(1, records // 4)},
                            {"engine": "dask", "workers": 2, "gpus_per_shard": 0.5 if device.startswith("cuda") else 0})
    settings.select.pruned = pruned
    start = time.perf_counter()
    settings.select.out = str(work / "dask")
    run = paser.select(**settings.to_dict()).out  # engine dask: through the flow
    seconds = time.perf_counter() - start
    shards = json.loads((run / "scoring.json").read_text())["shards"]
    models = json.loads((run / "models.json").read_text())
    return {"workers": len({s["worker"] for s in shards if s["computed"]}), "shards": len(shards),
            "seconds_with_flow": round(seconds, 2), "dense": models["dense"]["description"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the default device, quickly")
    ap.add_argument("--records", type=int, default=512, help="suite records in the pool scored")
    ap.add_argument("--batch-tokens", type=int, nargs="+", default=[8192, 32768],
                    help="score.batch_tokens configurations measured beside the default batches")
    ap.add_argument("--recovery-steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's bf16 dense peak (default: by name)")
    ap.add_argument("--no-dask", action="store_true", help="leave out the 2-worker Dask check")
    ap.add_argument("--work", default=None, help="folder for the models and runs (default: a temporary one)")
    ap.add_argument("--out", default=None, help="JSON file for the figures")
    args = ap.parse_args(argv)
    if args.smoke:
        args.records, args.batch_tokens, args.recovery_steps = 48, [512], 2
    shape = TINY if args.smoke else LLAMA_7B
    device = default_device()
    dtype = resolve_dtype("auto", device)
    work = Path(args.work or tempfile.mkdtemp(prefix="paser-gpu-check-"))
    os.environ.setdefault("PASER_CACHE_DIR", str(work / "cache"))  # the twin and converted models live here
    tokenizer = suite_tokenizer(vocab_size=min(shape["vocab_size"], 2048))
    peak = peak_tflops(device, args.peak_tflops)
    report: dict = {"command": " ".join(["python bench/gpu_check.py", *(argv or sys.argv[1:])]),
                    "date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "device": device,
                    "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else
                    platform.processor() or platform.machine(), "gpus": visible_gpus(), "auto_dtype": dtype,
                    "shape": shape, "peak_bf16_tflops": peak, "torch": torch.__version__}
    print(json.dumps({k: v for k, v in report.items() if k != "shape"}), flush=True)

    def emit(name: str, value) -> None:
        report[name] = value
        print(f"{name}:", json.dumps(value), flush=True)
        if args.out:  # what finished is kept even if a later check fails or the time runs out
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2))

    start = time.perf_counter()
    dense = save_dense(shape, tokenizer, work / "dense", device, dtype)
    emit("dense_saved_s", round(time.perf_counter() - start, 2))
    pruned, twin = check_twin(work, dense, args.records, device)
    emit("twin", twin)
    configs = [("default", {})] + [(f"batch-tokens-{t}", {"batch_tokens": t}) for t in args.batch_tokens]
    configs.append(("two-pass", {"two_pass": True}))
    emit("scoring", [check_scoring(work, dense, pruned, args.records, device, name, score, peak)
                     for name, score in configs])
    emit("recovery", check_recovery(work, dense, pruned, work / "default" / "selected.jsonl", device,
                                    args.recovery_steps))
    if not args.no_dask:
        emit("dask", check_dask(work, dense, pruned, args.records, device))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
