"""Train a sparse autoencoder on the bundled model's residual stream, in SAELens's format.

Harvests the output of one decoder layer of `models/stdlib-llama` (the residual stream after
it) over the Python standard library's source, trains a standard (ReLU) SAE with an L1 penalty,
and writes `cfg.json` + `sae_weights.safetensors` as SAELens does (W_enc [d_in, d_sae], b_enc,
W_dec [d_sae, d_in], b_dec; the input minus b_dec is encoded). Also writes the reference
fixtures of flexmodel's SAE tests: the same weights as a JumpReLU and a top-k SAE, and for each
architecture the features and reconstruction of a fixed batch of activations, computed here in
torch with SAELens's formulas.

    python scripts/train_sae.py                     # ~5 min on 2 cores
"""

import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from train_model import corpus_files, read_texts  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402


def encode(arch, x, w, k=None):
    """SAELens's encoders: standard relu, jumprelu (relu where pre > threshold), top-k."""
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        return torch.relu(pre)
    if arch == "jumprelu":
        return torch.relu(pre) * (pre > w["threshold"])
    if arch == "topk":
        vals, idx = torch.topk(pre, k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    raise ValueError(arch)


def decode(f, w):
    return f @ w["W_dec"] + w["b_dec"]


def save_sae(out, arch, w, site, d_in, d_sae, extra=None):
    os.makedirs(out, exist_ok=True)
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "metadata": {"hook_name": site, "model_name": "stdlib-llama"}}
    cfg.update(extra or {})
    with open(os.path.join(out, "cfg.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    save_file({k: v.contiguous() for k, v in w.items()}, os.path.join(out, "sae_weights.safetensors"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="models/stdlib-llama")
    p.add_argument("--layer", type=int, default=1)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--l1", type=float, default=0.05)
    p.add_argument("--fixtures", default="fixtures/saes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    started = time.time()

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    _, files = corpus_files()
    texts = read_texts(files)
    ids = []
    for enc in tok.encode_batch(texts[::-1]):  # the end of the sorted list: not the lens' start
        ids.append(0)
        ids.extend(enc.ids)
        if len(ids) >= args.tokens:
            break
    seq = 256
    rows = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    acts = []
    with torch.no_grad():
        for chunk in rows.split(32):
            hs = model(chunk, output_hidden_states=True).hidden_states
            acts.append(hs[args.layer + 1].reshape(-1, hs[0].shape[-1]))
    acts = torch.cat(acts)
    d_in = acts.shape[1]
    d_sae = args.expansion * d_in
    site = f"model.layers.{args.layer}"
    print(f"{acts.shape[0]} activations of {site}, {time.time() - started:.0f} s", flush=True)

    # A standard SAE: tied-at-init decoder with unit-norm rows, L1 on features times row norms.
    w_dec = torch.randn(d_sae, d_in)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True) * 0.1
    params = {"W_enc": torch.nn.Parameter(w_dec.t().clone()),
              "b_enc": torch.nn.Parameter(torch.zeros(d_sae)),
              "W_dec": torch.nn.Parameter(w_dec.clone()),
              "b_dec": torch.nn.Parameter(acts.median(dim=0).values.clone())}
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    scale = acts.norm(dim=1).mean()
    for step in range(args.steps):
        x = acts[torch.randint(0, acts.shape[0], (1024,))]
        f = encode("standard", x, params)
        recon = decode(f, params)
        mse = ((recon - x) ** 2).sum(-1).mean() / scale**2
        l1 = (f * params["W_dec"].norm(dim=1)).sum(-1).mean() / scale
        loss = mse + args.l1 * l1
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == args.steps - 1:
            print(f"step {step}: mse {mse.item():.4f} l1 {l1.item():.3f}", flush=True)

    w = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():
        f = encode("standard", acts, w)
        recon = decode(f, w)
        var = ((acts - acts.mean(0)) ** 2).sum()
        explained = 1 - ((acts - recon) ** 2).sum() / var
        l0 = (f > 0).float().sum(-1).mean()
        dead = int(((f > 0).sum(0) == 0).sum())
    stats = {"site": site, "d_in": d_in, "d_sae": d_sae, "activations": acts.shape[0],
             "steps": args.steps, "l1": args.l1, "explained_variance": round(explained.item(), 4),
             "l0": round(l0.item(), 2), "dead_features": dead,
             "minutes": round((time.time() - started) / 60, 1)}
    print(json.dumps(stats))
    out = os.path.join(args.model, "saes", site)
    save_sae(out, "standard", w, site, d_in, d_sae)
    with open(os.path.join(out, "training.json"), "w") as fh:
        json.dump(stats, fh, indent=1)

    # Test fixtures: the three architectures on the same weights, with torch's reference.
    x = acts[:24].clone()
    threshold = f.mean(0) * 0.5  # a JumpReLU threshold per feature
    k = 8
    os.makedirs(args.fixtures, exist_ok=True)
    for arch, extra, ww in [("standard", None, w),
                            ("jumprelu", None, {**w, "threshold": threshold}),
                            ("topk", {"k": k}, w)]:
        d = os.path.join(args.fixtures, arch)
        save_sae(d, arch, ww, site, d_in, d_sae, extra)
        feats = encode(arch, x, ww, k)
        save_file({"x": x, "features": feats, "reconstruction": decode(feats, ww)},
                  os.path.join(d, "reference.safetensors"))
    print(f"wrote {out} and {args.fixtures}")


if __name__ == "__main__":
    main()
