"""fp32 vs bf16 on this machine: the matrix product that dominates scoring, and a SmolLM2-shaped
forward pass, in the same process. Decides paser's default scoring dtype on a CPU.

    python bench/dtype.py
"""

from __future__ import annotations

import platform
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    # SmolLM2-135M shapes, random weights: 30 layers, hidden 576, 9/3 heads, MLP 1536
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 49152, (16, 64))
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, w = torch.randn(688, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
        linear = timed(lambda: [torch.nn.functional.linear(a, w) for _ in range(10)]) / 10  # noqa: B023
        m = model.to(dtype)
        with torch.no_grad():
            forward = timed(lambda: m.model(input_ids=ids), repeat=2)  # noqa: B023
        results[dtype] = (linear, forward)
        print(f"{str(dtype):>15}: linear 688x576 @ 576x1536 {1e3 * linear:6.1f} ms; "
              f"decoder forward 16 x 64 tokens {forward:5.2f} s ({16 * 64 / forward:.0f} tokens/s)")
    f32, b16 = results[torch.float32], results[torch.bfloat16]
    print(f"bf16 / fp32 time: linear {b16[0] / f32[0]:.1f}x, forward {b16[1] / f32[1]:.1f}x")


if __name__ == "__main__":
    main()
