#!/usr/bin/env python3
"""Hugging Face side of `cargo bench -p flexmodel-models --bench generate`.

Loads a checkpoint directory with transformers (f32, eval, no_grad, 2 threads) and answers
commands on stdin, one per line, so that the Rust benchmark can alternate with it in one run:

    BATCH PROMPT NEW CAPTURE   ->  seconds of one greedy `generate` (NEW tokens exactly, no EOS),
                                   with a forward hook storing every decoder layer's output when
                                   CAPTURE is 1

Prompts are random token ids from a fixed seed, the same ones the Rust side uses (given on the
line after the command as space-separated ids).
"""
import sys
import time

import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
layers = model.model.layers
store = []


def keep(module, args, output):
    store.append((output[0] if isinstance(output, tuple) else output).detach().clone())


print("ready", flush=True)
for line in sys.stdin:
    batch, prompt, new, capture = map(int, line.split())
    ids = torch.tensor([int(t) for t in sys.stdin.readline().split()]).reshape(batch, prompt)
    handles = [layer.register_forward_hook(keep) for layer in layers] if capture else []
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        elapsed = time.perf_counter() - start
    for h in handles:
        h.remove()
    store.clear()
    assert out.shape == (batch, prompt + new), out.shape
    print(f"{elapsed:.6f}", flush=True)
