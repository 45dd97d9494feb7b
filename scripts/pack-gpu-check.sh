#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh needs on a GPU machine that has no Rust and no network into
# .gpu/ (ignored by git): the CUDA binary and the reference fixtures, xz-compressed (the binary
# is ~60 MB, mostly PTX text; packed ~8 MB). Build the binary first (scripts/build-cuda.sh).
#
#   bash scripts/pack-gpu-check.sh [--fixtures DIR]      # default fixtures/base/models
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
fixtures=$root/fixtures/base/models
[[ ${1:-} == --fixtures ]] && fixtures=$2
binary=$root/target/cuda/flexmodel
[[ -x $binary ]] || { echo "pack-gpu-check.sh: build $binary first (scripts/build-cuda.sh)" >&2; exit 1; }
[[ -f $fixtures/llama/config.json ]] || { echo "pack-gpu-check.sh: no fixtures at $fixtures" >&2; exit 1; }

mkdir -p "$root/.gpu"
grep -qx '/.gpu/' "$root/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >>"$root/.git/info/exclude"
xz -T0 -6 -c "$binary" >"$root/.gpu/flexmodel.xz"
tar -C "$fixtures" -cJf "$root/.gpu/fixtures.tar.xz" .
du -sh "$root/.gpu"/*
