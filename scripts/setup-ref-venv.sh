#!/usr/bin/env bash
# Build the Python reference venv (.venv-ref) used by fixtures/make_fixtures.py
# and the peer benchmarks: CPU torch + transformers, WITHOUT the ~3 GB of
# nvidia-*/cuda-toolkit/triton wheels that `pip install torch` pulls on Linux.
#
# PyPI's linux x86_64 torch wheel is a CUDA build (539 MB); PyPI has no CPU-only
# build and download.pytorch.org is not reachable here.  We install it with
# --no-deps, add its pure-python deps, and let scripts/torch_cuda_stubs.py
# build tiny stand-ins for the CUDA .so files it links (needs gcc + readelf).
# Result: ~1.6 GB venv, torch.cuda.is_available() == False, CPU ops work.
#
# RULE: install anything that depends on torch with --no-deps, or pip will
# "repair" torch by downloading every CUDA wheel.
#
# Usage (repo root):  bash scripts/setup-ref-venv.sh [VENV_DIR]
set -euo pipefail
VENV=${1:-.venv-ref}
HERE=$(cd "$(dirname "$0")" && pwd)
python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install --no-deps torch==2.15.0
"$PIP" install filelock 'typing-extensions>=4.13.0' 'setuptools>=77.0.3' 'sympy>=1.13.3' \
    'networkx>=2.5.1' jinja2 'fsspec>=0.8.5' numpy==2.4.6
"$VENV/bin/python" "$HERE/torch_cuda_stubs.py"
# transformers does not depend on torch, so a normal install is safe
"$PIP" install transformers==5.24.0 safetensors==0.8.0 tokenizers==0.23.3
# the original FlexModel (peer for benchmarks); its only dep is torch>=2.1
"$PIP" install --no-deps flex-model==0.1.0
# nnsight (peer for the Python benchmark), without letting pip touch torch
"$PIP" install --no-deps nnsight==0.8.1
"$PIP" install greenlet pydantic pyyaml cloudpickle huggingface-hub websocket-client zstandard \
    httpx tqdm
"$VENV/bin/python" - <<'EOF'
import torch, transformers, safetensors, tokenizers, numpy, nnsight
a = torch.randn(2, 2) @ torch.randn(2, 2)
assert not torch.cuda.is_available()
print("ok torch", torch.__version__, "transformers", transformers.__version__,
      "safetensors", safetensors.__version__, "tokenizers", tokenizers.__version__,
      "numpy", numpy.__version__)
EOF
