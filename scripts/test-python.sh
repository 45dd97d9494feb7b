#!/usr/bin/env bash
# The Python package's tests: makes the venv once (.venv: numpy, ml_dtypes, pytest, maturin,
# huggingface_hub for downloads from a stand-in Hub server, cloudpickle for flexmodel.Job, and
# PyPI's torch without its CUDA libraries, as scripts/setup-ref-venv.sh does), builds the
# package into it with MPI (maturin develop), then runs pytest. The CLI the tests compare with
# is the one `cargo test` built (target/debug/flexmodel). Extra arguments go to pytest.
#
#   bash scripts/test-python.sh                 # every Python test
#   bash scripts/test-python.sh -k gradients    # some
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FLEXMODEL_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py=$venv/bin/python
"$py" -c 'import numpy, ml_dtypes, pytest, maturin, huggingface_hub, cloudpickle' 2>/dev/null ||
    "$venv/bin/pip" install -q numpy==2.4.6 ml-dtypes==0.7.0 pytest==9.2.0 maturin==1.16.0 \
        huggingface_hub==2.4.0 cloudpickle==3.1.3
if ! "$py" -c 'import torch' 2>/dev/null; then
    # Anything that depends on torch goes in with --no-deps: pip would fetch ~3 GB of CUDA.
    "$venv/bin/pip" install -q --no-deps torch==2.15.0
    "$venv/bin/pip" install -q filelock 'typing-extensions>=4.13.0' 'setuptools>=77.0.3' \
        'sympy>=1.13.3' 'networkx>=2.5.1' jinja2 'fsspec>=0.8.5'
    "$py" scripts/torch_cuda_stubs.py >/dev/null
fi
features=${FLEXMODEL_PY_FEATURES:-mpi}
(cd crates/flexmodel-py && VIRTUAL_ENV=$PWD/../../$venv PATH=$PWD/../../$venv/bin:$PATH \
    maturin develop --quiet --locked --features "$features")
export FLEXMODEL_CLI=${FLEXMODEL_CLI:-$PWD/target/debug/flexmodel}
[ -x "$FLEXMODEL_CLI" ] || cargo build --quiet --locked -p flexmodel-cli --features mpi
exec "$py" -m pytest -q crates/flexmodel-py/tests "$@"
