"""Multi-process jobs driven from one Python process: a notebook, a REPL, a script that is not
itself started by ``mpirun``.

    job = flexmodel.Job(ranks=4)                       # mpirun -n 4 ... (ranks stay up)
    job.run(lambda state: state.update(fm=flexmodel.load("models/tiny-llama", tp=2, pp=2)))
    logits = job.run(lambda state, ids: state["fm"](ids), [[1, 5, 9]])   # rank 0's result
    job.close()

Every ``run(fn, *args)`` calls ``fn(state, *args)`` on every rank (the same program on each, as
under ``mpirun -n N python script.py``) and returns what rank 0 returned; ``state`` is a dict
each rank keeps between runs, where a loaded model lives. Functions and arguments travel with
cloudpickle (functions defined in a notebook included), through a directory the job's rank 0
shares with this process, where rank 0 also leaves each answer; mpirun carries only a line per
run to rank 0's standard input. What the ranks print shows here. An exception on any rank, or a
rank that dies, ends the job (as under mpirun: its traceback shows, then every rank stops) and
the pending run raises ``DistributedError``.

The ranks run ``python -m flexmodel._job_ranks DIR``.
"""

from __future__ import annotations

import collections
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from typing import Any, Callable, Optional, Sequence

from .errors import DistributedError, InputError

# The file rank 0 leaves in the job's directory once every rank has started.
READY = "ready"


def cloudpickle():
    try:
        import cloudpickle
    except ImportError:
        raise InputError(
            "flexmodel.Job sends functions to its ranks with cloudpickle: pip install "
            "cloudpickle (or the package's [job] extra)"
        ) from None
    return cloudpickle


class Job:
    """``ranks`` processes under ``mpirun``, driven from this one (see the module's docs).

    Args:
        ranks: the number of processes (the product of the layouts the runs load).
        mpirun: the launcher's command before the program, ``-n ranks`` added
            (default ``["mpirun"]``; e.g. ``["mpirun", "--oversubscribe"]``, or
            ``["srun"]`` inside an allocation).
        env: extra environment variables for the ranks.
        python: the interpreter the ranks run (default: this one).
    """

    def __init__(
        self,
        ranks: int,
        *,
        mpirun: Optional[Sequence[str]] = None,
        env: Optional[dict] = None,
        python: Optional[str] = None,
    ):
        if not isinstance(ranks, int) or ranks < 1:
            raise InputError(f"ranks={ranks!r}: a Job needs a positive number of ranks")
        launcher = list(mpirun or ["mpirun"])
        if shutil.which(launcher[0]) is None:
            raise InputError(f"{launcher[0]!r} is not on PATH: pass mpirun=[...] with the launcher")
        self._pickle = cloudpickle()
        self.ranks = ranks
        self._dir = tempfile.mkdtemp(prefix="flexmodel-job-")
        self._runs = 0
        self._lock = threading.Lock()
        self._stderr_tail: collections.deque = collections.deque(maxlen=40)
        self._ended = False
        ranks_program = [python or sys.executable, "-m", "flexmodel._job_ranks", self._dir]
        self._process = subprocess.Popen(
            launcher + ["-n", str(ranks)] + ranks_program,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})}, text=True, bufsize=1,
        )
        # Ends the ranks when this object goes, or at the interpreter's exit.
        self._end = weakref.finalize(self, _end, self._process, self._dir)
        self._stdout = threading.Thread(
            target=_forward, args=(self._process.stdout, "stdout", None), daemon=True)
        self._stderr = threading.Thread(
            target=_forward, args=(self._process.stderr, "stderr", self._stderr_tail),
            daemon=True)
        self._stdout.start()
        self._stderr.start()
        self._wait_for(READY)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Calls ``fn(state, *args, **kwargs)`` on every rank; returns rank 0's result."""
        with self._lock:
            if self._ended:
                raise DistributedError(f"the job has ended{self._why()}")
            self._runs += 1
            number = self._runs
            request = os.path.join(self._dir, f"run-{number}.pkl")
            with open(request + ".tmp", "wb") as f:
                self._pickle.dump((fn, args, kwargs), f)
            os.replace(request + ".tmp", request)
            _send(self._process, f"{number}\n")
            answer = self._wait_for(f"answer-{number}.pkl")
            with open(answer, "rb") as f:
                result = pickle.load(f)
            os.remove(answer)
            return result

    def close(self) -> None:
        """Ends the ranks (their models go with them) and waits for the launcher and the
        last of their output."""
        with self._lock:
            self._ended = True
            self._end()
            self._stdout.join(timeout=5)
            self._stderr.join(timeout=5)

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "ended" if self._ended else "running"
        return f"Job({self.ranks} ranks, {state}, {self._runs} runs)"

    def _wait_for(self, name: str) -> str:
        """The path of file `name` in the job's directory, once rank 0 has put it there
        (polled: sleeps growing to 10 ms); ends the job if the launcher exits first."""
        path = os.path.join(self._dir, name)
        pause = 1e-4
        while not os.path.exists(path):
            if self._process.poll() is not None:
                self._ended = True
                raise DistributedError(f"the job has ended{self._why()}")
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
        return path

    def _why(self) -> str:
        code = self._process.poll()
        if code is not None:
            self._stderr.join(timeout=5)  # the last error lines, still on their way
        tail = "".join(self._stderr_tail).rstrip()
        said = f" (exit code {code})" if code is not None else ""
        return f"{said}; its last error output:\n{tail}" if tail else said


def _forward(source, name: str, tail: Optional[collections.deque]) -> None:
    """Copies the ranks' output to this process's ``sys.<name>`` as it is now (a notebook's
    cell, a test's capture), keeping the last lines in `tail`; never stops draining the pipe,
    so that the ranks never wait on it."""
    for line in source:
        if tail is not None:
            tail.append(line)
        try:
            sink = getattr(sys, name)
            sink.write(line)
            sink.flush()
        except (OSError, ValueError, AttributeError):
            pass  # no place to show it: dropped


def _send(process: subprocess.Popen, line: str) -> None:
    try:
        process.stdin.write(line)
        process.stdin.flush()
    except (OSError, ValueError):
        pass  # the job has ended: whoever waits on it says why


def _end(process: subprocess.Popen, directory: str) -> None:
    """Asks the ranks to stop, waits for the launcher (killing it after a minute), and
    removes the job's directory."""
    _send(process, "exit\n")
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    shutil.rmtree(directory, ignore_errors=True)
