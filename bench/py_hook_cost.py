#!/usr/bin/env python3
"""What a hook registered from Python costs per site, on the benchmark's 125M Llama.

    bench/.venv/bin/python bench/py_hook_cost.py [--model bench/.cache/llama] [--shape 1x16]

Registers a hook at every site (`*`) of the model and times the forward pass against the
plain one, interleaved (the order rotating from round to round), median of --repeats rounds
(2 threads):

- `passthrough`: an editing function that returns its argument (a Python call per site: the
  trampoline, the context, the zero-copy array, the identity check);
- `bare call`: what bounds it, a raw callback on the native module that returns at once (the
  GIL taken back from the released engine, one Python call, no array), and `bare call +
  array` (that callback making the numpy array of its argument);
- `capture`: a capture (the engine's own host tensor, no Python during the pass); then
  `read`: handing every capture to Python as numpy arrays (`fm.output[key]`, no copy).

Per-site cost = (hooked - plain) / firings, with --per-site hooks at every site (so that the
hooks' time stands out of the forward's noise). With --hf, the same for PyTorch forward hooks on
every module of the transformers model (one returning its output, one keeping
`output.detach()`), in the same run. Prints a markdown table for BENCHMARKS.md.
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
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--per-site", type=int, default=10,
                    help="hooks registered at every site (more firings, less noise per firing)")
    ap.add_argument("--hf", action="store_true", help="also PyTorch hooks in transformers")
    a = ap.parse_args()
    batch, seq = (int(x) for x in a.shape.split("x"))
    fm = flexmodel.load(a.model)
    sites = len(fm.sites())
    ids = ((np.arange(batch * seq) * 7919 + 13) % fm.vocab_size).reshape(batch, seq)

    def plain():
        start = time.perf_counter()
        fm(ids)
        return time.perf_counter() - start

    k = a.per_site

    def bare(callback):
        hooks = [fm._native.register("*", "output", None, callback, False, [], "all", 0, 0)
                 for _ in range(k)]
        start = time.perf_counter()
        fm(ids)
        seconds = time.perf_counter() - start
        for h in hooks:
            fm._native.remove(h)
        return seconds

    def hooked(edit):
        hook = flexmodel.HookFunction(
            "*", editing_function=(lambda x, ctx: x) if edit else None, capture=not edit)
        handles = [fm.register_forward_hook(hook) for _ in range(k)]
        start = time.perf_counter()
        fm(ids)
        forward = time.perf_counter() - start
        start = time.perf_counter()
        n = sum(len(fm.output[key]) for key in fm.output)
        read = time.perf_counter() - start
        for h in handles:
            h.remove()
        fm.clear_output()
        return forward, read, n

    for _ in range(3):
        plain(), hooked(True), hooked(False)
    times = {"plain": [], "passthrough": [], "capture": [], "read": [], "bare call": [],
             "bare call + array": []}
    jobs = {
        "plain": plain,
        "passthrough": lambda: hooked(True)[0],
        "bare call": lambda: bare(lambda *args: None),
        "bare call + array": lambda: bare(lambda raw, *args: (np.asarray(raw), None)[1]),
        "capture": lambda: hooked(False),
    }
    names = list(jobs)
    firings = 0
    for round_ in range(a.repeats):
        # The order rotates, so that no job always follows the same one.
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            result = jobs[name]()
            if name == "capture":
                forward, read, firings = result
                times["capture"].append(forward)
                times["read"].append(read)
            else:
                times[name].append(result)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.model}, {batch}x{seq}, {sites} sites, {k} hooks each ({firings} firings per pass), "
          f"median of {a.repeats}: plain forward {med['plain'] * 1e3:.2f} ms\n")
    print("| hook at every site | forward | per site |\n|---|---|---|")
    for job in ("passthrough", "bare call", "bare call + array", "capture"):
        per = (med[job] - med["plain"]) / firings
        print(f"| {job} | {med[job] * 1e3:.2f} ms | {per * 1e6:.2f} µs |")
    print(f"| read every capture as numpy | {med['read'] * 1e3:.2f} ms | "
          f"{med['read'] / firings * 1e6:.2f} µs |")
    if a.hf:
        hf_costs(a.model, ids, a.repeats, k)


def hf_costs(model_dir, ids, repeats, k):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    modules = [m for n, m in model.named_modules() if n]
    ids = torch.tensor(ids)
    kept = []
    hooks = {"passthrough": lambda m, args, out: out,
             "capture": lambda m, args, out: kept.append(
                 out.detach() if isinstance(out, torch.Tensor) else out)}

    def forward(hook):
        handles = [m.register_forward_hook(hooks[hook]) for m in modules for _ in range(k)
                   if hook]
        start = time.perf_counter()
        with torch.no_grad():
            model(ids)
        seconds = time.perf_counter() - start
        for h in handles:
            h.remove()
        kept.clear()
        return seconds

    times = {None: [], "passthrough": [], "capture": []}
    order = list(times)
    for round_ in range(3 + repeats):
        for hook in order[round_ % 3:] + order[:round_ % 3]:
            t = forward(hook)
            if round_ >= 3:
                times[hook].append(t)
    plain = statistics.median(times[None])
    print(f"\ntransformers, {len(modules)} modules, {k} hooks each, plain forward "
          f"{plain * 1e3:.2f} ms\n")
    print("| PyTorch hook at every module | forward | per module |\n|---|---|---|")
    for hook in ("passthrough", "capture"):
        m = statistics.median(times[hook])
        print(f"| {hook} | {m * 1e3:.2f} ms | {(m - plain) / (len(modules) * k) * 1e6:.2f} µs |")


if __name__ == "__main__":
    main()
