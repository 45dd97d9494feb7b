#!/usr/bin/env python3
"""The Python peers of `bench/peers.py`, behind a line protocol on stdin/stdout.

    peer_worker.py hf|flex-model MODEL_DIR

Loads the checkpoint with transformers (f32, eval, no_grad, 2 threads), then reads one command
per line:

- `<job> <batch> <seq>` runs one forward pass and answers `<seconds> <captured tensors>`.
  Jobs: `plain`; `layers` (the output of every decoder layer); `all` (the output of every
  module that returns a tensor); `edit` (layer 5's MLP output replaced by zeros). Hooks are
  installed before and removed after the timed forward call; captures are real copies
  (`detach().clone()`: on CPU `.to("cpu")` would alias). `hf` is plain PyTorch forward hooks;
  `flex-model` is FlexModel 0.1.0 (single process, gloo world of 1) with one HookFunction per
  site, and supports `layers` and `edit`.
- `rss` answers the process's peak resident set size in KiB; `quit` ends the worker.

Token ids are `(i * 7919 + 13) % vocab` for i in 0..batch*seq, as in every worker.
"""
import os
import socket
import sys
import time

import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(2)
peer, model_dir = sys.argv[1:3]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
config = model.config
layers_prefix = "transformer.h" if config.model_type == "gpt2" else "model.layers"
layer_names = [f"{layers_prefix}.{i}" for i in range(config.num_hidden_layers)]
module_names = [n for n, _ in model.named_modules() if n]
edited = f"{layers_prefix}.5.mlp"

if peer == "flex-model":
    import torch.distributed as dist
    from flex_model.core import FlexModel, HookFunction

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    sock.close()
    dist.init_process_group("gloo", rank=0, world_size=1)
elif peer != "hf":
    raise SystemExit(f"unknown peer {peer!r} (expected hf or flex-model)")


def first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):
        items = output.to_tuple()
        return items[0] if items and isinstance(items[0], torch.Tensor) else None
    return None


def hf_hooks(job, store):
    def keep(name):
        def hook(module, args, output):
            t = first_tensor(output)
            if t is not None:
                store[name] = t.detach().clone()
        return hook

    def zero(module, args, output):
        return torch.zeros_like(output)

    if job == "edit":
        return [model.get_submodule(edited).register_forward_hook(zero)]
    names = {"plain": [], "layers": layer_names, "all": module_names}[job]
    return [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]


def run(job, ids):
    """One timed forward pass; returns (seconds, tensors captured)."""
    store = {}
    if peer == "hf":
        handles = hf_hooks(job, store)
        try:
            start = time.perf_counter()
            with torch.no_grad():
                model(ids)
            return time.perf_counter() - start, len(store)
        finally:
            for h in handles:
                h.remove()
    if job not in ("layers", "edit"):
        raise ValueError(f"flex-model runs layers and edit, not {job}")
    fm = FlexModel(model, store, process_group=dist.group.WORLD)
    if job == "layers":
        for n in layer_names:
            fm.register_forward_hook(HookFunction(n, expected_shape=(None, None, None)))
    else:
        fm.register_forward_hook(HookFunction(
            edited, expected_shape=(None, None, None),
            editing_function=lambda module, x, save_ctx, modules: torch.zeros_like(x)))
    try:
        start = time.perf_counter()
        with torch.no_grad():
            fm(ids)
        return time.perf_counter() - start, len(store)
    finally:
        fm.restore()


def peak_rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


for line in sys.stdin:
    words = line.split()
    if words == ["quit"]:
        break
    if words == ["rss"]:
        answer = str(peak_rss_kib())
    else:
        job, batch, seq = words[0], int(words[1]), int(words[2])
        n = batch * seq
        ids = ((torch.arange(n, dtype=torch.int64) * 7919 + 13) % config.vocab_size).reshape(batch, seq)
        seconds, captured = run(job, ids)
        answer = f"{seconds} {captured}"
    print(answer, flush=True)
