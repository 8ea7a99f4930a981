#!/usr/bin/env bash
# DeepSpeed ZeRO (stage 2 by default) on NPROC processes, started by torchrun (the `deepspeed` launcher works
# too). The config's "auto" values come from these arguments; it has no optimizer section, so the Trainer's
# AdamW (with --head_learning_rate if given) and scheduler are used.
#   DS_CONFIG=stage3 NPROC=2 bash examples/launch/train_deepspeed.sh [arguments]
# On CPU, DeepSpeed compiles its shared-memory communication op on first use (about 30 s, then cached).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NPROC="${NPROC:-2}"
BATCH_SIZE="${BATCH_SIZE:-2}"
DS_CONFIG="${DS_CONFIG:-stage2}"  # stage1/stage2/stage3: the configs shipped with flagm3, or a path

run_or_print torchrun --standalone --nproc_per_node "$NPROC" -m flagm3.train \
    "${M3_ARGS[@]}" \
    --per_device_train_batch_size "$BATCH_SIZE" \
    --negatives_cross_device True \
    --gradient_checkpointing True \
    --deepspeed "$DS_CONFIG" \
    "$@"
