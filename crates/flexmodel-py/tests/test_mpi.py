"""Under mpirun, Python hooks run once, on rank 0, on full tensors: tp2 and tp2·pp2·dp2 equal
one process (captures, an in-place edit, gradients, a torch edit's gradients), and an exception
in an editing function ends the job on every rank, whichever stage its site is in."""

import time
from pathlib import Path

import numpy as np
import pytest

import flexmodel
from conftest import mpirun
from mpi_job import MODEL, job, torch_job

JOB = str(Path(__file__).with_name("mpi_job.py"))


@pytest.fixture(scope="module")
def expected(tmp_path_factory):
    path = tmp_path_factory.mktemp("mpi") / "single.npz"
    np.savez(path, **job(flexmodel.load(MODEL)))
    return path


@pytest.mark.parametrize("layout", [(2, 1, 1), (2, 2, 2)], ids=["tp2", "tp2-pp2-dp2"])
def test_a_layout_with_python_hooks_equals_one_process(layout, expected):
    tp, pp, dp = layout
    run = mpirun(tp * pp * dp, JOB, "compare", str(tp), str(pp), str(dp), str(expected))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "results equal one process's" in run.stdout


@pytest.mark.parametrize(
    "ranks,layout,extra",
    [(2, (1, 1, 1), "fsdp=2"), (4, (2, 1, 1), "fsdp=2"), (2, (1, 2, 1), "offload=disk"),
     (2, (1, 1, 1), "fsdp=2,offload=disk")],
    ids=["fsdp2", "fsdp2-tp2", "pp2-offload", "fsdp2-offload"])
def test_fsdp_and_offload_with_python_hooks_equal_one_process(ranks, layout, extra, expected):
    run = mpirun(ranks, JOB, "compare", *map(str, layout), str(expected), extra)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "results equal one process's" in run.stdout


def test_offload_in_one_process_equals_resident_weights(expected):
    got = job(flexmodel.load(MODEL, offload="cpu"))
    want = np.load(expected)
    assert sorted(got) == sorted(want.files)
    for key in want.files:
        np.testing.assert_allclose(np.asarray(got[key]), want[key], rtol=0, atol=1e-6, err_msg=key)


def test_bad_offload_is_an_input_error():
    with pytest.raises(flexmodel.InputError, match="offload 'ram'"):
        flexmodel.load(MODEL, offload="ram")


@pytest.mark.parametrize("layout", [(2, 1, 1), (2, 2, 2)], ids=["tp2", "tp2-pp2-dp2"])
def test_torch_edit_gradients_across_ranks_equal_one_process(layout, tmp_path):
    pytest.importorskip("torch")
    expected = tmp_path / "single.npz"
    np.savez(expected, **torch_job(flexmodel.load(MODEL, framework="torch")))
    tp, pp, dp = layout
    run = mpirun(tp * pp * dp, JOB, "torch", str(tp), str(pp), str(dp), str(expected))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 results equal one process's" in run.stdout


@pytest.mark.parametrize(
    "site", ["model.layers.0.mlp", "model.layers.1.mlp"], ids=["first-stage", "last-stage"])
def test_an_exception_in_an_editing_function_ends_every_rank(site):
    start = time.monotonic()
    run = mpirun(4, JOB, "raise", "1", "2", "2", site, timeout=60)
    elapsed = time.monotonic() - start
    assert run.returncode != 0
    assert elapsed < 30, f"the job took {elapsed:.0f} s to end"
    # Rank 0, which ran the hook, never returned from the pass (ranks whose part of the pass
    # was done may have, before the job ended them).
    assert "rank 0: the pass returned" not in run.stdout
    # The Python traceback reaches stderr.
    assert "Traceback" in run.stderr and f"editing function failed at {site}" in run.stderr
    assert "in explode" in run.stderr
