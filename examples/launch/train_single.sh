#!/usr/bin/env bash
# One process (one GPU, or the CPU): unified M3 fine-tuning with self-distillation.
#   MODEL=... TRAIN_DATA=... OUTPUT_DIR=... bash examples/launch/train_single.sh [more flagm3 train arguments]
# Environment: see common.sh (BATCH_SIZE here defaults to 4 queries per step).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
BATCH_SIZE="${BATCH_SIZE:-4}"

run_or_print "$PYTHON" -m flagm3.train \
    "${M3_ARGS[@]}" \
    --per_device_train_batch_size "$BATCH_SIZE" \
    "$@"
