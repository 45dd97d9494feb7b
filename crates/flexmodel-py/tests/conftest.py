"""What the Python tests share: the repository's reference fixtures (made by transformers),
the relative error they compare by, the CLI binary and mpirun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import flexmodel

ROOT = Path(__file__).resolve().parents[3]
BASE = Path(os.environ.get("FLEXMODEL_FIXTURES", ROOT / "fixtures" / "base" / "models"))
VARIANTS = ROOT / "fixtures" / "variants" / "models"
FAMILY_DIR = ROOT / "fixtures" / "families" / "models"
TINY = ROOT / "models" / "tiny-llama"
ARCHS = ["llama", "mistral", "qwen2", "gemma", "phi", "gpt2", "gpt_neox", "falcon", "opt"]
# The later families (fixtures/families).
FAMILIES = ["qwen3", "gemma2", "gemma3_text", "olmo2", "phi3", "mixtral", "qwen2_moe",
            "qwen3_moe"]


def model_dir(name: str) -> Path:
    for where in (VARIANTS, FAMILY_DIR):
        if (where / name).exists():
            return where / name
    return BASE / name


def reference(name: str) -> dict:
    return flexmodel.read_safetensors(model_dir(name) / "reference.safetensors")


def reference_json(name: str) -> dict:
    return json.loads((model_dir(name) / "reference.json").read_text())


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_close(what: str, got, want, tol: float) -> None:
    e = rel_err(got, want)
    assert e <= tol, f"{what}: relative error {e:.3e} > {tol:.0e}"


def unavailable(why: str):
    """Skips a test whose tools are missing, except in CI (FLEXMODEL_TEST_STRICT=1), where
    every test must run."""
    if os.environ.get("FLEXMODEL_TEST_STRICT") == "1":
        pytest.fail(f"{why}; FLEXMODEL_TEST_STRICT=1 wants every test to run")
    pytest.skip(why)


def cli() -> Path:
    """The flexmodel CLI built by cargo (FLEXMODEL_CLI, else target/debug or target/release)."""
    given = os.environ.get("FLEXMODEL_CLI")
    if given:
        return Path(given)
    for profile in ("debug", "release"):
        path = ROOT / "target" / profile / "flexmodel"
        if path.exists():
            return path
    unavailable("the flexmodel CLI is not built (cargo build -p flexmodel-cli, or set FLEXMODEL_CLI)")


def mpirun(ranks: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`mpirun -n ranks python args...`, as root, oversubscribed, one compute thread per rank."""
    if not flexmodel.HAS_MPI:
        unavailable("this build has no MPI (maturin develop --features mpi)")
    if shutil.which("mpirun") is None:
        unavailable("mpirun is not installed")
    env = dict(
        os.environ,
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_btl_vader_single_copy_mechanism="none",
        RAYON_NUM_THREADS="1",
    )
    command = ["mpirun", "--oversubscribe", "-n", str(ranks), sys.executable, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
