#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU, a CUDA 13 driver and python3 with torch and
# transformers (no Rust, no network needed): parity of every fixture architecture with the
# transformers references in f32 and bf16, the world-1 NCCL communicator, the device-to-host
# bandwidth, and the speed of flexmodel against transformers on the same weights.
#
#   bash scripts/gpu-check.sh [--binary FILE] [--fixtures DIR] [gpu_check.py options...]
#
# Defaults: the binary scripts/build-cuda.sh made (target/cuda/flexmodel), the fixtures in
# .gpu/fixtures or ../shared/fixtures/models. Details go to $OUT (or the current directory);
# a short table is printed last.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
binary=$root/target/cuda/flexmodel
fixtures=
rest=()
while (($#)); do
    case $1 in
        --binary) binary=$2; shift 2 ;;
        --fixtures) fixtures=$2; shift 2 ;;
        *) rest+=("$1"); shift ;;
    esac
done
if [[ -z $fixtures ]]; then
    for d in "$root/.gpu/fixtures" "$root/../shared/fixtures/models"; do
        [[ -f $d/llama/config.json ]] && { fixtures=$d; break; }
    done
fi
[[ -x $binary ]] || { echo "gpu-check.sh: no binary at $binary (build it with scripts/build-cuda.sh)" >&2; exit 1; }
[[ -n $fixtures ]] || { echo "gpu-check.sh: no fixtures found; pass --fixtures DIR" >&2; exit 1; }

# The CUDA libraries that come with PyTorch's pip packages, and the driver's. cudarc looks
# for libnccl.so, NCCL ships libnccl.so.2: a link in a scratch directory bridges the two.
links=$(mktemp -d)
trap 'rm -rf "$links"' EXIT
paths=$(python3 - <<'PY'
import glob, os
dirs = set()
try:
    import nvidia
    for base in nvidia.__path__:
        for lib in glob.glob(os.path.join(base, "**", "lib*.so*"), recursive=True):
            dirs.add(os.path.dirname(lib))
except ImportError:
    pass
print(":".join(sorted(dirs)))
PY
)
nccl=$(echo "$paths" | tr ':' '\n' | while read -r d; do ls "$d"/libnccl.so.2 2>/dev/null; done | head -n1)
[[ -n $nccl ]] && ln -s "$nccl" "$links/libnccl.so"
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu; do
    [[ -d $d ]] && paths=$paths:$d
done
export LD_LIBRARY_PATH=$links:$paths${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONUNBUFFERED=1
exec python3 "$root/scripts/gpu_check.py" --binary "$binary" --fixtures "$fixtures" "${rest[@]}"
