"""The ranks' side of a :class:`flexmodel.Job`: ``mpirun -n N python -m flexmodel._job_ranks
DIR``. Rank 0 reads a run's number from its standard input and the run's request from DIR;
every rank waits for it at a barrier that sleeps (idle ranks cost no CPU), gets the request
from rank 0 and calls it, and rank 0 leaves its answer in DIR (written whole, then renamed);
until ``exit`` (an empty request)."""

import os
import pickle
import sys

import flexmodel
from flexmodel.job import READY, cloudpickle


def serve(directory: str) -> None:
    native = flexmodel._native
    root = flexmodel.rank() == 0
    state: dict = {}
    if root:
        open(os.path.join(directory, READY), "w").close()
    while True:
        request = None
        if root:
            number = sys.stdin.readline().strip()
            request = b""  # no run: the job ends
            if number not in ("", "exit"):
                path = os.path.join(directory, f"run-{number}.pkl")
                with open(path, "rb") as f:
                    request = f.read()
                os.remove(path)
        native.idle_barrier()
        request = native.broadcast_bytes(request)
        if not request:
            return
        fn, args, kwargs = pickle.loads(request)
        # An exception here is uncaught: flexmodel's hook prints it and ends every rank.
        result = fn(state, *args, **kwargs)
        if root:
            answer = os.path.join(directory, f"answer-{number}.pkl")
            with open(answer + ".tmp", "wb") as f:
                cloudpickle().dump(result, f)
            os.replace(answer + ".tmp", answer)


if __name__ == "__main__":
    serve(sys.argv[1])
