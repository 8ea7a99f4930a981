#!/usr/bin/env bash
# flagm3 vs FlagEmbedding 1.4.2 benchmarks: the one command. See bench/README.md.
#
#   bench/run.sh [--quick] [--parallel] [--stages LIST]
#
#   --quick         smoke run: 3 training steps, the first 100 documents, 128-token evaluation, batch search
#                   up to 4; results go to bench/work/quick/results/ (bench/results/ is left alone)
#   --parallel      run the three trainings at the same time, and the inference / quality / agreement
#                   stages at the same time: on a busy shared machine all runs then see the same load
#                   (and the whole takes about a third of the time); the memory stage always runs alone
#   --stages LIST   comma-separated subset of: setup,train,train_lowmem,inference,quality,agreement,memory,
#                   quality_seeds,sparse_gap,report (default: all but quality_seeds and sparse_gap, in that
#                   order; later stages read earlier stages' outputs)
#   quality_seeds   (its own stage, not in the default) 3 seeds x {FlagEmbedding, flagm3 default, flagm3 bge-m3}
#                   x {Cranfield, CACM}: 18 trainings + evaluations (bench/quality_seeds.py; about 3 h on 2
#                   cores shared with other jobs, about 30 min on 2 quiet cores, 2 runs at a time;
#                   FLAGM3_SEEDS_ARGS adds options)
#   sparse_gap      (its own stage) the sparse head's gap to BM25 split into tokenizer, truncation, term
#                   frequency and IDF fit, on Cranfield and CACM, no training (bench/sparse_gap.py; 3 min)
#
# Env: PYTHON (flagm3's interpreter, default python3); FLAGM3_REFERENCE_PYTHON (the FlagEmbedding venv's
# python; default: built or reused by .ci/setup_reference_env.sh); FLAGM3_EXTRA_ARGS (extra `flagm3 train`
# flags for the default-recipe run only); FLAGM3_BENCH_MAX_BATCH (250k-vocabulary batch search cap, 256);
# FLAGM3_BENCH_BUDGET_GIB (memory budget of that search, 16).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

QUICK=0
PARALLEL=0
STAGES="setup,train,train_lowmem,inference,quality,agreement,memory,report"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --parallel) PARALLEL=1 ;;
        --stages) STAGES="$2"; shift ;;
        -h|--help) sed -n 2,24p "$0"; exit 0 ;;
        *) echo "bench/run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
want() { [[ ",$STAGES," == *",$1,"* ]]; }
# wait_all: wait for every background step; fail if any failed.
wait_all() {
    local pid failed=0
    for pid in $(jobs -p); do wait "$pid" || failed=1; done
    return $failed
}

PY="${PYTHON:-python3}"
WORK=bench/work
if [ "$QUICK" = 1 ]; then
    STEPS=3; WARMUP=1; REPEATS=1; MAX_DOCS=100; EVAL_LEN=128; MAX_BATCH=4; TRIAL_TIMEOUT=900
    RES=$WORK/quick/results; M=$WORK/quick
else
    STEPS=60; WARMUP=2; REPEATS=3; MAX_DOCS=0; EVAL_LEN=512; MAX_BATCH="${FLAGM3_BENCH_MAX_BATCH:-256}"
    TRIAL_TIMEOUT=2400; RES=bench/results; M=$WORK/models
fi
BUDGET="${FLAGM3_BENCH_BUDGET_GIB:-16}"
LOGS=$M/logs
REF_MODEL=$M/reference; F3_BGE=$M/flagm3_bge-m3; F3_DEF=$M/flagm3_default
mkdir -p "$RES" "$LOGS" "$M"

# step NAME COMMAND...: run with its output in $LOGS/NAME.log, print the time; show the log's tail on failure.
step() {
    local name=$1; shift
    local t0=$SECONDS
    echo "[run.sh] $name ..." >&2
    if "$@" >"$LOGS/$name.log" 2>&1; then
        echo "[run.sh] $name done in $((SECONDS - t0)) s" >&2
    else
        local rc=$?
        echo "[run.sh] $name FAILED (exit $rc) after $((SECONDS - t0)) s; last lines of $LOGS/$name.log:" >&2
        tail -n 25 "$LOGS/$name.log" >&2
        return $rc
    fi
}

# ---------------------------------------------------------------------------------------------- setup
if want setup; then
    "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0  # the CPU wheel first
    "$PY" -c "import flagm3" 2>/dev/null || "$PY" -m pip install -q -e .
    "$PY" -c "import bm25s, psutil, matplotlib, pytrec_eval" 2>/dev/null \
        || "$PY" -m pip install -q bm25s psutil matplotlib pytrec_eval-terrier
fi
if [ -z "${FLAGM3_REFERENCE_PYTHON:-}" ]; then
    # Reuse a reference venv beside the checkout (as ../shared) when the default location has none.
    if [ -z "${FLAGM3_REFERENCE_VENV:-}" ] && [ ! -x "$HOME/.cache/flagm3/fe-venv/bin/python" ] \
        && [ -x ../fe-venv/bin/python ]; then
        FLAGM3_REFERENCE_VENV=$(cd ../fe-venv && pwd)
        export FLAGM3_REFERENCE_VENV
    fi
    FLAGM3_REFERENCE_PYTHON=$(bash .ci/setup_reference_env.sh | tail -n 1)
fi
export FLAGM3_REFERENCE_PYTHON
FE="$FLAGM3_REFERENCE_PYTHON"
export TOKENIZERS_PARALLELISM=false

if want setup; then
    [ -s $WORK/cranfield_train.jsonl ] || step make_data "$PY" bench/make_cranfield_train.py
    # all-MiniLM-L6-v2 with eos_token = SEP, written by the reference's transformers so both can load it.
    step base_model "$FE" -c "import sys; sys.path.insert(0, 'bench'); from reference_train import \
prepare_base_model, WORK_DIR; prepare_base_model(WORK_DIR / 'base_minilm_eos')"
    "$PY" - "$RES/run_info.json" "$QUICK" <<'EOF'
import json, os, platform, sys, time
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
json.dump({"command": "bench/run.sh" + (" --quick" if sys.argv[2] == "1" else ""),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{os.cpu_count()} cores ({cpu}), {platform.python_version()}",
           "load_average_at_start": os.getloadavg(),
           "mode_note": "Quick smoke run: 3 steps, 100 documents, 128 tokens; not a measurement."
           if sys.argv[2] == "1" else "Full run."}, open(sys.argv[1], "w"), indent=2)
EOF
fi

# -------------------------------------------------------------------------- workload 1: training
TRAIN_COMMON=(--max-steps "$STEPS" --warmup-steps "$WARMUP" --breakdown-repeats "$REPEATS" --overwrite)
if want train; then
    step train_reference "$FE" bench/reference_train.py "${TRAIN_COMMON[@]}" --output-dir "$REF_MODEL" \
        --out "$RES/train_reference.json" &
    [ "$PARALLEL" = 1 ] || wait_all
    FLAGM3_EXTRA_ARGS="" step train_flagm3_bge-m3 "$PY" bench/flagm3_train.py "${TRAIN_COMMON[@]}" \
        --loss-preset bge-m3 --output-dir "$F3_BGE" --out "$RES/train_flagm3_bge-m3.json" &
    [ "$PARALLEL" = 1 ] || wait_all
    step train_flagm3_default "$PY" bench/flagm3_train.py "${TRAIN_COMMON[@]}" --output-dir "$F3_DEF" \
        --out "$RES/train_flagm3_default.json" &
    wait_all
fi

# The default recipe with gradient checkpointing: the memory-lean configuration (throughput and memory only).
if want train_lowmem; then
    step train_flagm3_lowmem "$PY" bench/flagm3_train.py "${TRAIN_COMMON[@]}" --output-dir "$M/flagm3_lowmem" \
        --out "$RES/train_flagm3_lowmem.json" -- --gradient_checkpointing True
fi

# ----------------------------------------------------- workloads 3 and 4: inference, quality, agreement
EVAL=(--max-docs "$MAX_DOCS" --max-length "$EVAL_LEN" --batch-size 32)
JOBS=1; QPID=0
[ "$PARALLEL" = 1 ] && JOBS=4
if want inference; then
    step inference_speed "$PY" bench/inference_speed.py "$F3_DEF/bge-m3" --reference-python "$FE" \
        --max-docs "$MAX_DOCS" --max-length "$EVAL_LEN" --batch-size 32 --repeats 3 \
        --dump "$M/inference_dump" --out "$RES/inference_speed.json" &
    [ "$PARALLEL" = 1 ] || wait_all
fi
if want quality; then
    rm -f "$RES/quality.json"
    step quality "$PY" bench/quality.py --untouched untouched --model "reference=$REF_MODEL" \
        --model "flagm3_bge-m3=$F3_BGE" --model "flagm3_default=$F3_DEF" "${EVAL[@]}" --jobs "$JOBS" \
        --out "$RES/quality.json" &
    QPID=$!
    [ "$PARALLEL" = 1 ] || wait_all
fi
if want agreement; then
    # A mismatch is reported (✗ in the table), not fatal.
    { step eval_agreement "$PY" bench/eval_agreement.py --reference-python "$FE" \
        --pair reference "$REF_MODEL" "$REF_MODEL" --pair flagm3_default "$F3_DEF" "$F3_DEF/bge-m3" \
        --quality "$RES/quality.json" --wait-pid "$QPID" --jobs "$JOBS" "${EVAL[@]}" \
        --out "$RES/eval_agreement.json" || true; } &
fi
wait_all

# ---------------------------------------------------------------------- workload 2: 250k vocabulary
if want memory; then
    step memory_250k "$PY" bench/memory_250k.py --reference-python "$FE" --budget-gib "$BUDGET" \
        --max-batch "$MAX_BATCH" --timeout "$TRIAL_TIMEOUT" --out "$RES/memory_250k.json"
fi

# ------------------------------------------------- quality over seeds, implementations and collections
if want quality_seeds; then
    # shellcheck disable=SC2086
    step quality_seeds "$PY" bench/quality_seeds.py --reference-python "$FE" --out "$RES/quality_seeds.json" \
        ${FLAGM3_SEEDS_ARGS:-} || true  # unfinished cells are listed in the JSON and the report
fi

if want sparse_gap; then
    SHARED="${FLAGM3_SHARED_DATA:-$ROOT/../shared/data}"
    for coll in cranfield cacm; do
        FLAGM3_DATA_DIR="$SHARED/$coll" step "sparse_gap_$coll" "$PY" bench/sparse_gap.py \
            --out "$RES/sparse_gap_$coll.json"
    done
fi

if want report; then
    "$PY" bench/report.py --results "$RES"
fi
