"""Models named as on the Hugging Face Hub: found in the local Hub cache (laid out here as
huggingface_hub lays it out, with the blobs behind symlinks), else downloaded through
huggingface_hub. No Hub is reachable from CI: huggingface_hub downloads from a stand-in
server (HF_ENDPOINT) that answers the requests snapshot_download makes (the revision, the
file tree, each file) with the files of models/tiny-llama."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import flexmodel
from conftest import TINY, assert_close, unavailable

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
    return cache


def test_a_cached_hub_model_loads_as_its_directory(hub_cache):
    commit = "a" * 40
    snapshot = cache_snapshot(hub_cache, "tiny-org/tiny-llama", commit, refs=("main", "v1"))
    want = flexmodel.load(TINY)(PROMPT)
    for name in ["tiny-org/tiny-llama", "tiny-org/tiny-llama@v1", f"tiny-org/tiny-llama@{commit}"]:
        assert flexmodel.model_dir(name) == str(snapshot)
        fm = flexmodel.load(name)
        assert_close(name, fm(PROMPT), want, 0.0)
        assert fm.tokenizer.encode("def f") == flexmodel.Tokenizer(TINY).encode("def f")
    by_name = flexmodel.Tokenizer("tiny-org/tiny-llama")
    assert by_name.encode("def f") == fm.tokenizer.encode("def f")


def test_a_directory_wins_over_a_hub_name(hub_cache, monkeypatch):
    cache_snapshot(hub_cache, "models/tiny-llama", "b" * 40)
    monkeypatch.chdir(TINY.parents[1])  # the repository root: models/tiny-llama is a directory
    assert flexmodel.model_dir("models/tiny-llama") == "models/tiny-llama"


def test_without_huggingface_hub_the_error_says_how_to_download(hub_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(flexmodel.LoadError, match=r"not a model directory, nor a model in the "
                       r"Hugging Face cache .*hf download org/absent"):
        flexmodel.load("org/absent")
    # A path that cannot be a Hub name is not looked up at all.
    with pytest.raises(flexmodel.LoadError, match=r"`\./absent` is not a model directory:"):
        flexmodel.load("./absent")


class StandInHub(BaseHTTPRequestHandler):
    """One repository, `org/tiny` at COMMIT, holding models/tiny-llama's files; anything else
    is 404 as the Hub answers it. Records every path asked for."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"
    asked: list = []

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body: bool):
        path = self.path.split("?")[0].strip("/")
        StandInHub.asked.append(path)
        files = {f.name: f.read_bytes() for f in sorted(TINY.iterdir())}
        data, headers = None, {"Content-Type": "application/json"}
        if path in ("api/models/org/tiny/revision/main",
                    f"api/models/org/tiny/revision/{self.COMMIT}"):
            data = json.dumps({"id": "org/tiny", "sha": self.COMMIT,
                               "siblings": [{"rfilename": f} for f in files]}).encode()
        elif path == f"api/models/org/tiny/tree/{self.COMMIT}":
            data = json.dumps([{"type": "file", "path": f, "size": len(b),
                                "oid": hashlib.sha1(b).hexdigest()}
                               for f, b in files.items()]).encode()
        elif path.startswith(f"org/tiny/resolve/{self.COMMIT}/"):
            data = files.get(path.rsplit("/", 1)[1])
            if data is not None:
                headers = {"Content-Type": "application/octet-stream",
                           "X-Repo-Commit": self.COMMIT,
                           "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        if data is None:
            data, headers = b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}
            self.send_response(404)
        else:
            self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture
def stand_in_hub():
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        unavailable("huggingface_hub is not installed")
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    StandInHub.asked = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def load_in_a_process(name: str, cache: Path, endpoint: str) -> subprocess.CompletedProcess:
    """`flexmodel.load(name)` in a fresh interpreter (huggingface_hub reads HF_ENDPOINT when
    imported); prints the logits of PROMPT as JSON, then the tokens of a text."""
    script = (
        "import json, flexmodel\n"
        f"fm = flexmodel.load({name!r})\n"
        f"print(json.dumps(fm({PROMPT!r}).tolist()))\n"
        "print(fm.tokenizer.encode('def f'))\n"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_ENDPOINT=endpoint,
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.pop("HF_TOKEN", None)
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_missing_model_is_downloaded_through_huggingface_hub(hub_cache, stand_in_hub):
    run = load_in_a_process("org/tiny", hub_cache, stand_in_hub)
    assert run.returncode == 0, run.stderr
    logits, tokens = run.stdout.splitlines()[-2:]
    assert_close("downloaded", json.loads(logits), flexmodel.load(TINY)(PROMPT), 0.0)
    assert tokens == str(flexmodel.Tokenizer(TINY).encode("def f"))
    # Only the JSON and safetensors files, into the cache, as huggingface_hub lays it out.
    want = sorted(f.name for f in TINY.iterdir() if f.suffix in (".json", ".safetensors"))
    fetched = {p.rsplit("/", 1)[1] for p in StandInHub.asked
               if p.startswith("org/tiny/resolve/")}
    assert sorted(fetched) == want
    snapshot = hub_cache / "models--org--tiny" / "snapshots" / StandInHub.COMMIT
    assert sorted(f.name for f in snapshot.iterdir()) == want
    # Cached now: resolving again asks the server nothing.
    StandInHub.asked = []
    assert flexmodel.model_dir("org/tiny") == str(snapshot)
    assert StandInHub.asked == []


def test_a_failed_download_is_a_load_error_naming_the_model(hub_cache, stand_in_hub):
    run = load_in_a_process("org/absent", hub_cache, stand_in_hub)
    assert run.returncode != 0
    assert "LoadError" in run.stderr and ("downloading org/absent@main from the Hugging Face "
                                          "Hub failed: RepositoryNotFoundError") in run.stderr, \
        run.stderr
