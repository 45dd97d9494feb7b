#!/usr/bin/env python3
"""flexmodel side by side with transformers (PyTorch hooks), FlexModel 0.1.0 and candle-mi.

    bench/run.sh [--models llama,gpt2] [--shapes 1x128,4x128,1x512] [--repeats 7] [--smoke]

(`bench/run.sh` makes the Python venv and calls this with it.) The checkpoints are random
Llama- and GPT-2-shaped models of ~125M parameters (and Qwen 3 and Mixtral ones, with
`--models qwen3,mixtral`), written once by transformers into
`bench/.cache/` in the Hugging Face layout, so every peer loads the same weights. Each peer
runs in its own worker process speaking a line protocol (`bench/peer_worker.py`); a round
times every (job, peer) pair once, rotating the peer order, so all see the same machine load.
One warm-up round, then the median of `--repeats` rounds; only the forward call is timed.
Peak RSS comes from fresh workers, one per (peer, job): after loading, and after one job at
the longest sequence. Two threads everywhere. Prints markdown tables for BENCHMARKS.md and
writes every run to `--json`.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = BENCH / ".cache"
JOBS = ["plain", "layers", "all", "edit"]
# Which jobs each peer can run: FlexModel 0.1.0 and candle-mi are compared where they offer
# the same capture; candle-mi has no GPT-2.
# Qwen 3 and Mixtral (the later families) against transformers only.
FAMILY_JOBS = {"qwen3": JOBS, "mixtral": JOBS}
SUPPORTS = {
    "flexmodel": {"llama": JOBS, "gpt2": JOBS, **FAMILY_JOBS},
    "hf": {"llama": JOBS, "gpt2": JOBS, **FAMILY_JOBS},
    "flex-model": {"llama": ["layers", "edit"], "gpt2": ["layers", "edit"]},
    "flexmodel-py": {"llama": JOBS, "gpt2": JOBS},
    "nnsight": {"llama": ["layers", "edit"], "gpt2": ["layers", "edit"]},
    "candle-mi": {"llama": ["plain", "layers", "edit"]},
}
THREADS = {"RAYON_NUM_THREADS": "2", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}

MAKE_CHECKPOINT = r"""
import json, sys, torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          MixtralConfig, MixtralForCausalLM, Qwen3Config, Qwen3ForCausalLM)
name, out = sys.argv[1:3]
torch.manual_seed(0)
if name == "llama":
    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
elif name == "qwen3":  # the Llama's shape with Qwen 3's per-head q/k norms
    cfg = Qwen3Config(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                      head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg)
elif name == "mixtral":  # 8 experts, 2 per token: ~139M parameters, ~47M active per token
    cfg = MixtralConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024,
                        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                        num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=2048, tie_word_embeddings=False)
    model = MixtralForCausalLM(cfg)
else:
    model = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 12 x 768, 12 heads, vocab 50257
model.eval().save_pretrained(out)
# candle-mi reads rope_theta only at the top level (transformers 5 nests it).
path = f"{out}/config.json"
cfg = json.load(open(path))
if "rope_parameters" in cfg:
    cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
    json.dump(cfg, open(path, "w"), indent=2)
print(sum(p.numel() for p in model.parameters()))
"""


def checkpoint(python, name):
    out = CACHE / name
    if not (out / "model.safetensors").exists():
        print(f"writing the random {name} checkpoint to {out}", file=sys.stderr)
        subprocess.run([python, "-c", MAKE_CHECKPOINT, name, str(out)], check=True)
    return out


def build_flexmodel():
    """Builds the flexmodel worker (cargo's bench profile) and returns its path."""
    out = subprocess.run(
        ["cargo", "bench", "-p", "flexmodel", "--bench", "peers", "--no-run",
         "--message-format=json"],
        cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "peers" \
                and msg.get("executable"):
            return msg["executable"]
    raise SystemExit("cargo did not report the peers bench executable")


def build_candle_mi():
    manifest = BENCH / "candle-mi" / "Cargo.toml"
    subprocess.run(["cargo", "build", "--release", "--quiet", "--manifest-path", str(manifest)],
                   check=True)
    return str(BENCH / "candle-mi" / "target" / "release" / "candle-mi-worker")


class Worker:
    """One peer on one checkpoint, in its own process."""

    def __init__(self, command):
        env = dict(os.environ, **THREADS)
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True, bufsize=1)

    def ask(self, line):
        self.proc.stdin.write(line + "\n")
        answer = self.proc.stdout.readline()
        if not answer:
            raise SystemExit(f"worker {self.proc.args} died on {line!r}")
        return answer.split()

    def run(self, job, batch, seq):
        seconds, captured = self.ask(f"{job} {batch} {seq}")
        return float(seconds), int(captured)

    def peak_rss_mib(self):
        return int(self.ask("rss")[0]) / 1024

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait()


def loadavg():
    return open("/proc/loadavg").read().split()[0]


def time_model(commands, model, shapes, repeats):
    workers = {peer: Worker(cmd) for peer, cmd in commands.items()}
    results = []
    try:
        for batch, seq in shapes:
            pairs = [(job, peer) for job in JOBS for peer in workers
                     if job in SUPPORTS[peer].get(model, [])]
            times = {pair: [] for pair in pairs}
            captured = {}
            for round_ in range(1 + repeats):
                order = pairs[round_ % len(pairs):] + pairs[:round_ % len(pairs)]
                for job, peer in order:
                    seconds, captured[job, peer] = workers[peer].run(job, batch, seq)
                    if round_ > 0:
                        times[job, peer].append(seconds)
            for (job, peer), ts in times.items():
                results.append({"model": model, "batch": batch, "seq": seq, "job": job,
                                "peer": peer, "median_s": statistics.median(ts), "runs_s": ts,
                                "captured": captured[job, peer]})
            line = ", ".join(f"{job}/{peer} {statistics.median(ts) * 1e3:.0f} ms"
                             for (job, peer), ts in times.items())
            print(f"[{model} {batch}x{seq}] {line}", file=sys.stderr, flush=True)
    finally:
        for w in workers.values():
            w.close()
    return results


def memory_model(commands, model, batch, seq):
    results = []
    for peer, cmd in commands.items():
        for job in ["load", "layers", "all"]:
            if job != "load" and job not in SUPPORTS[peer].get(model, []):
                continue
            w = Worker(cmd)
            try:
                if job != "load":
                    w.run(job, batch, seq)
                results.append({"model": model, "batch": batch, "seq": seq, "job": job,
                                "peer": peer, "peak_rss_mib": w.peak_rss_mib()})
            finally:
                w.close()
    return results


def versions(python):
    probe = ("import torch, transformers, importlib.metadata as m\n"
             "def v(p):\n"
             "    try: return m.version(p)\n"
             "    except m.PackageNotFoundError: return '-'\n"
             "print(torch.__version__, transformers.__version__, v('flex-model'), v('nnsight'))")
    torch_v, transformers_v, flex_v, nnsight_v = subprocess.run(
        [python, "-c", probe], check=True, stdout=subprocess.PIPE, text=True).stdout.split()
    rustc = subprocess.run(["rustc", "--version"], stdout=subprocess.PIPE, text=True).stdout
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return {"date": datetime.datetime.now().isoformat(timespec="minutes"),
            "cpu": cpu, "cores": os.cpu_count(), "flexmodel": commit,
            "rustc": rustc.split()[1], "torch": torch_v, "transformers": transformers_v,
            "flex-model": flex_v, "nnsight": nnsight_v, "candle-mi": "0.2.2",
            "python": platform.python_version()}


def report(meta, timings, memory, peers):
    print(f"\n{meta['date']}, {meta['cpu']}, {meta['cores']} cores, 2 threads per peer, "
          f"load average {meta['load_before']} before, {meta['load_after']} after; "
          f"flexmodel {meta['flexmodel']} (rustc {meta['rustc']}), torch {meta['torch']}, "
          f"transformers {meta['transformers']}, flex-model {meta['flex-model']}, "
          f"nnsight {meta.get('nnsight', '-')}, candle-mi {meta['candle-mi']}, "
          f"Python {meta['python']}.\n")
    others = [p for p in peers if p != "flexmodel"]
    by_key = {(r["model"], r["batch"], r["seq"], r["job"], r["peer"]): r for r in timings}
    head = ["model", "shape", "job", "flexmodel"] + others + [f"÷ {p}" for p in others]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for model, batch, seq, job, peer in by_key:
        if peer != "flexmodel":
            continue
        ours = by_key[model, batch, seq, job, "flexmodel"]["median_s"]
        cells = [model, f"{batch}×{seq}", job, f"{ours * 1e3:.0f} ms"]
        ratios = []
        for p in others:
            r = by_key.get((model, batch, seq, job, p))
            cells.append(f"{r['median_s'] * 1e3:.0f} ms" if r else "–")
            ratios.append(f"{ours / r['median_s']:.2f}" if r else "–")
        print("| " + " | ".join(cells + ratios) + " |")
    if "flexmodel-py" in peers:
        python_side(by_key, [p for p in peers if p != "flexmodel-py"])
    print("\nflexmodel's own capture overhead (median ÷ its plain forward, same run):\n")
    print("| model | shape | layers | all |\n|---|---|---|---|")
    for (model, batch, seq, job, peer), r in by_key.items():
        if job == "plain" and peer == "flexmodel":
            cells = [f"{by_key[model, batch, seq, j, peer]['median_s'] / r['median_s']:.3f}"
                     for j in ["layers", "all"]]
            print(f"| {model} | {batch}×{seq} | " + " | ".join(cells) + " |")
    if memory:
        print("\nPeak RSS (MiB; fresh process per cell; ratio ÷ transformers):\n")
        head = ["model", "job"] + peers
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        mem = {(r["model"], r["job"], r["peer"]): r for r in memory}
        shape = f"{memory[0]['batch']}×{memory[0]['seq']}"
        for model, job in dict.fromkeys((r["model"], r["job"]) for r in memory):
            hf = mem.get((model, job, "hf"))
            cells = []
            for p in peers:
                r = mem.get((model, job, p))
                if not r:
                    cells.append("–")
                    continue
                ratio = f" ({r['peak_rss_mib'] / hf['peak_rss_mib']:.2f})" if hf else ""
                cells.append(f"{r['peak_rss_mib']:.0f}{ratio}")
            label = job if job == "load" else f"{job} {shape}"
            print(f"| {model} | {label} | " + " | ".join(cells) + " |")


def python_side(by_key, others):
    """The Python package against the Rust API and the Python peers: flexmodel-py's median
    divided by each one's."""
    print("\nflexmodel's Python package (median; ratio: flexmodel-py ÷ the peer):\n")
    head = ["model", "shape", "job", "flexmodel-py"] + [f"÷ {p}" for p in others]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for model, batch, seq, job, peer in list(by_key):
        if peer != "flexmodel-py":
            continue
        ours = by_key[model, batch, seq, job, peer]["median_s"]
        cells = [model, f"{batch}×{seq}", job, f"{ours * 1e3:.1f} ms"]
        for p in others:
            r = by_key.get((model, batch, seq, job, p))
            cells.append(f"{ours / r['median_s']:.3f} ({r['median_s'] * 1e3:.1f} ms)" if r else "–")
        print("| " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=sys.executable,
                    help="a Python with torch, transformers and flex-model")
    ap.add_argument("--models", default="llama,gpt2")
    ap.add_argument("--shapes", default="1x128,4x128,1x512")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--peers", default="flexmodel,hf,flex-model,candle-mi")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS runs")
    ap.add_argument("--json", default=str(BENCH / ".cache" / "peers.json"))
    ap.add_argument("--smoke", action="store_true", help="one round at 1x16, to try the harness")
    a = ap.parse_args()
    if a.smoke:
        a.shapes, a.repeats = "1x16", 1
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    peers = a.peers.split(",")
    unknown = set(peers) - set(SUPPORTS)
    if unknown:
        raise SystemExit(f"unknown peers {sorted(unknown)}; known: {sorted(SUPPORTS)}")
    python = a.python
    binaries = {"flexmodel": build_flexmodel()}
    if "candle-mi" in peers:
        try:
            binaries["candle-mi"] = build_candle_mi()
        except subprocess.CalledProcessError as e:
            print(f"warning: the candle-mi worker did not build ({e}); running without it",
                  file=sys.stderr)
            peers.remove("candle-mi")
    meta = versions(python)
    meta["load_before"] = loadavg()
    timings, memory = [], []
    for model in a.models.split(","):
        ckpt = str(checkpoint(python, model))
        commands = {}
        for peer in peers:
            if model not in SUPPORTS[peer]:
                continue
            if peer in ("hf", "flex-model", "nnsight", "flexmodel-py"):
                commands[peer] = [python, str(BENCH / "peer_worker.py"), peer, ckpt]
            elif peer == "flexmodel":
                commands[peer] = [binaries[peer], "--bench", ckpt]
            else:
                commands[peer] = [binaries[peer], ckpt]
        timings += time_model(commands, model, shapes, a.repeats)
        if not a.no_memory:
            batch, seq = max(shapes, key=lambda s: (s[1], s[0]))
            memory += memory_model(commands, model, batch, seq)
    meta["load_after"] = loadavg()
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"meta": meta, "timings": timings, "memory": memory}, f, indent=1)
    report(meta, timings, memory, peers)


if __name__ == "__main__":
    main()
