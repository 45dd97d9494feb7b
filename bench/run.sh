#!/usr/bin/env bash
# The side-by-side benchmark (BENCHMARKS.md, "Against the peers"): makes the Python venv of the
# peers once (bench/.venv: CPU torch, transformers, flex-model, nnsight; built by
# scripts/setup-ref-venv.sh), builds flexmodel's Python package into it, then runs
# bench/peers.py with every argument given here.
# Set FLEXMODEL_BENCH_PYTHON to use another Python with those packages.
#
#   bash bench/run.sh                       # the full run (~25 min on 2 cores, + builds)
#   bash bench/run.sh --smoke --no-memory   # one tiny round, to check the setup
#   bash bench/run.sh --models llama --peers flexmodel,flexmodel-py,hf,nnsight   # the Python side
set -euo pipefail
cd "$(dirname "$0")/.."
python=${FLEXMODEL_BENCH_PYTHON:-bench/.venv/bin/python}
if [ ! -x "$python" ]; then
    setup=scripts/setup-ref-venv.sh
    [ -f "$setup" ] || { echo "error: $setup not found; set FLEXMODEL_BENCH_PYTHON" >&2; exit 1; }
    bash "$setup" bench/.venv
fi
# The Python package (the flexmodel-py peer), built into that venv from this tree.
venv=$(cd "$(dirname "$python")/.." && pwd)
"$python" -c 'import maturin' 2>/dev/null || "$python" -m pip install -q maturin==1.16.0
# (A wheel, installed: `maturin develop` would put the module in the source tree, over the
# test venv's.)
wheels=$(mktemp -d)
(cd crates/flexmodel-py && VIRTUAL_ENV=$venv PATH=$venv/bin:$PATH \
    maturin build --release --quiet --interpreter "$venv/bin/python" --out "$wheels")
"$python" -m pip install -q --no-deps --force-reinstall "$wheels"/flexmodel-*.whl
rm -rf "$wheels"
exec "$python" bench/peers.py --python "$python" "$@"
