"""The ranks' side of a :class:`flexmodel.Job`: ``mpirun -n N python -m flexmodel._job_ranks
DIR``. Rank 0 reads a run's number from its standard input; every rank waits for it at a
barrier that sleeps (idle ranks cost no CPU), gets the run's request from rank 0 and calls it,
and rank 0 leaves its answer in DIR (written whole, then renamed); until ``exit``."""

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
        line = sys.stdin.readline().strip() if root else None
        native.idle_barrier()
        number = native.broadcast_bytes(line.encode() if root else None).decode()
        if number in ("", "exit"):
            return
        request = None
        if root:
            path = os.path.join(directory, f"run-{number}.pkl")
            with open(path, "rb") as f:
                request = f.read()
            os.remove(path)
        fn, args, kwargs = pickle.loads(native.broadcast_bytes(request))
        # An exception here is uncaught: flexmodel's hook prints it and ends every rank.
        result = fn(state, *args, **kwargs)
        if root:
            answer = os.path.join(directory, f"answer-{number}.pkl")
            with open(answer + ".tmp", "wb") as f:
                cloudpickle().dump(result, f)
            os.replace(answer + ".tmp", answer)


if __name__ == "__main__":
    serve(sys.argv[1])
