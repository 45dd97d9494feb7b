#!/usr/bin/env python3
"""PyTorch's side of `cargo bench -p flexmodel-models --bench gemm`: GFLOP/s of
`torch.nn.functional.linear` on the 125M Llama's shapes, 2 threads, best of 10 after 3 warm-ups.

    bench/.venv/bin/python bench/torch_linear.py
"""
import time

import torch

torch.set_num_threads(2)
SHAPES = [(512, 768, 768), (512, 768, 256), (512, 768, 2048), (512, 2048, 768),
          (512, 768, 32000), (128, 768, 2048)]
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
print("| rows × in × out | torch linear GFLOP/s (best of 10) |\n| --- | ---: |")
with torch.no_grad():
    for m, k, n in SHAPES:
        x, w = torch.randn(m, k), torch.randn(n, k)
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        best = float("inf")
        for _ in range(10):
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - start)
        print(f"| {m} × {k} × {n} | {2 * m * k * n / best / 1e9:.1f} |")
