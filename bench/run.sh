#!/usr/bin/env bash
# The side-by-side benchmark (BENCHMARKS.md, "Against the peers"): makes the Python venv of the
# peers once (bench/.venv: CPU torch, transformers, flex-model; built by
# scripts/setup-ref-venv.sh), then runs bench/peers.py with every argument given here.
# Set FLEXMODEL_BENCH_PYTHON to use another Python with those packages.
#
#   bash bench/run.sh                       # the full run (~25 min on 2 cores, + builds)
#   bash bench/run.sh --smoke --no-memory   # one tiny round, to check the setup
set -euo pipefail
cd "$(dirname "$0")/.."
python=${FLEXMODEL_BENCH_PYTHON:-bench/.venv/bin/python}
if [ ! -x "$python" ]; then
    setup=scripts/setup-ref-venv.sh
    [ -f "$setup" ] || { echo "error: $setup not found; set FLEXMODEL_BENCH_PYTHON" >&2; exit 1; }
    bash "$setup" bench/.venv
fi
exec "$python" bench/peers.py --python "$python" "$@"
