"""Models named as on the Hugging Face Hub: found in the local Hub cache (laid out here as
huggingface_hub lays it out, with the blobs behind symlinks), else downloaded through
huggingface_hub. No Hub is reachable from CI: the download goes to a stand-in module that
lays out the snapshot as snapshot_download does and records what it was asked for."""

import os
import shutil
import sys
import types
from pathlib import Path

import pytest

import flexmodel
from conftest import TINY, assert_close

PROMPT = [[1, 5, 9, 2, 7]]


def cache_snapshot(cache: Path, repo: str, commit: str, refs=("main",)) -> Path:
    """`repo` at `commit` in a Hub cache at `cache`: files as blobs, snapshot links to them."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for f in TINY.iterdir():
        blob = folder / "blobs" / f"{commit}-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delitem(sys.modules, "huggingface_hub", raising=False)
    return cache


def test_a_cached_hub_model_loads_as_its_directory(hub_cache):
    snapshot = cache_snapshot(hub_cache, "tiny-org/tiny-llama", "a" * 40, refs=("main", "v1"))
    want = flexmodel.load(TINY)(PROMPT)
    for name in ["tiny-org/tiny-llama", "tiny-org/tiny-llama@v1", f"tiny-org/tiny-llama@{'a' * 40}"]:
        assert flexmodel.model_dir(name) == str(snapshot)
        fm = flexmodel.load(name)
        assert_close(name, fm(PROMPT), want, 0.0)
        assert fm.tokenizer.encode("def f") == flexmodel.Tokenizer(TINY).encode("def f")


def test_a_directory_wins_over_a_hub_name(hub_cache, tmp_path, monkeypatch):
    cache_snapshot(hub_cache, "models/tiny-llama", "b" * 40)
    monkeypatch.chdir(TINY.parents[1])  # the repository root: models/tiny-llama is a directory
    assert flexmodel.model_dir("models/tiny-llama") == "models/tiny-llama"


def test_a_missing_model_is_downloaded_through_huggingface_hub(hub_cache, monkeypatch):
    asked = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        asked.append((repo_id, revision, allow_patterns))
        return str(cache_snapshot(hub_cache, repo_id, "c" * 40, refs=(revision,)))

    monkeypatch.setitem(
        sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download)
    )
    fm = flexmodel.load("gpt-like@refs-pr-1")
    assert asked == [("gpt-like", "refs-pr-1", ["*.json", "*.safetensors"])]
    assert_close("downloaded", fm(PROMPT), flexmodel.load(TINY)(PROMPT), 0.0)
    # Cached now: no second download.
    flexmodel.load("gpt-like@refs-pr-1")
    assert len(asked) == 1


def test_a_failed_download_is_a_load_error_naming_the_model(hub_cache, monkeypatch):
    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        raise OSError("401 Client Error: gated repo")

    monkeypatch.setitem(
        sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download)
    )
    with pytest.raises(flexmodel.LoadError, match=r"org/gated@main.*401 Client Error"):
        flexmodel.load("org/gated")


def test_without_huggingface_hub_the_error_says_how_to_download(hub_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(flexmodel.LoadError, match=r"not a model directory, nor a model in the "
                       r"Hugging Face cache .*hf download org/absent"):
        flexmodel.load("org/absent")
    # A path that cannot be a Hub name is not looked up at all.
    with pytest.raises(flexmodel.LoadError, match=r"`\./absent` is not a model directory:"):
        flexmodel.load("./absent")
