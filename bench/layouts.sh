#!/usr/bin/env bash
# Memory and time per layout (BENCHMARKS.md, "Beyond one device's memory"): the random 125M
# Llama under one process, dp2, fsdp2, fsdp4, fsdp2 with its shards offloaded, tp2 (batch
# 4 x 128: VmHWM per rank, forward time), and pp2 with and without micro-batches against one
# process (batch 8 x 128), each rank one thread (one process two), on the same 2 cores.
#
#   bash bench/layouts.sh [REPEATS]
set -euo pipefail
cd "$(dirname "$0")/.."
repeats=${1:-5}
cargo build --quiet --release -p flexmodel-dist --features mpi --example dist_bench
bench=target/release/examples/dist_bench
export OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-1} OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
run() {
    local ranks=$1
    shift
    echo "## $*"
    if [ "$ranks" = 1 ]; then
        RAYON_NUM_THREADS=2 "$bench" --repeats "$repeats" --no-capture "$@"
    else
        RAYON_NUM_THREADS=1 mpirun -q --bind-to none --oversubscribe -n "$ranks" \
            "$bench" --repeats "$repeats" --no-capture "$@"
    fi
}
run 1
run 2 --dp 2
run 2 --fsdp 2
run 4 --fsdp 4
run 2 --fsdp 2 --offload disk
run 2 --tp 2
run 1 --batch 8
run 2 --pp 2 --micro-batches 1 --batch 8
run 2 --pp 2 --batch 8
run 2 --pp 2 --micro-batches 8 --batch 8
