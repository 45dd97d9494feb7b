#!/usr/bin/env bash
# The offload benchmark (BENCHMARKS.md, "Beyond one device's memory"): flexmodel with and
# without --offload on the 125M Llama, against the disk's read bandwidth and Accelerate's disk
# offload in the same run (bench/offload.py). Needs a Python with torch, transformers,
# accelerate and safetensors (the peers' venv from bench/run.sh, plus accelerate).
#
#   FLEXMODEL_BENCH_PYTHON=/work/venv-ref/bin/python bash bench/offload.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${FLEXMODEL_BENCH_PYTHON:-bench/.venv/bin/python}
[ -d bench/.cache/llama ] || "$python" -c \
    "import sys; sys.path.insert(0, 'bench'); import peers; peers.checkpoint('$python', 'llama')"
cargo build --quiet --release -p flexmodel-cli --features mpi
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
"$python" bench/offload.py
