#!/usr/bin/env python3
"""The Python peers of `bench/peers.py`, behind a line protocol on stdin/stdout.

    peer_worker.py hf|flex-model|nnsight|flexmodel-py MODEL_DIR

Loads the checkpoint with transformers (f32, eval, no_grad, 2 threads), then reads one command
per line:

- `<job> <batch> <seq>` runs one forward pass and answers `<seconds> <captured tensors>`.
  Jobs: `plain`; `layers` (the output of every decoder layer); `all` (the output of every
  module that returns a tensor); `edit` (layer 5's MLP output replaced by zeros). Hooks are
  installed before and removed after the timed forward call; captures are real copies
  (`detach().clone()`: on CPU `.to("cpu")` would alias). `hf` is plain PyTorch forward hooks;
  `flex-model` is FlexModel 0.1.0 (single process, gloo world of 1) with one HookFunction per
  site, and supports `layers` and `edit`. `nnsight` is nnsight 0.8 tracing the same
  transformers model (`.output.save()` per layer, or the MLP's output set to zeros), and
  supports `layers` and `edit`. `flexmodel-py` is flexmodel's Python package on the same
  checkpoint: Python `HookFunction`s (captures, and an editing function that zeroes the MLP in
  place), its captures the engine's own host tensors (as the Rust worker's).
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
if peer == "flexmodel-py":
    import flexmodel

    fm_py = flexmodel.load(model_dir)
    vocab_size = fm_py.vocab_size
    layer_names = fm_py.decoder_layers
    module_names = [s.name for s in fm_py.sites() if s.kind == "module"]
else:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab_size = model.config.vocab_size
    layers_prefix = "transformer.h" if model.config.model_type == "gpt2" else "model.layers"
    layer_names = [f"{layers_prefix}.{i}" for i in range(model.config.num_hidden_layers)]
    module_names = [n for n, _ in model.named_modules() if n]
edited = f"{layer_names[5]}.mlp"

if peer == "flex-model":
    import torch.distributed as dist
    from flex_model.core import FlexModel, HookFunction

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    sock.close()
    dist.init_process_group("gloo", rank=0, world_size=1)
elif peer == "nnsight":
    from nnsight import NNsight

    traced = NNsight(model)
elif peer not in ("hf", "flexmodel-py"):
    raise SystemExit(f"unknown peer {peer!r} (expected hf, flex-model, nnsight or flexmodel-py)")


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


def zero_in_place(x, ctx):
    x[...] = 0


def run_flexmodel_py(job, ids):
    names = {"plain": [], "layers": layer_names, "all": module_names, "edit": []}[job]
    handles = [fm_py.register_forward_hook(flexmodel.HookFunction(n)) for n in names]
    if job == "edit":
        handles.append(fm_py.register_forward_hook(
            flexmodel.HookFunction(edited, editing_function=zero_in_place, capture=False)))
    try:
        start = time.perf_counter()
        fm_py(ids)
        seconds = time.perf_counter() - start
        return seconds, len(fm_py.output)
    finally:
        for h in handles:
            h.remove()
        fm_py.clear_output()


def run_nnsight(job, ids):
    if job not in ("layers", "edit"):
        raise ValueError(f"nnsight runs layers and edit, not {job}")
    # nnsight runs the with block's source on its own: results leave it through a list.
    saved = []
    start = time.perf_counter()
    with torch.no_grad():
        with traced.trace(ids):
            if job == "layers":
                for n in layer_names:
                    saved.append(traced.get(n).output.save())
            else:
                traced.get(edited).output[:] = 0
    return time.perf_counter() - start, len(saved)


def run(job, ids):
    """One timed forward pass; returns (seconds, tensors captured)."""
    store = {}
    if peer == "flexmodel-py":
        return run_flexmodel_py(job, ids.numpy())
    if peer == "nnsight":
        return run_nnsight(job, ids)
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
        ids = ((torch.arange(n, dtype=torch.int64) * 7919 + 13) % vocab_size).reshape(batch, seq)
        seconds, captured = run(job, ids)
        answer = f"{seconds} {captured}"
    print(answer, flush=True)
