"""Workload 2 on the REFERENCE side: a 250k-token vocabulary. Run with the reference venv's python.

    $FE_PY bench/reference_memory_250k.py prepare [--dir bench/work/vocab250k] [--train-data JSONL]
    $FE_PY bench/reference_memory_250k.py trial --batch-size B [--steps 2] [--dir ...]

prepare: writes, once, what both implementations train on (transformers 4 writes it, so both load it):
- `model/`: a random 2-layer BERT (hidden 128, 2 heads, intermediate 512, vocabulary 250,002, seed 0) and a
  word-level tokenizer (tokenizers' WordLevel, whitespace split, `[CLS] text [SEP]`) whose vocabulary is the
  5 BERT special tokens then `w5` .. `w250001`; eos_token = `[SEP]` (FlagEmbedding needs one);
- `train.jsonl`: bench/work/cranfield_train.jsonl with every word of every text replaced by the token
  `w<5 + crc32(word) mod 249,997>`: Cranfield's lengths and repetitions, ids spread over the whole vocabulary.

trial: FlagEmbedding 1.4.2's M3 runner and trainer (unified + self-distill, batch B x group 4, q64/p256,
lr 2e-5, fp32, CPU) for --steps optimizer steps, no checkpoint; prints one JSON line: peak RSS (getrusage),
seconds. bench/memory_250k.py runs each trial in a child process with an address-space limit and a timeout.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK_DIR, peak_rss_mb  # noqa: E402

VOCAB_SIZE = 250_002
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DEFAULT_DIR = WORK_DIR / "vocab250k"


def hashed_words(text: str) -> str:
    """Every word of `text` as one token `w<id>` with id in [5, VOCAB_SIZE) (crc32: stable across runs)."""
    span = VOCAB_SIZE - len(SPECIALS)
    return " ".join(f"w{len(SPECIALS) + zlib.crc32(w.encode()) % span}" for w in re.findall(r"\w+", text.lower()))


def prepare(directory: Path, train_data: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    model_dir = directory / "model"
    if (model_dir / "model.safetensors").is_file() and (directory / "train.jsonl").is_file():
        print(f"{directory}: already prepared")
        return
    if not train_data.is_file():
        sys.exit(f"ERROR: {train_data} not found (run bench/make_cranfield_train.py first)")
    model_dir.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), VOCAB_SIZE)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", eos_token="[SEP]", model_max_length=512,
    )
    tokenizer.save_pretrained(model_dir)
    config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=512, max_position_embeddings=512, pad_token_id=0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(model_dir, safe_serialization=True)
    with open(train_data, encoding="utf-8") as src, open(directory / "train.jsonl", "w", encoding="utf-8") as dst:
        for line in src:
            row = json.loads(line)
            dst.write(json.dumps({"query": hashed_words(row["query"]), "pos": [hashed_words(t) for t in row["pos"]],
                                  "neg": [hashed_words(t) for t in row["neg"]]}) + "\n")
    print(f"prepared {directory}: vocabulary {VOCAB_SIZE}, {sum(1 for _ in open(directory / 'train.jsonl'))} rows")


def trial(directory: Path, batch_size: int, steps: int, group_size: int) -> dict:
    """FlagEmbedding's M3 training for `steps` steps at `batch_size` queries; peak RSS and time."""
    from FlagEmbedding.finetune.embedder.encoder_only.m3 import (
        EncoderOnlyEmbedderM3DataArguments,
        EncoderOnlyEmbedderM3ModelArguments,
        EncoderOnlyEmbedderM3Runner,
        EncoderOnlyEmbedderM3TrainingArguments,
    )
    from transformers import HfArgumentParser

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=WORK_DIR) as out:
        flags = [
            "--model_name_or_path", str(directory / "model"), "--train_data", str(directory / "train.jsonl"),
            "--output_dir", out, "--train_group_size", str(group_size), "--query_max_len", "64",
            "--passage_max_len", "256", "--per_device_train_batch_size", str(batch_size), "--learning_rate", "2e-5",
            "--max_steps", str(steps), "--temperature", "0.02", "--unified_finetuning", "True",
            "--use_self_distill", "True", "--sentence_pooling_method", "cls", "--normalize_embeddings", "True",
            "--seed", "42", "--use_cpu", "True", "--save_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "True", "--dataloader_num_workers", "0",
        ]
        parser = HfArgumentParser((EncoderOnlyEmbedderM3ModelArguments, EncoderOnlyEmbedderM3DataArguments,
                                   EncoderOnlyEmbedderM3TrainingArguments))
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=flags)
        runner = EncoderOnlyEmbedderM3Runner(model_args=model_args, data_args=data_args,
                                             training_args=training_args)
        runner.trainer.train()  # no save: only the training steps are measured
    return {"implementation": "FlagEmbedding 1.4.2", "batch_size": batch_size, "group_size": group_size,
            "steps": steps, "peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["prepare", "trial"])
    p.add_argument("--dir", default=str(DEFAULT_DIR))
    p.add_argument("--train-data", default=str(WORK_DIR / "cranfield_train.jsonl"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    if args.command == "prepare":
        prepare(Path(args.dir), Path(args.train_data))
    else:
        print(json.dumps(trial(Path(args.dir), args.batch_size, args.steps, args.group_size)))


if __name__ == "__main__":
    main()
