#!/usr/bin/env bash
# NPROC processes on one machine (GPUs with NCCL, or CPU processes with gloo), negatives shared across them:
# each query is scored against the passages of every process (--negatives_cross_device).
#   NPROC=2 MODEL=... TRAIN_DATA=... bash examples/launch/train_torchrun.sh [more flagm3 train arguments]
# BATCH_SIZE is per process (default 2: a global batch of NPROC*2 queries).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NPROC="${NPROC:-2}"
BATCH_SIZE="${BATCH_SIZE:-2}"

run_or_print torchrun --standalone --nproc_per_node "$NPROC" -m flagm3.train \
    "${M3_ARGS[@]}" \
    --per_device_train_batch_size "$BATCH_SIZE" \
    --negatives_cross_device True \
    "$@"
