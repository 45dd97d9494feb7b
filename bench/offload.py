"""Layer-streamed offload on the random 125M Llama (transformers-written, bench/.cache/llama):
forward and harvest with and without `--offload`, against the disk's read bandwidth measured in
the same run, and against Accelerate's `device_map="auto"` with a `max_memory` that sends
layers to disk, on the same weights.

    FLEXMODEL_BENCH_PYTHON=/work/venv-ref/bin/python bash bench/offload.sh

The Python must have torch, transformers, accelerate and safetensors. Prints a Markdown table.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "target" / "release" / "flexmodel"
MODEL = ROOT / "bench" / ".cache" / "llama"
SEQ, ITERS = 128, 7


def drop_cache(path):
    """Evicts `path` from the page cache (the next read comes from the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_read_seconds(path):
    """Seconds to read `path` once from the disk, in 16 MB reads."""
    drop_cache(path)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass
    return time.perf_counter() - start


def flexmodel(args):
    """Runs the CLI with -v; returns (stdout, peak resident MB)."""
    run = subprocess.run([str(CLI), "-v", *args], capture_output=True, text=True,
                         env=dict(os.environ, RAYON_NUM_THREADS="2"))
    if run.returncode != 0:
        sys.exit(f"flexmodel {' '.join(args)} failed:\n{run.stderr}")
    peak = float(re.search(r"peak resident memory ([\d.]+) MB", run.stderr).group(1))
    return run.stdout, peak


def forward(offload, tmp):
    """Median seconds of a forward at 1x128 and at 8x128, and the peak resident MB."""
    out = Path(tmp) / "bench.json"
    args = ["bench", "--model", str(MODEL), "--shape", f"1x{SEQ}", "--shape", f"8x{SEQ}",
            "--job", "plain", "--iters", str(ITERS), "--warmup", "1", "--json", str(out)]
    if offload:
        args += ["--offload", offload]
    _, peak = flexmodel(args)
    rows = json.loads(out.read_text())["rows"]
    return [r["median_s"] for r in rows], peak


def harvest(offload, tmp, ids):
    out = Path(tmp) / f"harvest-{offload}"
    args = ["harvest", "--model", str(MODEL), "--data", str(ids), "--sites", "model.layers.*",
            "--out", str(out), "--seq-len", str(SEQ), "--batch-size", "8"]
    if offload:
        args += ["--offload", offload]
    stdout, peak = flexmodel(args)
    return float(re.search(r"([\d.]+) tokens/s", stdout).group(1)), peak


ACCELERATE = r"""
import json, os, resource, sys, time, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
model_dir, budget, folder = sys.argv[1], sys.argv[2], sys.argv[3]
kwargs = {} if budget == "none" else dict(
    device_map="auto", max_memory={"cpu": budget}, offload_folder=folder)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
medians = []
for batch in (1, 8):
    ids = torch.randint(0, 32000, (batch, %d), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for i in range(%d + 1):
            start = time.perf_counter()
            model(ids)
            if i:
                times.append(time.perf_counter() - start)
    medians.append(sorted(times)[len(times) // 2])
on_disk = sorted({str(d) for d in getattr(model, "hf_device_map", {}).values()})
print(json.dumps({"median_s": medians,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
                  "devices": on_disk}))
""" % (SEQ, ITERS)


def accelerate(budget, tmp):
    run = subprocess.run([sys.executable, "-c", ACCELERATE, str(MODEL), budget,
                          str(Path(tmp) / "offload")], capture_output=True, text=True)
    if run.returncode != 0:
        return None, run.stderr.strip().splitlines()[-1]
    return json.loads(run.stdout.strip().splitlines()[-1]), None


def main():
    weights = MODEL / "model.safetensors"
    size_mb = weights.stat().st_size / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        ids = Path(tmp) / "ids.safetensors"
        save_file({"input_ids": rng.integers(0, 32000, (32, SEQ), dtype=np.int64)}, str(ids))
        reads = [disk_read_seconds(weights) for _ in range(3)]
        read_s = sorted(reads)[1]
        print(f"weights: {size_mb:.0f} MB; read once from the disk (median of 3, page cache "
              f"dropped): {read_s:.3f} s ({size_mb / read_s:.0f} MB/s)\n")
        print(f"| run | forward 1x{SEQ} s | vs plain | vs one read of the weights | forward "
              f"8x{SEQ} s | vs plain | peak RSS MB | harvest 32x{SEQ} tokens/s | harvest peak "
              "RSS MB |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        plain = None
        for offload in [None, "cpu", "disk"]:
            (one, eight), peak = forward(offload, tmp)
            plain = plain or (one, eight)
            tps, hpeak = harvest(offload, tmp, ids)
            name = f"flexmodel --offload {offload}" if offload else "flexmodel"
            print(f"| {name} | {one:.3f} | {one / plain[0]:.2f}x | {one / read_s:.2f}x | "
                  f"{eight:.3f} | {eight / plain[1]:.2f}x | {peak:.0f} | {tps:.0f} | "
                  f"{hpeak:.0f} |")
        for budget in ["none", "200MiB"]:
            got, err = accelerate(budget, tmp)
            name = ("transformers" if budget == "none"
                    else f'Accelerate device_map="auto", max_memory cpu {budget}')
            if got is None:
                print(f"| {name} | failed: {err} | | | | | | | |")
                continue
            one, eight = got["median_s"]
            print(f"| {name} (devices {', '.join(got['devices']) or 'cpu'}) | "
                  f"{one:.3f} | {one / plain[0]:.2f}x | {one / read_s:.2f}x | {eight:.3f} | "
                  f"{eight / plain[1]:.2f}x | {got['peak_mb']:.0f} | – | – |")


if __name__ == "__main__":
    main()
