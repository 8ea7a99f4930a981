"""Workload 1 on flagm3: `flagm3 train`'s trainer on Cranfield train, all-MiniLM-L6-v2, CPU — the same
settings, data and measurements as bench/reference_train.py (FlagEmbedding), so the two JSONs compare.

Run with flagm3's python, after bench/make_cranfield_train.py and the reference's base-model preparation:

    python bench/flagm3_train.py [--loss-preset flagm3|bge-m3] [--max-steps 60] [--out JSON]
        [--output-dir DIR] [--overwrite] [-- extra flagm3 train flags ...]

Extra `flagm3 train` flags come after `--` and from $FLAGM3_EXTRA_ARGS (shell-split; given flags win over
the defaults below, since HfArgumentParser keeps the last occurrence).

Settings (flagm3's argument names, as FlagEmbedding's): unified_finetuning + use_self_distill
(self_distill_start_step -1), CLS pooling, normalize_embeddings, temperature 0.02, batch 4, group 4,
query_max_len 64, passage_max_len 256, learning_rate 2e-5, seed 42, fp32, use_cpu, no checkpoints,
--loss_preset as given; everything else is flagm3's default (e.g. length-grouped batches). Base model:
bench/work/base_minilm_eos (all-MiniLM-L6-v2 with eos_token = SEP, made by the reference side), fresh heads.

Measured (JSON, same keys as the reference's): seconds per step (steady state), compute and CPU seconds per
step, queries/s, peak RSS, padding fractions, and one step's forward+backward on the first batch: the full
model + loss vs the bare encoder on the same batch (alternated; heads+loss = the difference). The model is
saved in flagm3's layout to --output-dir and in BGE-M3 layout to --output-dir/bge-m3.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK_DIR, peak_rss_mb, write_json  # noqa: E402
from reference_train import make_timer_callback  # noqa: E402  (framework-agnostic TrainerCallback)


class RecordingCollator:
    """Wraps flagm3's collator: counts real vs padded tokens per side and keeps the first batch."""

    def __init__(self, base: Any, max_chunks: int = 1) -> None:
        self.base = base
        self.max_chunks = max_chunks
        self.tokens = {"query": [0, 0], "passage": [0, 0]}  # [real, total]
        self.encoded = {"query": [0.0, 0], "passage": [0.0, 0]}  # [sum of processed padding fractions, batches]
        self.first_batch: dict | None = None

    def __call__(self, features: list) -> dict:
        from flagm3.losses.chunking import chunked_padding_fraction

        batch = self.base(features)
        for side in ("query", "passage"):
            mask = batch[side]["attention_mask"]
            self.tokens[side][0] += int(mask.sum())
            self.tokens[side][1] += mask.numel()
            self.encoded[side][0] += chunked_padding_fraction(mask, self.max_chunks)
            self.encoded[side][1] += 1
        if self.first_batch is None:
            self.first_batch = batch
        return batch

    def padding_fraction(self, side: str) -> float:
        real, total = self.tokens[side]
        return 1.0 - real / total if total else 0.0

    def encoded_padding_fraction(self, side: str) -> float:
        """Mean over batches of the padding the encoder processes after length chunking."""
        total, batches = self.encoded[side]
        return total / batches if batches else 0.0


def time_breakdown(trainer: Any, batch: dict, repeats: int) -> dict:
    """Forward+backward of model + M3 loss vs the bare encoder on the same batch, cut into the same length
    chunks as the trainer cuts it (train mode, fp32).

    Run alternately; wall and CPU seconds as min (and median); heads_and_loss = full - encoder on the minima.
    ``batch``: {"query": {input_ids [B, Lq], ...}, "passage": {input_ids [B*G, Lp], ...}, ...}.
    """
    from flagm3.trainer import unwrap_m3

    model = trainer.model
    encoder = unwrap_m3(model).encoder
    model.train()

    def full() -> None:
        trainer.compute_loss(model, batch).backward()

    from flagm3.losses.chunking import CHUNK_OVERHEAD_TOKENS, split_by_length

    def bare() -> None:  # the encoder alone, on the batch as the trainer feeds it (length chunks per side)
        total = 0.0
        for side in ("query", "passage"):
            for _, part in split_by_length(batch[side], getattr(trainer.args, "max_length_chunks", 1),
                                           CHUNK_OVERHEAD_TOKENS):
                total = total + encoder(**part, return_dict=True).last_hidden_state.sum()
        total.backward()

    wall: dict[str, list[float]] = {"full": [], "encoder": []}
    cpu: dict[str, list[float]] = {"full": [], "encoder": []}
    for _ in range(repeats):
        for name, fn in (("full", full), ("encoder", bare)):
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
    out["batch_shapes"] = {side: list(batch[key]["input_ids"].shape)
                           for side, key in (("queries", "query"), ("passages", "passage"))}
    return out


def train_flags(args: argparse.Namespace, base: Path, out_dir: Path, extra: list[str]) -> list[str]:
    """`flagm3 train` flags of workload 1 (FlagEmbedding's names), then `extra` (later flags win)."""
    return [
        "--model_name_or_path", str(base), "--train_data", args.train_data, "--output_dir", str(out_dir),
        "--train_group_size", str(args.group_size), "--query_max_len", str(args.query_max_len),
        "--passage_max_len", str(args.passage_max_len), "--per_device_train_batch_size", str(args.batch_size),
        "--learning_rate", str(args.lr), "--max_steps", str(args.max_steps), "--temperature", str(args.temperature),
        "--unified_finetuning", "True", "--use_self_distill", "True", "--sentence_pooling_method", "cls",
        "--normalize_embeddings", "True", "--seed", str(args.seed), "--use_cpu", "True", "--save_strategy", "no",
        "--logging_steps", "10", "--report_to", "none", "--disable_tqdm", "True", "--dataloader_num_workers", "0",
        "--loss_preset", args.loss_preset, "--save_bge_m3_layout", "True",
        *extra,
    ]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss-preset", default=None, help="flagm3 --loss_preset (default: the package default)")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--train-data", default=str(WORK_DIR / "cranfield_train.jsonl"))
    p.add_argument("--output-dir", default=str(WORK_DIR / "flagm3_model"))
    p.add_argument("--out", default=str(WORK_DIR / "flagm3_train.json"))
    p.add_argument("--base-model", default=str(WORK_DIR / "base_minilm_eos"))
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
    args = p.parse_args(own)
    extra = shlex.split(os.environ.get("FLAGM3_EXTRA_ARGS", "")) + extra
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from flagm3.train import build_trainer, parse_args
    from flagm3.training_args import M3TrainingArguments

    if args.loss_preset is None:
        args.loss_preset = M3TrainingArguments.__dataclass_fields__["loss_preset"].default
    if not Path(args.train_data).is_file():
        sys.exit(f"ERROR: training data {args.train_data} not found (run bench/make_cranfield_train.py)")
    base = Path(args.base_model)
    if not (base / "config.json").exists():
        sys.exit(f"ERROR: base model {base} not found (bench/run.sh prepares it with the reference venv)")
    out_dir = Path(args.output_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not args.overwrite:
            sys.exit(f"ERROR: output dir {out_dir} is not empty (pass --overwrite)")
        shutil.rmtree(out_dir)

    flags = train_flags(args, base, out_dir, extra)
    model_args, data_args, training_args = parse_args(flags)
    t0 = time.perf_counter()
    trainer = build_trainer(model_args, data_args, training_args)
    setup_s = time.perf_counter() - t0
    collator = RecordingCollator(trainer.data_collator, getattr(trainer.args, "max_length_chunks", 1))
    trainer.data_collator = collator
    timer = make_timer_callback()
    trainer.add_callback(timer)
    t0 = time.perf_counter()
    trainer.train()
    trainer.save_model()
    run_s = time.perf_counter() - t0
    peak_train_mb = peak_rss_mb()  # before the breakdown adds its own passes

    intervals = timer.intervals()
    steady = intervals[args.warmup_steps:] or intervals
    steady_compute = timer.compute[args.warmup_steps:] or timer.compute
    sec_per_step = statistics.mean(steady)
    breakdown = {}  # --breakdown-repeats 0: no breakdown (quality runs)
    if args.breakdown_repeats:
        breakdown = time_breakdown(trainer, collator.first_batch, args.breakdown_repeats)
    loss = trainer.m3_loss.config
    write_json(args.out, {
        "implementation": f"flagm3 (M3Trainer, loss_preset={args.loss_preset})",
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
        "padding_fraction": {"queries": collator.padding_fraction("query"),
                             "passages": collator.padding_fraction("passage")},
        "encoded_padding_fraction": {"queries": collator.encoded_padding_fraction("query"),
                                     "passages": collator.encoded_padding_fraction("passage")},
        "step_breakdown": breakdown,
        "losses": timer.losses,
        "output_dir": str(out_dir),
        "bge_m3_dir": str(out_dir / "bge-m3"),
        "settings": {
            "base_model": str(base), "train_data": args.train_data, "per_device_train_batch_size": args.batch_size,
            "train_group_size": args.group_size, "query_max_len": args.query_max_len,
            "passage_max_len": args.passage_max_len, "learning_rate": args.lr, "max_steps": args.max_steps,
            "temperature": args.temperature, "seed": args.seed, "loss_preset": args.loss_preset,
            "extra_args": extra, "loss_config": trainer.m3_loss.get_config_dict(),
            "head_learning_rate": training_args.head_learning_rate,
            "lr_scheduler_type": str(training_args.lr_scheduler_type), "warmup_steps": getattr(training_args, "warmup_steps", None),
            "weight_decay": training_args.weight_decay, "group_by_length": data_args.group_by_length,
            "pad_to_multiple_of": data_args.pad_to_multiple_of, "heads": list(loss.heads),
        },
        "saved_files": sorted(os.listdir(out_dir)),
    })


if __name__ == "__main__":
    main()
