"""flexmodel.Job: ranks under mpirun driven from this process, as from a notebook. A layout
loaded in one run and used in the next gives one process's captures, edit and gradients (the
MPI tests' job); rank 0's result comes back, the state stays between runs, what the ranks print
shows here; an exception on a rank ends the job with its traceback, never a hang."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import flexmodel
from conftest import assert_close, unavailable
from mpi_job import MODEL, job

TESTS = str(Path(__file__).parent)


@pytest.fixture
def launcher():
    if not flexmodel.HAS_MPI:
        unavailable("this build has no MPI (maturin develop --features mpi)")
    if shutil.which("mpirun") is None:
        unavailable("mpirun is not installed")
    try:
        import cloudpickle  # noqa: F401
    except ImportError:
        unavailable("cloudpickle is not installed")
    return dict(
        mpirun=["mpirun", "--oversubscribe"],
        env=dict(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                 OMPI_MCA_btl_vader_single_copy_mechanism="none", RAYON_NUM_THREADS="1",
                 PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])),
    )


def test_a_layout_driven_from_here_equals_one_process(launcher):
    want = job(flexmodel.load(MODEL))
    with flexmodel.Job(4, **launcher) as j:
        ranks = j.run(lambda state: (flexmodel.rank(), flexmodel.world_size()))
        assert ranks == (0, 4)
        j.run(lambda state, model: state.update(fm=flexmodel.load(model, tp=2, pp=2)), MODEL)
        got = j.run(lambda state: job(state["fm"]))  # the model loaded by the run before
        layout = j.run(lambda state: state["fm"].layout)
    assert layout == {"tp": 2, "pp": 2, "dp": 1, "fsdp": 1}
    assert sorted(got) == sorted(want)
    for key in want:
        assert_close(key, got[key], want[key], 1e-5)


def test_results_state_and_prints(launcher, capfd):
    def count(state, by):
        state["n"] = state.get("n", 0) + by
        print(f"rank {flexmodel.rank()} has {state['n']}", flush=True)
        return np.full(3, state["n"] * 10 + flexmodel.rank())

    with flexmodel.Job(2, **launcher) as j:
        assert list(j.run(count, 1)) == [10, 10, 10]
        assert list(j.run(count, by=2)) == [30, 30, 30]  # rank 0's result; the state stayed
        assert "2 ranks, running, 2 runs" in repr(j)
    out = capfd.readouterr().out
    for line in ["rank 0 has 1", "rank 1 has 1", "rank 0 has 3", "rank 1 has 3"]:
        assert line in out, out
    assert "flexmodel-job" not in out
    with pytest.raises(flexmodel.DistributedError, match="the job has ended"):
        j.run(count, 1)


def test_an_exception_on_a_rank_ends_the_job_with_its_traceback(launcher):
    def fail_on_rank_1(state):
        if flexmodel.rank() == 1:
            raise ValueError("rank 1 is broken")
        state["fm"] = flexmodel.load(MODEL, tp=2)  # rank 0 waits in a collective: no hang
        return "unreachable"

    j = flexmodel.Job(2, **launcher)
    assert j.run(lambda state: 41 + 1) == 42
    with pytest.raises(flexmodel.DistributedError, match=r"(?s)ValueError: rank 1 is broken"):
        j.run(fail_on_rank_1)
    with pytest.raises(flexmodel.DistributedError, match="the job has ended"):
        j.run(lambda state: 1)
    j.close()


def test_bad_arguments():
    with pytest.raises(flexmodel.InputError, match="positive number of ranks"):
        flexmodel.Job(0)
    with pytest.raises(flexmodel.InputError, match="'no-such-launcher' is not on PATH"):
        flexmodel.Job(2, mpirun=["no-such-launcher"])
