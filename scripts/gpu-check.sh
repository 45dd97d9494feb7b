#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU, a CUDA 13 driver and python3 with torch and
# transformers (no Rust, no network needed): parity of every fixture architecture with the
# transformers references in f32 and bf16, the world-1 NCCL communicator, the device-to-host
# bandwidth, and the speed of flexmodel against transformers on the same weights.
#
#   bash scripts/gpu-check.sh [--binary FILE] [--fixtures DIR] [gpu_check.py options...]
#
# Defaults: what scripts/pack-gpu-check.sh put in .gpu/ (unpacked here), else the binary
# scripts/build-cuda.sh made (target/cuda/flexmodel) and fixtures/base/models. Details go
# to $OUT (or the current directory); a short table is printed last.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
binary=$root/target/cuda/flexmodel
fixtures=
rest=()
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# Unpacked with Python's lzma and tarfile: the GPU machine may lack xz.
if [[ -f $root/.gpu/flexmodel.xz ]]; then
    "$python" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$root/.gpu/flexmodel.xz" "$scratch/flexmodel"
    chmod +x "$scratch/flexmodel"
    binary=$scratch/flexmodel
fi
if [[ -f $root/.gpu/fixtures.tar.xz ]]; then
    "$python" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
        "$root/.gpu/fixtures.tar.xz" "$scratch/fixtures"
    fixtures=$scratch/fixtures
fi
while (($#)); do
    case $1 in
        --binary) binary=$2; shift 2 ;;
        --fixtures) fixtures=$2; shift 2 ;;
        *) rest+=("$1"); shift ;;
    esac
done
if [[ -z $fixtures && -f $root/fixtures/base/models/llama/config.json ]]; then
    fixtures=$root/fixtures/base/models
fi
[[ -x $binary ]] || { echo "gpu-check.sh: no binary at $binary (build it with scripts/build-cuda.sh)" >&2; exit 1; }
[[ -n $fixtures ]] || { echo "gpu-check.sh: no fixtures found; pass --fixtures DIR" >&2; exit 1; }

# The CUDA libraries that come with PyTorch's pip packages, and the driver's. cudarc looks
# for libnccl.so, NCCL ships libnccl.so.2: a link in a scratch directory bridges the two.
links=$scratch/links
mkdir -p "$links"
"$python" - "$links" >"$scratch/paths" <<'PY'
import glob, os, sys
dirs = set()
try:
    import nvidia
    for base in nvidia.__path__:
        for lib in glob.glob(os.path.join(base, "**", "lib*.so*"), recursive=True):
            dirs.add(os.path.dirname(lib))
            if os.path.basename(lib) == "libnccl.so.2":
                os.symlink(lib, os.path.join(sys.argv[1], "libnccl.so"))
except (ImportError, FileExistsError):
    pass
print(":".join(sorted(dirs)))
PY
paths=$(cat "$scratch/paths")
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    if [[ -d $d ]]; then paths=$paths:$d; fi
done
# For the flexmodel binary only (gpu_check.py passes it on): Python keeps its own.
export FLEXMODEL_LIBRARY_PATH=$links:$paths${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONUNBUFFERED=1
"$python" "$root/scripts/gpu_check.py" --binary "$binary" --fixtures "$fixtures" "${rest[@]}"
