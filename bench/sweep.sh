#!/usr/bin/env bash
# The patching-sweep benchmark (BENCHMARKS.md, "Analyses"): flexmodel's sweep
# (crates/flexmodel/benches/sweep.rs) and the same sweep with transformers' hooks
# (bench/sweep.py) on the bundled trained model and the 125M Llama, one after the other per
# case, two threads each. Needs the peers' venv (bench/run.sh makes it) for the 125M checkpoint
# and transformers.
#
#   bash bench/sweep.sh [TOKENS] [CELLS_PER_PASS]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${FLEXMODEL_BENCH_PYTHON:-bench/.venv/bin/python}
tokens=${1:-32}
cells=${2:-16}
[ -d bench/.cache/llama ] || "$python" -c \
    "import sys; sys.path.insert(0, 'bench'); import peers; peers.checkpoint('$python', 'llama')"
cargo build --quiet --release -p flexmodel --benches
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
for model in "$PWD/models/stdlib-llama" "$PWD/bench/.cache/llama"; do
    cargo bench --quiet -p flexmodel --bench sweep -- "$model" "$tokens" "$cells"
    "$python" bench/sweep.py "$model" "$tokens" "$cells"
done
