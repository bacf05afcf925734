"""Every GPU check of paser in one command: a 7B-shaped Llama pair with random weights, built from
its config on the device (no weight file travels), pruned, scored, recovered.

    python bench/gpu_check.py --out $OUT/gpu_check.json      # on a GPU machine (Llama-2-7B shapes, bf16)
    python bench/gpu_check.py --smoke                        # anywhere: tiny shapes, same code path

Figures (printed, and written as JSON to --out):
- the dtype ``auto`` resolves to on this device;
- pruning (``paser prune --device``): Taylor importance on calibration samples in fp32, then the
  20% structural prune: seconds, parameters before and after, peak device memory;
- scoring (``paser select``'s degradation stage, both models in memory, the auto dtype): for
  each batch size, records/s, tokens/s (prompt + response tokens through each model), MFU
  against the card's bf16 dense peak (--peak-tflops, else looked up by name; forward FLOPs
  counted as 2 x parameters per token per model, attention left out, so it is a lower bound),
  peak device memory; and the KV cache's cost, by one batch with ``use_cache`` left on, the
  way paser ran before (peak memory of both);
- recovery steps (LoRA r 8 on the pruned model, micro-batch 4, cutoff 256): SFT and distillation
  from the dense model in memory, tokens/s and peak memory;
- with the dask extra installed, a local Dask cluster sized by paser (one worker per visible
  GPU) reports the device each worker scores on.
The records are paser's generated capability suite (short prompts and answers); the tokenizer is a
small BPE trained on it, so token ids cover only part of the 32,000-row vocabulary projection,
whose cost is the same whatever the ids.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from paser.degradation import ScoreConfig, encode_records, score_shard  # noqa: E402
from paser.devices import default_device, resolve_dtype, visible_gpus  # noqa: E402
from paser.layers import count_parameters  # noqa: E402
from paser.models import resolve_dtype as torch_dtype  # noqa: E402
from paser.pruning import PruneConfig, prune_model  # noqa: E402
from paser.suite import suite_pool, suite_tokenizer  # noqa: E402

# bf16 dense tensor-core peak in TFLOP/s (vendor figures, no sparsity)
PEAK_BF16 = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
             "L40S": 362.0, "A10G": 70.0, "L4": 121.0}
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=8, vocab_size=512, max_position_embeddings=512)


def build(shape: dict, tokenizer, device: str, dtype: torch.dtype, seed: int = 0):
    """A Llama of ``shape`` with random weights, made directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def peak_tflops(device: str, given: float | None) -> float | None:
    if given or not device.startswith("cuda"):
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class Memory:
    """Peak device memory of a block (CUDA), in GiB; None on CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.peak = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_prune(shape, tokenizer, device, records) -> tuple[object, dict]:
    """The dense model rebuilt in fp32 and pruned 20% on the device (Taylor, 10 calibration samples)."""
    model = build(shape, tokenizer, device, torch.float32)
    with Memory(device) as mem:
        start = time.perf_counter()
        result = prune_model(model, tokenizer, PruneConfig(ratio=0.2, num_calibration=10))
        sync(device)
        seconds = time.perf_counter() - start
    return result.model, {"seconds": round(seconds, 2), "params_before": result.params_before,
                          "params_after": result.params_after, "peak_gib": mem.peak}


def check_scoring(dense, pruned, tokenizer, device, records, batch_sizes, peak) -> list[dict]:
    params = count_parameters(dense) + count_parameters(pruned)
    tokens = sum(len(e.ids) for e in encode_records(tokenizer, records, ScoreConfig()))
    score_shard(dense, pruned, tokenizer, records[:8], ScoreConfig(batch_size=8), device)  # warm-up
    rows = []
    for batch_size in batch_sizes:
        with Memory(device) as mem:
            start = time.perf_counter()
            score_shard(dense, pruned, tokenizer, records, ScoreConfig(batch_size=batch_size), device)
            sync(device)
            seconds = time.perf_counter() - start
        flops = 2.0 * params * tokens / seconds
        rows.append({"batch_size": batch_size, "records_per_s": round(len(records) / seconds, 1),
                     "tokens_per_s": round(tokens / seconds, 1), "seconds": round(seconds, 2),
                     "mfu": round(flops / (peak * 1e12), 4) if peak else None, "peak_gib": mem.peak})
    return rows


def check_kv_cache(dense, tokenizer, device, records, batch_size) -> dict:
    """Peak memory of one scoring batch forward with and without a KV cache built."""
    from paser.recovery import RecoverConfig, collate, encode_for_training

    examples = encode_for_training(tokenizer, records[:batch_size], RecoverConfig())
    batch = collate(examples, tokenizer.pad_token_id, device)
    out = {}
    for use_cache in (False, True):
        with torch.no_grad(), Memory(device) as mem:
            dense(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=use_cache)
        out[f"use_cache_{str(use_cache).lower()}_peak_gib"] = mem.peak
    return out


def check_recovery(dense, pruned, tokenizer, device, records, dtype, steps: int) -> list[dict]:
    """Tokens/s and peak memory of LoRA steps (micro-batch 4), SFT and distillation."""
    from paser.distill import in_memory_targets
    from paser.recovery import RecoverConfig, collate, encode_for_training, lora_model, objective_loss_sum

    rows = []
    model = lora_model(pruned, RecoverConfig(dtype=dtype))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    examples = encode_for_training(tokenizer, records, RecoverConfig())
    for objective in ("sft", "distill"):
        config = RecoverConfig(objective=objective, dtype=dtype)
        tokens = 0
        with Memory(device) as mem:
            start = time.perf_counter()
            for step in range(steps):
                chosen = examples[step * 4:(step + 1) * 4]
                batch = collate(chosen, tokenizer.pad_token_id, device)
                targets = in_memory_targets(dense, batch) if objective == "distill" else None
                with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                                    enabled=dtype == "bfloat16"):
                    loss, _, _ = objective_loss_sum(model, batch, config, targets)
                (loss / max(1, int((batch["labels"] != -100).sum()))).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tokens += sum(len(e.ids) for e in chosen)
            sync(device)
            seconds = time.perf_counter() - start
        rows.append({"objective": objective, "steps": steps, "tokens_per_s": round(tokens / seconds, 1),
                     "seconds": round(seconds, 2), "peak_gib": mem.peak})
    return rows


def check_dask() -> dict:
    """The device each worker of paser's local Dask cluster scores on."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        return {"skipped": "the dask extra is not installed"}
    from flows.runners import local_dask_cluster
    from paser.devices import scoring_device
    from paser.settings import DistributeConfig

    kwargs = local_dask_cluster(DistributeConfig(engine="dask"))
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        devices = client.run(lambda: scoring_device(None))
    return {"workers": kwargs["n_workers"], "devices": sorted(devices.values())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the default device, quickly")
    ap.add_argument("--records", type=int, default=512, help="suite records scored per batch size")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--recovery-steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's bf16 dense peak (default: by name)")
    ap.add_argument("--out", default=None, help="JSON file for the figures")
    args = ap.parse_args(argv)
    if args.smoke:
        args.records, args.batch_sizes, args.recovery_steps = 24, [8], 2
    shape = TINY if args.smoke else LLAMA_7B
    device = default_device()
    dtype = resolve_dtype("auto", device)
    tokenizer = suite_tokenizer(vocab_size=min(shape["vocab_size"], 2048))
    records = suite_pool(args.records, seed=5).records
    peak = peak_tflops(device, args.peak_tflops)
    report: dict = {"command": " ".join(["python bench/gpu_check.py", *(argv or sys.argv[1:])]),
                    "date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "device": device,
                    "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else
                    platform.processor() or platform.machine(), "gpus": visible_gpus(), "auto_dtype": dtype,
                    "shape": shape, "peak_bf16_tflops": peak, "torch": torch.__version__}
    print(json.dumps({k: v for k, v in report.items() if k != "shape"}), flush=True)

    pruned, report["prune"] = check_prune(shape, tokenizer, device, records)
    pruned = pruned.to(torch_dtype(dtype))
    print("prune:", json.dumps(report["prune"]), flush=True)
    dense = build(shape, tokenizer, device, torch_dtype(dtype))
    report["scoring"] = check_scoring(dense, pruned, tokenizer, device, records, args.batch_sizes, peak)
    for row in report["scoring"]:
        print("scoring:", json.dumps(row), flush=True)
    report["kv_cache"] = check_kv_cache(dense, tokenizer, device, records, max(args.batch_sizes))
    print("kv cache:", json.dumps(report["kv_cache"]), flush=True)
    report["recovery"] = check_recovery(dense, pruned, tokenizer, device, records, dtype, args.recovery_steps)
    for row in report["recovery"]:
        print("recovery:", json.dumps(row), flush=True)
    report["dask"] = check_dask()
    print("dask:", json.dumps(report["dask"]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
