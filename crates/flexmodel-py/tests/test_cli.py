"""The Python API and the CLI (the Rust API) compute the same things: an edit written in
Python against the CLI's built-in edit, a harvest through Python against the CLI's."""

import json
import subprocess

import numpy as np
import pytest

import flexmodel
from conftest import ROOT, TINY, cli

PROMPT = "The capital of France is"


def test_python_and_rust_edits_give_identical_results(tmp_path):
    out = tmp_path / "rust.safetensors"
    subprocess.run(
        [str(cli()), "run", "--model", str(TINY), "--prompt", PROMPT,
         "--capture", "model.layers.*.mlp", "--edit", "model.layers.0.mlp=scale:0.25",
         "--edit", "model.layers.1.self_attn.hook_head_out=zero", "--out", str(out)],
        check=True, capture_output=True,
    )
    rust = flexmodel.read_safetensors(out)
    fm = flexmodel.load(TINY)
    ids, _ = fm.tokenizer([PROMPT])
    fm.register_forward_hook(flexmodel.HookFunction("model.layers.*.mlp"))
    fm.register_forward_hook(flexmodel.HookFunction(
        "model.layers.0.mlp", editing_function=lambda x, c: x * np.float32(0.25), capture=False))

    def zero(x, ctx):
        x[...] = 0

    fm.register_forward_hook(flexmodel.HookFunction(
        "model.layers.1.self_attn.hook_head_out", editing_function=zero, capture=False))
    logits = fm(ids)
    np.testing.assert_array_equal(logits, rust["logits"])
    for site in ("model.layers.0.mlp", "model.layers.1.mlp"):
        np.testing.assert_array_equal(fm.output[site][0], rust[site])


def test_an_exception_in_the_progress_callback_ends_the_harvest(tmp_path):
    def fail(p):
        raise ValueError(f"stop at {p['rows']} rows")

    with pytest.raises(ValueError, match="stop at 3 rows"):
        flexmodel.harvest(TINY, ROOT / "data" / "tiny.txt", ["model.layers.1"], tmp_path / "h",
                          seq_len=12, batch_size=3, progress=fail)


def test_a_python_harvest_equals_the_cli_harvest(tmp_path):
    options = dict(seq_len=12, batch_size=3, max_tokens=200, shard_tokens=40)
    subprocess.run(
        [str(cli()), "harvest", "--model", str(TINY), "--data", str(ROOT / "data" / "tiny.txt"),
         "--sites", "model.layers.1", "model.layers.0.mlp", "--out", str(tmp_path / "cli"),
         "--seq-len", "12", "--batch-size", "3", "--max-tokens", "200", "--shard-tokens", "40"],
        check=True, capture_output=True,
    )
    seen = []
    summary = flexmodel.harvest(
        TINY, ROOT / "data" / "tiny.txt", ["model.layers.1", "model.layers.0.mlp"],
        tmp_path / "py", progress=seen.append, **options,
    )
    assert [p["fraction"] for p in seen] == sorted(p["fraction"] for p in seen)
    assert seen[-1]["fraction"] == 1.0 and seen[-1]["stored_tokens"] == summary["stored_tokens"]
    ours, theirs = flexmodel.read_harvest(tmp_path / "py"), flexmodel.read_harvest(tmp_path / "cli")
    assert ours.complete and summary["stored_tokens"] == len(ours["input_ids"]) > 100
    assert ours.names == theirs.names == [
        "doc", "input_ids", "model.layers.0.mlp", "model.layers.1", "position"]
    for name in ours.names:
        np.testing.assert_array_equal(ours[name], theirs[name])
    assert len(ours.manifest["shards"]) == len(theirs.manifest["shards"]) > 1
    # Shards are bit-identical files.
    for a, b in zip(ours.manifest["shards"], theirs.manifest["shards"]):
        assert a == b
        assert (tmp_path / "py" / a["file"]).read_bytes() == (tmp_path / "cli" / b["file"]).read_bytes()
    manifest = json.loads((tmp_path / "py" / "manifest.json").read_text())
    assert manifest["settings"]["sites"] == ["model.layers.1", "model.layers.0.mlp"]
