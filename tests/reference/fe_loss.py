"""One training forward of FlagEmbedding 1.4.2's M3 model on a fixed batch: the reference loss for parity tests.

Run with the reference venv's python (`.ci/setup_reference_env.sh` prints it):

    $FE_PY tests/reference/fe_loss.py MODEL_DIR BATCH OUT_JSON [--step N] [--with-grads]
        [--check-determinism] [--no-in-batch-neg] [FlagEmbedding training flags ...]

The FlagEmbedding flags are its own argument dataclasses (EncoderOnlyEmbedderM3ModelArguments,
AbsEmbedderDataArguments, EncoderOnlyEmbedderM3TrainingArguments), parsed by HfArgumentParser exactly as
its runner does, with its defaults: e.g. --train_group_size 4 --query_max_len 64 --passage_max_len 256
--temperature 0.02 --unified_finetuning True --use_self_distill True --self_distill_start_step -1
--normalize_embeddings True --sentence_pooling_method cls --knowledge_distillation True
--kd_loss_type kl_div|m3_kd_loss --pad_to_multiple_of 8 --sub_batch_size 2 --colbert_dim 64
--query_instruction_for_retrieval "..." --query_instruction_format "{}{}".

BATCH is fixed, not sampled:
  *.json:  {"queries": [B str], "passages": [B lists of G str; the first is the positive],
            "teacher_scores": [B lists of G float] (optional)}
  *.jsonl: training lines {"query", "pos", "neg", "pos_scores"?, "neg_scores"?}; each gives the group
           [pos[0]] + neg[:G-1] (and the same picks of the scores), in file order, G = --train_group_size.
G must equal --train_group_size (taken from the batch when the flag is not given).

What is reproduced from FlagEmbedding: the model and heads are built by EncoderOnlyEmbedderM3Runner's own
load_tokenizer_and_model (heads loaded from colbert_linear.pt / sparse_linear.pt, else freshly initialised:
pass --new-heads to allow that), the collator by its load_data_collator (padding=True -> pad to the longest
in the batch, or to a multiple of pad_to_multiple_of; truncation at query_max_len / passage_max_len; the
tokenizer's default special tokens), instructions are applied as AbsEmbedderTrainDataset.__getitem__ does
(query_instruction_format.format(instruction, query), same for passages); shuffle_ratio is not applied.
Teacher scores reach the model only with --knowledge_distillation True (as the dataset does).

Mode: model.train() with every dropout disabled (nn.Dropout.p = 0, the SDPA attention `dropout_prob`
attributes and config *dropout* fields = 0), fp32, CPU. `--check-determinism` runs the forward twice and
reports whether the losses are bit-identical.

Self-distillation: the model counts forwards in `model.step` (starting at 0, +1 after every training
forward, i.e. per micro-batch, not per optimizer step) and adds the self-distillation terms when
`model.step > self_distill_start_step`. `--step N` sets model.step before the forward.

Output JSON: loss; components (dense, sparse, colbert, ensemble losses, self_distill {dense, sparse,
colbert} or null) and recomposed_loss (the reference's formula applied to the components, as a check of the
hooks); scores (dense, sparse, colbert, ensemble matrices as the loss saw them, after / temperature);
tokenized input_ids / attention_mask of queries and passages; step / self_distill_active /
first_self_distill_step; the resolved settings; grads (with --with-grads: per-parameter gradient norms and
the full sparse_linear gradient).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any, Callable

import torch
from fe_common import check_eos, check_model_dir, fail, write_json

HEAD_OF = {
    "compute_dense_score": "dense",
    "compute_sparse_score": "sparse",
    "compute_colbert_score": "colbert",
    "ensemble_score": "ensemble",
}


def parse_cli(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("batch", help="fixed batch: .json (queries/passages/teacher_scores) or .jsonl")
    p.add_argument("out_json")
    p.add_argument("--step", type=int, default=0, help="value of model.step before the forward (default 0)")
    p.add_argument("--with-grads", action="store_true", help="also run backward and report gradients")
    p.add_argument("--check-determinism", action="store_true", help="run the forward twice and compare")
    p.add_argument("--no-in-batch-neg", action="store_true", help="pass no_in_batch_neg_flag=True")
    p.add_argument("--new-heads", action="store_true", help="allow missing colbert/sparse head files")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    return p.parse_known_args(argv)


def load_batch(path: str, group_size: int | None) -> tuple[list[str], list[list[str]], list[list[float]] | None]:
    """Read the fixed batch; returns queries [B], passages [B][G], teacher scores [B][G] or None."""
    if path.endswith(".jsonl"):
        if group_size is None:
            fail(f"{path}: a .jsonl batch needs --train_group_size")
        queries, passages, teachers = [], [], []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                for key in ("query", "pos", "neg"):
                    if key not in row:
                        fail(f"{path}, line {n}: field '{key}' missing")
                if len(row["neg"]) < group_size - 1:
                    fail(f"{path}, line {n}: {len(row['neg'])} negatives < train_group_size - 1 = {group_size - 1}")
                queries.append(row["query"])
                passages.append([row["pos"][0]] + row["neg"][: group_size - 1])
                if "pos_scores" in row and "neg_scores" in row:
                    teachers.append([row["pos_scores"][0]] + row["neg_scores"][: group_size - 1])
        return queries, passages, (teachers if len(teachers) == len(queries) else None)
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    queries, passages = spec.get("queries"), spec.get("passages")
    if not isinstance(queries, list) or not isinstance(passages, list) or len(queries) != len(passages):
        fail(f"{path}: need 'queries' (list of B str) and 'passages' (list of B lists), same length")
    sizes = {len(g) for g in passages}
    if len(sizes) != 1:
        fail(f"{path}: every query needs the same number of passages, got sizes {sorted(sizes)}")
    teachers = spec.get("teacher_scores")
    if teachers is not None and [len(t) for t in teachers] != [len(g) for g in passages]:
        fail(f"{path}: 'teacher_scores' must have the shape of 'passages'")
    return queries, passages, teachers


def parse_reference_args(rest: list[str], model_dir: str, batch: str, group_size: int, out_dir: str) -> tuple:
    """Parse FlagEmbedding's own argument dataclasses, with the model dir / batch / group size filled in."""
    from FlagEmbedding.abc.finetune.embedder import AbsEmbedderDataArguments
    from FlagEmbedding.finetune.embedder.encoder_only.m3 import (
        EncoderOnlyEmbedderM3ModelArguments,
        EncoderOnlyEmbedderM3TrainingArguments,
    )
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        (EncoderOnlyEmbedderM3ModelArguments, AbsEmbedderDataArguments, EncoderOnlyEmbedderM3TrainingArguments)
    )
    fixed = ["--model_name_or_path", model_dir, "--train_data", batch, "--output_dir", out_dir]
    fixed += ["--report_to", "none", "--use_cpu", "True"]
    if "--train_group_size" not in rest:
        fixed += ["--train_group_size", str(group_size)]
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=fixed + rest)
    return model_args, data_args, training_args


def disable_dropout(module: torch.nn.Module) -> int:
    """Set every dropout probability in `module` to 0 (modules, SDPA attributes, config). Returns the count."""
    count = 0
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
            count += 1
        for attr in ("dropout_prob", "attention_dropout", "dropout_p"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
                count += 1
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for key, value in config.to_dict().items():
                if "dropout" in key and isinstance(value, float):
                    setattr(config, key, 0.0)
    return count


class Recorder:
    """Wraps the model's score and loss functions (instance attributes) to record what forward computes."""

    def __init__(self, model: Any):
        self.losses: dict[str, float] = {}
        self.scores: dict[str, torch.Tensor] = {}
        self.self_distill: list[float] = []
        self._inside_loss_func = False
        for name in HEAD_OF:
            setattr(model, name, self._wrap_score(name, getattr(model, name)))
        for name in ("_compute_in_batch_neg_loss", "_compute_no_in_batch_neg_loss"):
            setattr(model, name, self._wrap_loss_func(getattr(model, name)))
        self._distill = model.distill_loss
        model.distill_loss = self._wrap_distill(model.distill_loss)

    def reset(self) -> None:
        self.losses, self.scores, self.self_distill = {}, {}, []

    def _wrap_score(self, name: str, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            return fn(*args, **kwargs)

        wrapped.head = HEAD_OF[name]  # type: ignore[attr-defined]
        return wrapped

    def _wrap_loss_func(self, fn: Callable) -> Callable:
        def wrapped(q_reps, p_reps, teacher_targets=None, compute_score_func=None, **kwargs):
            self._inside_loss_func = True
            try:
                scores, loss = fn(q_reps, p_reps, teacher_targets=teacher_targets,
                                  compute_score_func=compute_score_func, **kwargs)
            finally:
                self._inside_loss_func = False
            head = getattr(compute_score_func, "head", "unknown")
            self.losses[head] = float(loss.detach())
            self.scores[head] = scores.detach().clone()
            return scores, loss

        return wrapped

    def _wrap_distill(self, fn: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            loss = fn(*args, **kwargs)
            if not self._inside_loss_func:  # the self-distillation terms, in order dense, sparse, colbert
                self.self_distill.append(float(loss.detach()))
            return loss

        return wrapped

    def components(self) -> dict:
        sd = None
        if self.self_distill:
            if len(self.self_distill) != 3:
                fail(f"expected 3 self-distillation terms, recorded {len(self.self_distill)}")
            sd = dict(zip(("dense", "sparse", "colbert"), self.self_distill))
        return {**self.losses, "self_distill": sd}


def recompose(c: dict, unified: bool) -> float:
    """The reference's loss formula (EncoderOnlyEmbedderM3Model.forward) applied to recorded components."""
    if not unified:
        return c["dense"]
    loss = (c["dense"] + c["ensemble"] + 0.1 * c["sparse"] + c["colbert"]) / 4
    if c["self_distill"] is not None:
        sd = c["self_distill"]
        loss = (loss + (sd["dense"] + 0.1 * sd["sparse"] + sd["colbert"]) / 3) / 2
    return loss


def tokenized(collated: Any) -> dict:
    """input_ids / attention_mask as lists (a list of sub-batches when sub_batch_size is set)."""
    if isinstance(collated, list):
        return {"sub_batches": [tokenized(c) for c in collated]}
    return {k: collated[k].tolist() for k in ("input_ids", "attention_mask") if k in collated}


def main() -> None:
    cli, rest = parse_cli(sys.argv[1:])
    if cli.threads > 0:
        torch.set_num_threads(cli.threads)
    check_model_dir(cli.model_dir, require_heads=not cli.new_heads)
    group_flag = None
    if "--train_group_size" in rest:
        group_flag = int(rest[rest.index("--train_group_size") + 1])
    queries, passages, teachers = load_batch(cli.batch, group_flag)
    group_size = len(passages[0])
    if group_flag is not None and group_flag != group_size:
        fail(f"{cli.batch}: groups have {group_size} passages but --train_group_size is {group_flag}")

    from FlagEmbedding.finetune.embedder.encoder_only.m3 import EncoderOnlyEmbedderM3Runner

    with tempfile.TemporaryDirectory() as out_dir:
        model_args, data_args, training_args = parse_reference_args(
            rest, cli.model_dir, cli.batch, group_size, out_dir
        )
    if training_args.negatives_cross_device:
        fail("--negatives_cross_device needs torch.distributed: not supported by this single-process script")
    if data_args.knowledge_distillation and teachers is None:
        fail(f"{cli.batch}: --knowledge_distillation True needs teacher scores in the batch")

    torch.manual_seed(training_args.seed)
    # The runner's own loaders, without its __init__ (which would also build a dataset and a Trainer).
    runner = EncoderOnlyEmbedderM3Runner.__new__(EncoderOnlyEmbedderM3Runner)
    runner.model_args, runner.data_args, runner.training_args = model_args, data_args, training_args
    tokenizer, model = runner.load_tokenizer_and_model()
    check_eos(tokenizer, cli.model_dir)
    runner.tokenizer = tokenizer
    collator = runner.load_data_collator()

    features = []
    for i, (query, group) in enumerate(zip(queries, passages)):
        if data_args.query_instruction_for_retrieval is not None:
            query = data_args.query_instruction_format.format(data_args.query_instruction_for_retrieval, query)
        if data_args.passage_instruction_for_retrieval is not None:
            group = [data_args.passage_instruction_format.format(data_args.passage_instruction_for_retrieval, p)
                     for p in group]
        teacher = list(map(float, teachers[i])) if (data_args.knowledge_distillation and teachers) else None
        features.append((query, list(group), teacher))
    batch = collator(features)
    batch["no_in_batch_neg_flag"] = cli.no_in_batch_neg

    model.float()
    model.train()
    n_dropout = disable_dropout(model)
    recorder = Recorder(model)

    def forward() -> torch.Tensor:
        model.step = cli.step
        recorder.reset()
        return model(**batch).loss

    deterministic = None
    if cli.check_determinism:
        with torch.no_grad():
            first = forward().item()
    loss = forward()
    if cli.check_determinism:
        deterministic = first == loss.item()
    active = bool(training_args.unified_finetuning and training_args.use_self_distill
                  and cli.step > training_args.self_distill_start_step)
    components = recorder.components()

    grads = None
    if cli.with_grads:
        loss.backward()
        grads = {
            "norms": {n: float(p.grad.norm()) for n, p in model.named_parameters() if p.grad is not None},
        }
        if model.sparse_linear is not None:
            grads["sparse_linear.weight"] = model.sparse_linear.weight.grad
            grads["sparse_linear.bias"] = model.sparse_linear.bias.grad

    first_sd = training_args.self_distill_start_step + 1
    print(
        f"loss {loss.item():.8f}; self-distillation counts forwards in model.step (0-based) and is active when "
        f"model.step > self_distill_start_step = {training_args.self_distill_start_step}, i.e. from "
        f"model.step = {max(first_sd, 0)}; this forward ran at model.step = {cli.step}: "
        f"{'active' if active else 'inactive'}"
    )
    result = {
        "loss": loss.item(),
        "components": components,
        "recomposed_loss": recompose(components, training_args.unified_finetuning),
        "scores": recorder.scores,
        "tokenized": {"queries": tokenized(batch["queries"]), "passages": tokenized(batch["passages"])},
        "texts": {"queries": [f[0] for f in features], "passages": [f[1] for f in features]},
        "teacher_scores": [f[2] for f in features] if features[0][2] is not None else None,
        "step": cli.step,
        "self_distill_active": active,
        "first_self_distill_step": max(first_sd, 0),
        "dropout_disabled": n_dropout,
        "deterministic": deterministic,
        "grads": grads,
        "settings": {
            "model_dir": os.path.abspath(cli.model_dir),
            "batch_size": len(queries),
            "train_group_size": data_args.train_group_size,
            "query_max_len": data_args.query_max_len,
            "passage_max_len": data_args.passage_max_len,
            "pad_to_multiple_of": data_args.pad_to_multiple_of,
            "query_instruction_for_retrieval": data_args.query_instruction_for_retrieval,
            "query_instruction_format": data_args.query_instruction_format,
            "passage_instruction_for_retrieval": data_args.passage_instruction_for_retrieval,
            "passage_instruction_format": data_args.passage_instruction_format,
            "knowledge_distillation": data_args.knowledge_distillation,
            "temperature": training_args.temperature,
            "unified_finetuning": training_args.unified_finetuning,
            "use_self_distill": training_args.use_self_distill,
            "self_distill_start_step": training_args.self_distill_start_step,
            "normalize_embeddings": training_args.normalize_embeddings,
            "sentence_pooling_method": training_args.sentence_pooling_method,
            "kd_loss_type": training_args.kd_loss_type,
            "sub_batch_size": training_args.sub_batch_size,
            "colbert_dim": model_args.colbert_dim,
            "no_in_batch_neg_flag": cli.no_in_batch_neg,
            "eos_token": tokenizer.eos_token,
            "padding_side": tokenizer.padding_side,
        },
    }
    write_json(cli.out_json, result)
    print(f"wrote {cli.out_json}")


if __name__ == "__main__":
    main()
