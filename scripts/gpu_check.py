#!/usr/bin/env python3
"""The GPU check of flexmodel: parity with transformers, and speed side by side with it.

Run through scripts/gpu-check.sh, which sets up the CUDA libraries' paths. Steps:
  1. `flexmodel check` on the GPU: the device against the CPU, and every collective of a
     world-1 NCCL communicator against its definition.
  2. Parity: every fixture architecture on the GPU against the transformers reference
     activations (f32: logits, every module, an edit, the gradients <= 1e-4 relative, and
     greedy generation's 12 tokens equal; bf16: logits and every module <= 2e-2).
  3. Device-to-host bandwidth, pinned and pageable (torch), the limit for captures.
  4. Speed: random Llama-shaped models (1.1B, 6.7B) in bf16, batch 1 and 4 x seq 512:
     transformers (sdpa) plain, with forward hooks copying every decoder layer's output to
     the host, and on every module; `flexmodel bench` plain, layers, modules, sites on the
     same weights, in the same run.
  5. With --harvest-docs N: harvest every decoder layer's output (bf16) of N documents of 512
     tokens into shards on disk, the 1.1B model: `flexmodel harvest` against the loop a
     researcher writes with transformers (hooks, torch.cat, safetensors save_file per shard,
     synced and renamed as ours are), the first size of --sizes (`--sizes 125m` is the harvest
     benchmark's model). A short harvest first loads the CUDA kernels, as the transformers
     side is warm from its timing runs.
  With --profile (before 3): every kernel of one 4x512 forward of a 2-layer 1.1B-shaped model
     timed by Nsight Compute (ncu), ours and transformers', summed by kernel name (CSV in $OUT).
Writes $OUT/gpu_check.json (or --out-dir) and prints a table last. `--device cpu` runs the
same steps on the CPU with tiny models (a dry run of the script where there is no GPU).
"""
import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file, save_file

SIZES = {
    # the harvest benchmark's random Llama (crates/flexmodel-models/src/random.rs, LLAMA_125M)
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, vocab_size=32000),
    # TinyLlama-1.1B's shape
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    # Llama-2-7B's shape
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    # for a dry run
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def flexmodel_env():
    """The environment the binary runs in: the CUDA libraries gpu-check.sh found."""
    env = dict(os.environ)
    if os.environ.get("FLEXMODEL_LIBRARY_PATH"):
        env["LD_LIBRARY_PATH"] = os.environ["FLEXMODEL_LIBRARY_PATH"]
    return env


def flexmodel(binary, *args):
    """Runs the binary; returns stdout, raising with stderr on failure."""
    p = subprocess.run([binary, *args], capture_output=True, text=True, env=flexmodel_env())
    if p.returncode != 0:
        raise RuntimeError(f"flexmodel {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return p.stdout


def rel_err(a, b):
    """||a - b|| / ||b|| in f64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def attempt(res, what, fn, *args):
    """`fn(*args)`, or None with the error kept in res["errors"]: one failing step must not
    cost the others their results on a machine lent for minutes."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        log(f"{what} FAILED: {e}")
        res.setdefault("errors", {})[what] = str(e)[-2000:]
        return None


def parity(binary, fixtures, device, tmp, res):
    """Every fixture architecture on `device` against the transformers references."""
    rows = []
    for arch in sorted(os.listdir(fixtures)):
        d = os.path.join(fixtures, arch)
        if not os.path.exists(os.path.join(d, "reference.json")):
            continue
        row = attempt(res, f"parity {arch}", parity_of, binary, d, arch, device, tmp)
        if row:
            rows.append(row)
    return rows


def parity_of(binary, d, arch, device, tmp):
    """One architecture's parity in f32 and bf16."""
    meta = json.load(open(os.path.join(d, "reference.json")))
    refs = load_file(os.path.join(d, "reference.safetensors"))
    modules = [k for k, m in meta["keys"].items() if m["kind"] == "module_output"]
    grads = [k[len("grad."):] for k in meta["keys"] if k.startswith("grad.") and k != "grad.loss"]
    row = dict(arch=arch)
    for dtype, tol in (("f32", 1e-4), ("bf16", 2e-2)):
        out = os.path.join(tmp, f"{arch}-{dtype}.safetensors")
        args = ["run", "--model", d, "--input-ids", os.path.join(d, "reference.safetensors"),
                "--capture", "*", "--out", out, "--device", device, "--compute-dtype", dtype]
        if dtype == "f32":
            for g in grads:
                args += ["--grad", g]
        flexmodel(binary, *args)
        got = load_file(out)
        errs = {"logits": rel_err(got["logits"], refs["logits"])}
        errs.update({k: rel_err(got[k], refs[k]) for k in modules})
        if dtype == "f32":
            errs.update({f"grad.{g}": rel_err(got[f"grad.{g}"], refs[f"grad.{g}"]) for g in grads})
            errs["loss"] = rel_err(got["loss"].reshape(()), refs["grad.loss"].reshape(()))
            # The reference edit: the module's output times zero.
            out = os.path.join(tmp, f"{arch}-edit.safetensors")
            flexmodel(binary, "run", "--model", d, "--input-ids",
                      os.path.join(d, "reference.safetensors"), "--edit",
                      f"{meta['edit']['module']}=zero", "--out", out, "--device", device)
            errs["edit.logits"] = rel_err(load_file(out)["logits"], refs["edit.mlp_zero.logits"])
            # Greedy generation with the key/value cache: the same 12 tokens as transformers'.
            out = os.path.join(tmp, f"{arch}-generate.safetensors")
            flexmodel(binary, "generate", "--model", d, "--input-ids",
                      os.path.join(d, "reference.safetensors"), "--max-new-tokens", "12",
                      "--ignore-eos", "--out", out, "--device", device)
            same = torch.equal(load_file(out)["sequences"].long(), refs["generate.greedy"].long())
            errs["generate.greedy"] = 0.0 if same else float("inf")
        worst = max(errs, key=errs.get)
        row[dtype] = dict(tensors=len(errs), max_rel_err=errs[worst], worst=worst,
                          tol=tol, ok=errs[worst] <= tol)
    log(f"parity {arch}: f32 {row['f32']['max_rel_err']:.1e} ({row['f32']['tensors']} tensors), "
        f"bf16 {row['bf16']['max_rel_err']:.1e}")
    return row


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn, iters, warm=2):
    for _ in range(warm):
        fn()
    sync()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def d2h_bandwidth(dev, nbytes=512 << 20):
    if dev.type != "cuda" or not torch.cuda.is_available():
        return {}
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev).normal_()
    res = {}
    pageable = torch.empty_like(x, device="cpu")
    pinned = torch.empty_like(x, device="cpu").pin_memory()
    for name, buf in (("pageable", pageable), ("pinned", pinned)):
        med = timeit(lambda: buf.copy_(x, non_blocking=(name == "pinned")), 5, 1)
        res[name + "_GBps"] = nbytes / med / 1e9
    return res


def hf_harvest(model, ids, out_dir, batch=4, shard_tokens=8192):
    """The hand-written transformers harvest loop; tokens per second (one warm-up batch)."""
    captured = {}

    def hook(name):
        def keep(_m, _i, output):
            out = output[0] if isinstance(output, tuple) else output
            captured[name] = out.detach().reshape(-1, out.shape[-1]).to("cpu")
        return keep

    hs = [layer.register_forward_hook(hook(f"model.layers.{i}"))
          for i, layer in enumerate(model.model.layers)]
    os.makedirs(out_dir, exist_ok=True)
    with torch.no_grad():
        model(ids[:batch])
        sync()
        start = time.perf_counter()
        buffered, tokens, shard = {}, 0, 0

        def flush(buffered, shard):
            # As crash-safe as ours: a temporary name, synced, then renamed.
            tensors = {k: torch.cat(v).contiguous() for k, v in buffered.items()}
            path = os.path.join(out_dir, f"shard-{shard:06}.safetensors")
            save_file(tensors, path + ".tmp")
            fd = os.open(path + ".tmp", os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            os.rename(path + ".tmp", path)

        for b in range(0, ids.shape[0], batch):
            rows = ids[b:b + batch]
            model(rows)
            buffered.setdefault("input_ids", []).append(rows.reshape(-1).cpu())
            for name, t in captured.items():
                buffered.setdefault(name, []).append(t)
            tokens += rows.numel()
            if tokens >= shard_tokens:
                flush(buffered, shard)
                buffered, tokens, shard = {}, 0, shard + 1
        if tokens:
            flush(buffered, shard)
        elapsed = time.perf_counter() - start
    for h in hs:
        h.remove()
    return ids.numel() / elapsed


def harvest_ids(docs, vocab):
    return torch.tensor([(i * 7919 + 13) % vocab for i in range(docs * 512)]).reshape(docs, 512)


def fm_harvest(binary, model_dir, device, data, layers, out_dir):
    """`flexmodel harvest` of every decoder layer in bf16; its own tokens/s."""
    args = ["harvest", "--model", model_dir, "--data", data, "--out", out_dir,
            "--device", device, "--compute-dtype", "bf16", "--dtype", "bf16",
            "--seq-len", "512", "--batch-size", "4", "--shard-tokens", "8192", "--sites"]
    args += [f"model.layers.{i}" for i in range(layers)]
    # A first short run loads and JIT-compiles the CUDA kernels (cached for the next process),
    # as the transformers side is warm from its timing runs.
    warm = [out_dir + "-warm" if a == out_dir else a for a in args]
    flexmodel(binary, *warm, "--max-tokens", "2048")
    subprocess.run(["rm", "-rf", out_dir + "-warm"])
    line = flexmodel(binary, *args)
    log(line)
    return float(line.split(" tokens/s")[0].rsplit(" ", 1)[1])


def random_llama(shape, dev, model_dir):
    """A random Llama of `shape` (keyword arguments of LlamaConfig) in bf16 on `dev`, saved to
    `model_dir` for flexmodel; returns the transformers model and its config."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(max_position_embeddings=4096, **shape)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    finally:
        torch.set_default_dtype(prev)
    t0 = time.time()
    model.save_pretrained(model_dir, safe_serialization=True)
    log(f"saved to {model_dir} in {time.time() - t0:.1f}s")
    return model, cfg


def hf_side(size, dev, shapes, iters, model_dir, harvest_docs=0, tmp=None):
    """Builds the random model, saves it for flexmodel, and times transformers on it."""
    model, cfg = random_llama(SIZES[size], dev, model_dir)
    rows = []
    layers = [m for m in model.model.layers]
    mods = [m for n, m in model.named_modules() if n and n != "model.layers"]
    for batch, seq in shapes:
        ids = torch.tensor([[(i * 7919 + 13) % cfg.vocab_size for i in range(batch * seq)]],
                           device=dev).reshape(batch, seq)
        store = []

        def hook(_m, _i, out):
            if hasattr(out, "to_tuple"):
                out = out.to_tuple()
            t = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(t, torch.Tensor):
                store.append(t.detach().to("cpu"))

        @torch.no_grad()
        def plain():
            model(ids)

        row = dict(size=size, batch=batch, seq=seq,
                   params=sum(p.numel() for p in model.parameters()))
        row["hf_plain_s"] = timeit(plain, iters)
        for key, targets in (("hf_layers_s", layers), ("hf_modules_s", mods)):
            hs = [m.register_forward_hook(hook) for m in targets]
            row[key] = timeit(lambda: (store.clear(), plain()), iters)
            row[key.replace("_s", "_bytes")] = sum(t.numel() * t.element_size() for t in store)
            for h in hs:
                h.remove()
        rows.append(row)
    if harvest_docs:
        ids = harvest_ids(harvest_docs, cfg.vocab_size).to(dev)
        rows[0]["harvest_tokens"] = ids.numel()
        rows[0]["hf_harvest_tok_s"] = hf_harvest(model, ids, os.path.join(tmp, "hf-harvest"))
        save_file({"input_ids": ids.cpu()}, os.path.join(tmp, "docs.safetensors"))
        subprocess.run(["rm", "-rf", os.path.join(tmp, "hf-harvest")])
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def ours(binary, model_dir, device, shapes, iters, tmp, dtype):
    out = os.path.join(tmp, "bench.json")
    args = ["bench", "--model", model_dir, "--device", device, "--compute-dtype", dtype,
            "--iters", str(iters), "--json", out]
    for b, s in shapes:
        args += ["--shape", f"{b}x{s}"]
    log(flexmodel(binary, *args))
    return json.load(open(out))["rows"]


HF_PASS = """
import sys, torch
from transformers import LlamaForCausalLM
dev = sys.argv[3]
model = LlamaForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16,
                                         attn_implementation="sdpa").to(dev).eval()
b, s = map(int, sys.argv[2].split("x"))
ids = torch.arange(b * s, device=dev).reshape(b, s) % model.config.vocab_size
with torch.no_grad():
    model(ids)
if dev == "cuda":
    torch.cuda.synchronize()
"""


def kernel_times(command, env=None):
    """Runs `command` under Nsight Compute, timing every kernel; returns {kernel name:
    [launches, total ms]} and the raw CSV."""
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    p = subprocess.run([ncu, "--clock-control", "none", "--csv", "--metrics",
                        "gpu__time_duration.sum", *command],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"ncu {' '.join(command[:3])} failed:\n{p.stderr[-3000:]}")
    lines = p.stdout[p.stdout.find('"ID"'):].splitlines()
    kernels = {}
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(row.get("Metric Unit"), 1e-6)
        k = kernels.setdefault(row["Kernel Name"][:90], [0, 0.0])
        k[0] += 1
        k[1] += float(row["Metric Value"].replace(",", "")) * scale
    return kernels, p.stdout


def profile(binary, device, dev, tmp, out_dir, shape="4x512", layers=2):
    """Where the GPU time of one plain forward goes, kernel by kernel (Nsight Compute), ours and
    transformers', on a `layers`-layer model of the 1.1B shape."""
    model_dir = os.path.join(tmp, "profile-model")
    random_llama(dict(SIZES["1b"], num_hidden_layers=layers), dev, model_dir)
    ours, raw = kernel_times([binary, "bench", "--model", model_dir, "--device", device,
                              "--compute-dtype", "bf16", "--shape", shape, "--job", "plain",
                              "--iters", "1", "--warmup", "0"], flexmodel_env())
    open(os.path.join(out_dir, "profile_ours.csv"), "w").write(raw)
    theirs, raw = kernel_times([sys.executable, "-c", HF_PASS, model_dir, shape, dev.type])
    open(os.path.join(out_dir, "profile_hf.csv"), "w").write(raw)
    return dict(shape=shape, layers=layers, ours=ours, hf=theirs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--sizes", default="1b,7b")
    ap.add_argument("--shapes", default="1x512,4x512")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--skip", default="", help="steps to skip: check,parity,bench")
    ap.add_argument("--profile", action="store_true",
                    help="time every kernel of one 4x512 forward of a 2-layer 1.1B-shaped model, "
                         "ours and transformers' (Nsight Compute)")
    ap.add_argument("--harvest-docs", type=int, default=0,
                    help="documents of 512 tokens for the harvest comparison (0: skip it)")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    dev = torch.device("cuda" if a.device.startswith("cuda") else "cpu")
    shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
    import transformers
    res = dict(info=dict(torch=torch.__version__, transformers=transformers.__version__,
                         device=a.device,
                         gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                         time=time.strftime("%Y-%m-%d %H:%M:%S")))
    scratch = os.environ.get("FLEXMODEL_GPU_SCRATCH", tempfile.gettempdir())
    out_json = os.path.join(a.out_dir, "gpu_check.json")

    def save():  # after every step, so that a run cut short still leaves its results
        json.dump(res, open(out_json, "w"), indent=1)

    res["bench"] = []
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        if "check" not in skip:
            res["check"] = attempt(res, "check", flexmodel, a.binary, "check", "--device",
                                   a.device, "--model", os.path.join(a.fixtures, "llama"))
            log(res["check"] or "")
            save()
        if "parity" not in skip:
            res["parity"] = parity(a.binary, a.fixtures, a.device, tmp, res)
            save()
        if a.profile:
            res["profile"] = attempt(res, "profile", profile, a.binary, a.device, dev,
                                     tmp, a.out_dir)
            save()
        res["d2h"] = d2h_bandwidth(dev)
        log(f"d2h: {res['d2h']}")
        save()
        for k, size in enumerate(a.sizes.split(",") if "bench" not in skip else []):
            model_dir = os.path.join(tmp, size)
            docs = a.harvest_docs if k == 0 else 0
            hf = attempt(res, f"transformers {size}", hf_side, size, dev, shapes, a.iters,
                         model_dir, docs, tmp)
            if not hf:
                continue
            res["bench"].extend(hf)
            save()
            mine = attempt(res, f"flexmodel bench {size}", ours, a.binary, model_dir, a.device,
                           shapes, a.iters, tmp, "bf16") or []
            for row in hf:
                for r in mine:
                    if (r["batch"], r["seq"]) == (row["batch"], row["seq"]):
                        row[f"fm_{r['job']}_s"] = r["median_s"]
                        row[f"fm_{r['job']}_bytes"] = r["captured_bytes"]
            save()
            if docs:
                out = os.path.join(tmp, "fm-harvest")
                tok_s = attempt(res, f"flexmodel harvest {size}", fm_harvest, a.binary, model_dir,
                                a.device, os.path.join(tmp, "docs.safetensors"),
                                SIZES[size]["num_hidden_layers"], out)
                if tok_s:
                    hf[0]["fm_harvest_tok_s"] = tok_s
                subprocess.run(["rm", "-rf", out])
                save()
            subprocess.run(["rm", "-rf", model_dir])
    save()
    table(res)
    failed = [r["arch"] for r in res.get("parity", []) if not (r["f32"]["ok"] and r["bf16"]["ok"])]
    if failed:
        print(f"PARITY FAILED: {failed}")
    for what, e in res.get("errors", {}).items():
        print(f"ERROR in {what}: {e.splitlines()[-1] if e else ''}")
    if failed or res.get("errors"):
        sys.exit(1)


def table(res):
    print(json.dumps(res["info"]))
    if res.get("profile"):
        p = res["profile"]
        for side in ("ours", "hf"):
            kernels = sorted(p[side].items(), key=lambda kv: -kv[1][1])
            total = sum(ms for _, ms in p[side].values())
            print(f"{side}: {p['layers']}-layer 1.1B-shaped model, {p['shape']}, one forward "
                  f"(and setup): {total:.2f} ms in {sum(n for n, _ in p[side].values())} kernels")
            for name, (n, ms) in kernels[:15]:
                print(f"  {ms:8.3f} ms {n:5} x  {name}")
    if res.get("parity"):
        print(f"{'arch':9} {'f32 max rel':>11} {'tensors':>7} {'bf16 max rel':>12} {'tensors':>7}  ok")
        for r in res["parity"]:
            f, b = r["f32"], r["bf16"]
            print(f"{r['arch']:9} {f['max_rel_err']:11.1e} {f['tensors']:7} {b['max_rel_err']:12.1e} "
                  f"{b['tensors']:7}  {f['ok'] and b['ok']}")
    pinned = res["d2h"].get("pinned_GBps")
    if res["d2h"]:
        print(f"D2H pinned {pinned:.1f} GB/s, pageable {res['d2h']['pageable_GBps']:.1f} GB/s")
    if res["bench"]:
        ms = lambda r, k: f"{r[k] * 1e3:8.1f}" if k in r else f"{'-':>8}"  # noqa: E731
        print(f"{'size':4} {'shape':6} | {'HF plain':>8} {'fm plain':>8} {'ratio':>5} | "
              f"{'HF layer':>8} {'fm layer':>8} {'+%':>5} | {'HF mods':>8} {'fm mods':>8} "
              f"{'fm sites':>8} {'MB':>6} {'x D2H':>5}")
        for r in res["bench"]:
            ratio = r["fm_plain_s"] / r["hf_plain_s"] if "fm_plain_s" in r else float("nan")
            over = (r["fm_layers_s"] / r["fm_plain_s"] - 1) * 100 if "fm_layers_s" in r else float("nan")
            mb = r.get("fm_sites_bytes", 0) / 1e6
            # capture of every site against the time its bytes take at the pinned bandwidth
            vs_d2h = (r["fm_sites_s"] / (mb * 1e6 / (pinned * 1e9))
                      if pinned and "fm_sites_s" in r and mb else float("nan"))
            print(f"{r['size']:4} {r['batch']}x{r['seq']:<4} | {ms(r, 'hf_plain_s')} {ms(r, 'fm_plain_s')} "
                  f"{ratio:5.2f} | {ms(r, 'hf_layers_s')} {ms(r, 'fm_layers_s')} {over:5.1f} | "
                  f"{ms(r, 'hf_modules_s')} {ms(r, 'fm_modules_s')} {ms(r, 'fm_sites_s')} {mb:6.0f} "
                  f"{vs_d2h:5.2f}")
        for r in res["bench"]:
            if "fm_harvest_tok_s" in r:
                print(f"harvest {r['size']} every decoder layer, {r['harvest_tokens']} tokens, bf16: "
                      f"flexmodel {r['fm_harvest_tok_s']:.0f} tokens/s, transformers loop "
                      f"{r['hf_harvest_tok_s']:.0f} tokens/s, ratio "
                      f"{r['fm_harvest_tok_s'] / r['hf_harvest_tok_s']:.2f}")


if __name__ == "__main__":
    main()
