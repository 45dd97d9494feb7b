#!/usr/bin/env python3
"""The patching sweep of `crates/flexmodel/benches/sweep.rs`, written with transformers' forward
hooks as a researcher would (the clean run's layer outputs cached once, patched runs batched,
`cells_per_pass` copies per forward), on the same weights and token ids; prints one JSON line.

    python bench/sweep.py MODEL_DIR TOKENS [CELLS_PER_PASS]
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    model_dir, tokens = sys.argv[1], int(sys.argv[2])
    cells_per_pass = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    layers = model.model.layers
    clean = torch.arange(1, tokens + 1)[None]
    corrupted = clean.clone()
    corrupted[0, tokens // 2] = tokens + 7

    def metric(logits):  # [rows, seq, vocab] -> [rows]
        return logits[:, -1, 1] - logits[:, -1, 2]

    @torch.no_grad()
    def sweep():
        cache = {}
        hooks = [layer.register_forward_hook(
            lambda m, i, o, l=l: cache.__setitem__(l, (o[0] if isinstance(o, tuple) else o).clone()))
            for l, layer in enumerate(layers)]
        clean_m = metric(model(clean).logits).item()
        for h in hooks:
            h.remove()
        corrupted_m = metric(model(corrupted).logits).item()
        cells = [(l, p) for l in range(len(layers)) for p in range(tokens)]
        values = []
        for i in range(0, len(cells), cells_per_pass):
            chunk = cells[i:i + cells_per_pass]
            batch = corrupted.repeat(len(chunk), 1)

            def patch(m, inp, out, l):
                h = out[0] if isinstance(out, tuple) else out
                h = h.clone()
                for k, (cl, p) in enumerate(chunk):
                    if cl == l:
                        h[k, p] = cache[l][0, p]
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

            hooks = [layer.register_forward_hook(lambda m, i, o, l=l: patch(m, i, o, l))
                     for l, layer in enumerate(layers)]
            values.extend(metric(model(batch).logits).tolist())
            for h in hooks:
                h.remove()
        return clean_m, corrupted_m, values

    sweep()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        clean_m, corrupted_m, values = sweep()
        times.append(time.perf_counter() - start)
    times.sort()
    print(json.dumps({"peer": "hf-hooks", "model": model_dir, "tokens": tokens,
                      "cells": len(values), "cells_per_pass": cells_per_pass,
                      "seconds": round(times[len(times) // 2], 4), "clean": round(clean_m, 4),
                      "corrupted": round(corrupted_m, 4), "last_cell": round(values[-1], 4)}))


if __name__ == "__main__":
    main()
