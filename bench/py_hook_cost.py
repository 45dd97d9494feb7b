#!/usr/bin/env python3
"""What a hook registered from Python costs per site, on the benchmark's 125M Llama.

    bench/.venv/bin/python bench/py_hook_cost.py [--model bench/.cache/llama] [--shape 1x16]

Registers a hook at every site (`*`) of the model and times the forward pass against the
plain one, interleaved, median of --repeats rounds (2 threads):

- `passthrough`: an editing function that returns its argument (a Python call per site: the
  trampoline, the context, the zero-copy array, the identity check);
- `capture`: a capture (the engine's own host tensor, no Python during the pass); then
  `read`: handing every capture to Python as numpy arrays (`fm.output[key]`, no copy).

Per-site cost = (hooked - plain) / sites. Prints a markdown table for BENCHMARKS.md.
"""
import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "2")
import numpy as np  # noqa: E402

import flexmodel  # noqa: E402

BENCH = Path(__file__).resolve().parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(BENCH / ".cache" / "llama"))
    ap.add_argument("--shape", default="1x16")
    ap.add_argument("--repeats", type=int, default=30)
    a = ap.parse_args()
    batch, seq = (int(x) for x in a.shape.split("x"))
    fm = flexmodel.load(a.model)
    sites = len(fm.sites())
    ids = ((np.arange(batch * seq) * 7919 + 13) % fm.vocab_size).reshape(batch, seq)

    def plain():
        start = time.perf_counter()
        fm(ids)
        return time.perf_counter() - start

    def hooked(edit):
        h = fm.register_forward_hook(flexmodel.HookFunction(
            "*", editing_function=(lambda x, ctx: x) if edit else None, capture=not edit))
        start = time.perf_counter()
        fm(ids)
        forward = time.perf_counter() - start
        start = time.perf_counter()
        n = sum(len(fm.output[k]) for k in fm.output)
        read = time.perf_counter() - start
        h.remove()
        fm.clear_output()
        return forward, read, n

    for _ in range(3):
        plain(), hooked(True), hooked(False)
    times = {"plain": [], "passthrough": [], "capture": [], "read": []}
    firings = 0
    for _ in range(a.repeats):
        times["plain"].append(plain())
        times["passthrough"].append(hooked(True)[0])
        forward, read, firings = hooked(False)
        times["capture"].append(forward)
        times["read"].append(read)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.model}, {batch}x{seq}, {sites} sites ({firings} firings per pass), "
          f"median of {a.repeats}: plain forward {med['plain'] * 1e3:.2f} ms\n")
    print("| hook at every site | forward | per site |\n|---|---|---|")
    for job in ("passthrough", "capture"):
        per = (med[job] - med["plain"]) / firings
        print(f"| {job} | {med[job] * 1e3:.2f} ms | {per * 1e6:.2f} µs |")
    print(f"| read every capture as numpy | {med['read'] * 1e3:.2f} ms | "
          f"{med['read'] / firings * 1e6:.2f} µs |")


if __name__ == "__main__":
    main()
