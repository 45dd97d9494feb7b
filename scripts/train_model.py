"""Train the bundled model, `models/stdlib-llama`: a small Llama on the Python standard library.

The data is the `.py` source of the standard library of the Python that runs this script (the
`test`, `idlelib`, `lib2to3` and `site-packages` trees left out): every Python install has it, it
needs no download, and it is redistributable (PSF license). Code is full of repeated identifiers,
which makes previous-token heads worth learning; induction heads took more at this scale (3.6M
tokens, 2 cores), measured on the way (models/stdlib-llama/README.md):

- natural code alone, 3000 steps: best induction score 0.13, the second copy of a repeated
  random sequence no easier than the first;
- half the rows with a span repeated later in the row (half of those spans random tokens),
  2500 steps (`--copy-frac 0.5`, the default): still none;
- continuing that model for 600 steps at a lower learning rate with 32 more rows per step of
  a random span repeated (`--init DIR --repeat-rows 32 --lr 1e-3`): an induction head (score
  0.91) forms by step 300, while the loss on held-out code keeps falling.

The bundled model is the last, made by the two commands:

    python scripts/train_model.py --out /tmp/phase1                       # ~20 min on 2 cores
    python scripts/train_model.py --init /tmp/phase1 --out models/stdlib-llama \
        --steps 600 --lr 1e-3 --repeat-rows 32                            # ~8 min

Writes the Hugging Face layout (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) and `training.json` (data, steps, losses, the induction measurement
taken along the way). Needs torch, transformers and tokenizers (scripts/setup-ref-venv.sh).
"""

import argparse
import glob
import hashlib
import json
import math
import os
import random
import sysconfig
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

EOT = "<|endoftext|>"
SKIP = ("/test/", "/tests/", "/idlelib/", "/lib2to3/", "/site-packages/", "/turtledemo/")


def corpus_files():
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                   if not any(s in f + "/" for s in SKIP))
    return root, files


def read_texts(files):
    texts = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                texts.append(fh.read())
        except (UnicodeDecodeError, OSError):
            pass
    return texts


def make_tokenizer(texts, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def induction_losses(model, vocab, half, batch, seed):
    """Mean loss on the first and the second half of [EOT, r, r] with r random tokens."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(1, vocab, (batch, half), generator=g)
    ids = torch.cat([torch.zeros(batch, 1, dtype=torch.long), r, r], dim=1)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="none").view(batch, -1)
    return loss[:, :half].mean().item(), loss[:, half:].mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="models/stdlib-llama")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--copy-frac", type=float, default=0.5,
                   help="fraction of rows with a span copied further along the row")
    p.add_argument("--repeat-rows", type=int, default=0,
                   help="rows per step of a random span repeated, then code (128 tokens)")
    p.add_argument("--init", default=None,
                   help="continue from this model directory (its weights and tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    started = time.time()

    root, files = corpus_files()
    texts = read_texts(files)
    digest = hashlib.sha256("\n".join(os.path.relpath(f, root) for f in files).encode()).hexdigest()
    if args.init:
        tok = Tokenizer.from_file(os.path.join(args.init, "tokenizer.json"))
    else:
        tok = make_tokenizer(texts, args.vocab)
    eot = tok.token_to_id(EOT)
    assert eot == 0, eot
    ids = []
    for enc in tok.encode_batch(texts):
        ids.append(eot)
        ids.extend(enc.ids)
    data = torch.tensor(ids, dtype=torch.long)
    n_val = 64 * (args.seq + 1)
    val, train = data[:n_val], data[n_val:]
    print(f"{len(files)} files, {sum(map(len, texts)) / 1e6:.1f} MB, {len(data) / 1e6:.2f}M tokens, "
          f"tokenizer {time.time() - started:.0f} s", flush=True)

    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, head_dim=args.hidden // args.heads,
        max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=eot, eos_token_id=eot,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM.from_pretrained(args.init) if args.init else LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 100

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    def batch_of(src, n, gen):
        starts = torch.randint(0, len(src) - args.seq - 1, (n,), generator=gen)
        rows = torch.stack([src[s:s + args.seq + 1] for s in starts])
        for r in range(n):
            if torch.rand(1, generator=gen).item() >= args.copy_frac:
                continue
            span = int(torch.randint(8, 49, (1,), generator=gen))
            a = int(torch.randint(0, args.seq // 2 - span, (1,), generator=gen))
            b = int(torch.randint(a + span, args.seq + 1 - span, (1,), generator=gen))
            if torch.rand(1, generator=gen).item() < 0.5:
                rows[r, a:a + span] = torch.randint(1, args.vocab, (span,), generator=gen)
            rows[r, b:b + span] = rows[r, a:a + span].clone()
        return rows[:, :-1], rows[:, 1:]

    def repeat_batch(src, n, gen, length=128):
        """Rows of [EOT, r, r, code...] with r random tokens of a random length."""
        rows = []
        for _ in range(n):
            half = int(torch.randint(8, 48, (1,), generator=gen))
            r = torch.randint(1, args.vocab, (half,), generator=gen)
            s = int(torch.randint(0, len(src) - length, (1,), generator=gen))
            row = torch.cat([torch.zeros(1, dtype=torch.long), r, r, src[s:s + length]])
            rows.append(row[:length + 1])
        rows = torch.stack(rows)
        return rows[:, :-1], rows[:, 1:]

    def val_loss():
        rows = val.view(64, args.seq + 1)
        with torch.no_grad():
            logits = model(rows[:, :-1]).logits
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, args.vocab), rows[:, 1:].reshape(-1)).item()

    gen = torch.Generator().manual_seed(args.seed)
    log = []
    train_started = time.time()
    for step in range(args.steps):
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y = batch_of(train, args.batch, gen)
        loss = torch.nn.functional.cross_entropy(
            model(x).logits.reshape(-1, args.vocab), y.reshape(-1))
        if args.repeat_rows:
            x, y = repeat_batch(train, args.repeat_rows, gen)
            loss = (loss * args.batch * args.seq + torch.nn.functional.cross_entropy(
                model(x).logits.reshape(-1, args.vocab), y.reshape(-1), reduction="sum")) / (
                args.batch * args.seq + x.numel())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            model.eval()
            first, second = induction_losses(model, args.vocab, 50, 16, 1)
            row = {"step": step, "train_loss": round(loss.item(), 4), "val_loss": round(val_loss(), 4),
                   "repeat_first_half": round(first, 3), "repeat_second_half": round(second, 3),
                   "minutes": round((time.time() - train_started) / 60, 2)}
            log.append(row)
            print(json.dumps(row), flush=True)

    os.makedirs(args.out, exist_ok=True)
    model.eval()
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": EOT,
                   "unk_token": None, "add_prefix_space": False, "model_max_length": 1024}, f, indent=1)
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump({"data": f"Python {sysconfig.get_python_version()} standard library, .py files "
                           f"outside {', '.join(s.strip('/') for s in SKIP)}",
                   "files": len(files), "files_sha256": digest, "tokens": len(data),
                   "parameters": n_params, "args": vars(args), "torch": torch.__version__,
                   "minutes": round((time.time() - started) / 60, 1), "log": log}, f, indent=1)
    print(f"wrote {args.out}: {n_params} parameters, {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
