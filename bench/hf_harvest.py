#!/usr/bin/env python3
"""Hugging Face side of `cargo bench -p flexmodel --bench harvest`: the loop a researcher
writes by hand to harvest activations with transformers.

    hf_harvest.py MODEL_DIR DATA.safetensors OUT_DIR BATCH SHARD_TOKENS

Loads the checkpoint (f32, eval, no_grad, 2 threads), registers a forward hook on every decoder
layer, runs the documents of DATA (`input_ids` [docs, len], one row each) in batches, keeps each
layer's output per token, and writes a safetensors shard (`input_ids` and one tensor per layer,
named like flexmodel's) whenever SHARD_TOKENS tokens are buffered, and at the end. Prints the
seconds of the loop (after one warm-up batch, model loading excluded), then the seconds of the
model's plain forward over the same batches with the hooks removed (what the loop's speed is
bounded by).
"""
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

model_dir, data, out_dir, batch, shard_tokens = sys.argv[1:6]
batch, shard_tokens = int(batch), int(shard_tokens)
torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
ids = load_file(data)["input_ids"]
layers = model.model.layers
captured = {}


def hook(name):
    def keep(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        captured[name] = out.detach().reshape(-1, out.shape[-1])
    return keep


handles = [layer.register_forward_hook(hook(f"model.layers.{i}"))
           for i, layer in enumerate(layers)]

with torch.no_grad():
    model(ids[:batch])  # warm-up
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    buffered, tokens, shard = {}, 0, 0

    def flush():
        global buffered, tokens, shard
        tensors = {k: torch.cat(v).contiguous() for k, v in buffered.items()}
        save_file(tensors, os.path.join(out_dir, f"shard-{shard:06}.safetensors"))
        buffered, tokens, shard = {}, 0, shard + 1

    for b in range(0, ids.shape[0], batch):
        rows = ids[b:b + batch]
        model(rows)
        buffered.setdefault("input_ids", []).append(rows.reshape(-1))
        for name, t in captured.items():
            buffered.setdefault(name, []).append(t)
        tokens += rows.numel()
        if tokens >= shard_tokens:
            flush()
    if tokens:
        flush()
    elapsed = time.perf_counter() - start
    for h in handles:
        h.remove()
    start = time.perf_counter()
    for b in range(0, ids.shape[0], batch):
        model(ids[b:b + batch])
    plain = time.perf_counter() - start
print(f"{elapsed:.6f} {plain:.6f}", flush=True)
