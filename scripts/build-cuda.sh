#!/usr/bin/env bash
# Builds the CUDA flexmodel binary on a machine without a GPU or a CUDA install.
#
#   bash scripts/build-cuda.sh [--features LIST] [--out FILE] [--clippy]
#
# Default features: cuda,nccl (add `mpi` for multi-GPU jobs under mpirun; the binary then needs
# Open MPI's libmpi where it runs). Result: target/cuda/flexmodel (stripped), or --out FILE.
# --clippy lints the CUDA code instead (clippy -D warnings on every target, same setup).
#
# What it does, and why:
# - The CUDA 13.0 toolchain comes from PyPI wheels into target/cuda-venv (Debian has no usable
#   toolkit here). nvidia-nvvm is pinned: unpinned it resolves to 13.5, whose PTX a 13.0 driver
#   cannot load.
# - candle-core 0.11.1 builds cudarc with `dynamic-linking`, which needs libcuda at link time
#   and at start. The script copies the registry's candle-core into target/cuda-patch, switches
#   cudarc to `dynamic-loading` (dlopen at first use), and builds through cargo's `patch`, so the
#   binary builds here and starts anywhere: without a GPU it reports "no CUDA device".
#   No third-party source is committed; Cargo.lock is restored afterwards.
# - A cold build takes ~25 minutes on 2 cores (candle-kernels compiles a static kernel library).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
features=cuda,nccl
out=$root/target/cuda/flexmodel
clippy=
while (($#)); do
    case $1 in
        --features) features=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --clippy) clippy=1; shift ;;
        *) echo "build-cuda.sh: unknown argument '$1' (accepted: --features LIST, --out FILE, --clippy)" >&2; exit 2 ;;
    esac
done

venv=$root/target/cuda-venv
if [[ ! -x $venv/bin/nvcc-ok ]]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 \
        nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-nccl-cu13==2.27.7
    printf '#!/bin/sh\n' >"$venv/bin/nvcc-ok" && chmod +x "$venv/bin/nvcc-ok"
fi
cuda=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
[[ -x $cuda/bin/nvcc ]] || { echo "build-cuda.sh: no nvcc under $cuda" >&2; exit 1; }

# candle-kernels links `-lcudart` (its static MoE kernels launch through the runtime). A
# linker script named libcudart.so points the linker at the static runtime instead, so the
# binary needs no libcudart at start (the static runtime finds the driver when first used).
libs=$root/target/cuda-libs
mkdir -p "$libs"
rm -f "$libs/libcudart.so"
echo "INPUT($cuda/lib/libcudart_static.a -lrt -lpthread -ldl)" >"$libs/libcudart.so"

# candle-core with cudarc loaded at run time.
registry=$(dirname "$(cargo metadata --format-version 1 --locked \
    | python3 -c 'import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "candle-core"))')")
patched=$root/target/cuda-patch/candle-core
if [[ $(cat "$patched/.patched" 2>/dev/null) != "$registry" ]]; then
    rm -rf "$patched" && mkdir -p "$(dirname "$patched")"
    cp -r "$registry" "$patched"
    grep -q '"dynamic-linking"' "$patched/Cargo.toml" || {
        echo "build-cuda.sh: candle-core's manifest no longer names cudarc's dynamic-linking" >&2; exit 1; }
    sed -i 's/"dynamic-linking"/"dynamic-loading"/' "$patched/Cargo.toml"
    echo "$registry" >"$patched/.patched"
fi

cp "$root/Cargo.lock" "$root/target/Cargo.lock.cuda-backup"
trap 'cp "$root/target/Cargo.lock.cuda-backup" "$root/Cargo.lock"' EXIT

export PATH=$cuda/bin:$PATH CUDA_HOME=$cuda CUDA_ROOT=$cuda CUDA_PATH=$cuda
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=13000
export RUSTFLAGS="${RUSTFLAGS:-} -L $libs"
cd "$root"
cargo_cuda() {
    cargo "$1" --release --target-dir "$root/target/cuda-build" \
        --config "patch.crates-io.candle-core.path=\"$patched\"" "${@:2}"
}
if [[ -n $clippy ]]; then
    cargo_cuda clippy --workspace --all-targets \
        --features "$(echo "$features" | sed 's/[^,]*/flexmodel-cli\/&/g')" -- -D warnings
    exit
fi
cargo_cuda build -p flexmodel-cli --features "$features"
mkdir -p "$(dirname "$out")"
strip -o "$out" "$root/target/cuda-build/release/flexmodel"
echo "built $out ($(du -h "$out" | cut -f1), features $features)"
