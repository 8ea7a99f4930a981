"""``flagm3 train`` / ``python -m flagm3.train``: fine-tune an M3 model from the command line.

Arguments are FlagEmbedding's M3 names plus flagm3's (see :mod:`flagm3.training_args`); a single ``.json`` or
``.yaml`` argument is read as a file of arguments. Works under ``torchrun`` and ``deepspeed`` launchers.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import nullcontext
from typing import Callable, Optional, Sequence, Union

from transformers import AutoTokenizer, set_seed

from .arguments import parse_train_args
from .convert_bge_m3 import checkpoint_layout, resolve_checkpoint
from .data import DataValidationError, M3TrainDataset
from .distributed import (
    check_deepspeed_config,
    full_weights_on_load,
    keep_used_weight_conversions,
    setup_process_group,
    shutdown_process_group,
    zero3_enabled,
)
from .errors import check_model, user_errors
from .modeling_m3 import M3Model, check_tokenizer_fits
from .resume import (
    GracefulStop,
    check_checkpoint_fits,
    lost_process_message,
    resolve_last,
    save_failure_message,
    stop_message,
)
from .sparse_init import fit_sparse_head_once
from .trainer import M3Trainer
from .training_args import M3DataArguments, M3ModelArguments, M3TrainingArguments

logger = logging.getLogger("flagm3.train")


def parse_args(argv: Optional[Sequence[str]] = None):
    """``(model_args, data_args, training_args)`` from a command line or one ``.json``/``.yaml`` file;
    FlagEmbedding's arguments that transformers 5 dropped are mapped or noted (:mod:`flagm3.arguments`)."""
    return parse_train_args(argv)


def load_model(
    model_args: M3ModelArguments,
    training_args: M3TrainingArguments,
    tokenizer,
    corpus: Union[Sequence[str], Callable[[], Sequence[str]], None] = None,
    corpus_max_length: int = 256,
    corpus_key: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> M3Model:
    """An M3Model from a flagm3 checkpoint, a BGE-M3-layout directory, or a plain encoder (fresh heads).

    A fresh sparse head is fitted to the IDF of ``corpus`` (the training passages, or a callable giving them) when
    ``sparse_init`` asks: once, by rank 0 on the training device, then broadcast (:func:`fit_sparse_head_once`).
    With ``corpus_key`` (what the corpus depends on) and ``cache_dir``, the fitted head is cached there
    (:mod:`flagm3.sparse_head_cache`): a second run on the same model, tokenizer, data and options skips the fit.
    """
    hub = {"cache_dir": model_args.cache_dir, "token": model_args.token}
    path = resolve_checkpoint(model_args.model_name_or_path, dict(hub))
    encoder_kwargs = {"trust_remote_code": model_args.trust_remote_code}
    if model_args.attn_implementation:
        encoder_kwargs["attn_implementation"] = model_args.attn_implementation
    layout = checkpoint_layout(path)
    # Under ZeRO-3 a flagm3 checkpoint loads partitioned; models assembled from an encoder load whole and are
    # partitioned when DeepSpeed starts.
    with full_weights_on_load(training_args) if layout != "flagm3" else nullcontext():
        model = _load_layout(path, layout, model_args, training_args, tokenizer, encoder_kwargs)
    keep_used_weight_conversions(model)
    check_tokenizer_fits(model, tokenizer, path)  # before training, not when a high id first appears
    _check_colbert_dim(model, model_args, layout, path)
    if corpus is not None and training_args.recipe(model_args.sparse_init).fits_sparse_idf(layout):
        # on the device training uses (under ZeRO-3 the model stays where it loaded until DeepSpeed places it)
        device = None if zero3_enabled() else training_args.device
        cache = _sparse_head_cache(path, model, tokenizer, corpus_key, cache_dir, corpus_max_length, device)
        fit_sparse_head_once(model, tokenizer, corpus, device, max_length=corpus_max_length, cache=cache)
    # the checkpoint's own pooling and normalisation, unless given explicitly
    if training_args.sentence_pooling_method is not None:
        model.config.pooling = training_args.sentence_pooling_method
    if training_args.normalize_embeddings is not None:
        model.config.normalize_embeddings = training_args.normalize_embeddings
    if model_args.use_lora:
        model = add_lora(model, model_args)
    return model


def _sparse_head_cache(path, model, tokenizer, corpus_key, cache_dir, max_length, device):
    """The cache entry of this IDF fit, or ``None`` (no data fingerprint, no cache directory, not a local model)."""
    if corpus_key is None or cache_dir is None:
        return None
    from .sparse_head_cache import SparseHeadCache, fit_options, head_cache_key

    key = head_cache_key(path, model, tokenizer, corpus_key, fit_options(max_length=max_length), device)
    return SparseHeadCache(cache_dir, key) if key is not None else None


def _check_colbert_dim(model: M3Model, model_args: M3ModelArguments, layout: str, path: str) -> None:
    """A checkpoint's ColBERT head keeps its size; an explicit ``--colbert_dim`` that disagrees is an error."""
    if model_args.colbert_dim is None or layout == "encoder":
        return
    config = model.config
    wanted = model_args.colbert_dim if model_args.colbert_dim > 0 else config.encoder_hidden_size
    if wanted != config.colbert_output_dim:
        raise ValueError(f"--colbert_dim {model_args.colbert_dim}: {path} has a trained ColBERT head of size "
                         f"{config.colbert_output_dim}; drop the flag to keep it, or start from a plain encoder.")


def _load_layout(path: str, layout: str, model_args, training_args, tokenizer, encoder_kwargs: dict) -> M3Model:
    if layout == "encoder":
        logger.info("%s is a plain encoder: starting with fresh sparse and ColBERT heads", path)
        return M3Model.from_encoder(
            path,
            tokenizer=tokenizer,
            colbert_dim=-1 if model_args.colbert_dim is None else model_args.colbert_dim,
            pooling=training_args.sentence_pooling_method or "cls",
            normalize_embeddings=training_args.normalize_embeddings is not False,
            **encoder_kwargs,
        )
    if layout == "bge-m3":
        return M3Model.from_bge_m3(path, tokenizer=tokenizer, **encoder_kwargs)
    kwargs = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    return M3Model.from_pretrained(path, **kwargs)


def add_lora(model: M3Model, model_args: M3ModelArguments):
    """LoRA adapters on the encoder's Linear layers; the heads are trained fully and saved beside the adapter."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=model_args.lora_rank,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        modules_to_save=["sparse_linear", "colbert_linear"],
    )
    return get_peft_model(model, config)


def build_dataset(data_args: M3DataArguments, training_args: M3TrainingArguments, tokenizer) -> M3TrainDataset:
    if not data_args.train_data:
        raise ValueError("--train_data is required: JSONL files or directories of them.")
    return M3TrainDataset(
        data_args.train_data,
        train_group_size=data_args.train_group_size,
        query_instruction_for_retrieval=data_args.query_instruction_for_retrieval,
        query_instruction_format=data_args.query_instruction_format,
        passage_instruction_for_retrieval=data_args.passage_instruction_for_retrieval,
        passage_instruction_format=data_args.passage_instruction_format,
        knowledge_distillation=data_args.knowledge_distillation,
        max_example_num_per_dataset=data_args.max_example_num_per_dataset,
        sample_negatives_from_corpus=data_args.sample_negatives_from_corpus,
        seed=training_args.seed,
        tokenizer=tokenizer,
        query_max_len=data_args.query_max_len,
        passage_max_len=data_args.passage_max_len,
        cache_dir=data_args.cache_path,
    )


def build_evaluator(data_args: M3DataArguments, training_args: M3TrainingArguments, heads):
    if not data_args.eval_data:
        return None
    from .evaluation import M3RetrievalEvaluator

    return M3RetrievalEvaluator.from_beir(
        data_args.eval_data,
        split=data_args.eval_split,
        heads=heads,
        max_query_length=data_args.query_max_len,
        max_passage_length=data_args.eval_max_length,
        max_corpus_size=data_args.eval_max_corpus_size,
        batch_size=training_args.per_device_eval_batch_size * 4,
    )


def build_trainer(model_args, data_args, training_args) -> M3Trainer:
    """Everything ``flagm3 train`` assembles, for use from Python too."""
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or resolve_checkpoint(model_args.model_name_or_path, {}),
        trust_remote_code=model_args.trust_remote_code,
        cache_dir=model_args.cache_dir,
        token=model_args.token,
        use_fast=model_args.use_fast_tokenizer,
    )
    check_deepspeed_config(training_args)  # (the recipe warning comes from the command line: flagm3.arguments)
    setup_process_group(training_args)  # before loading: ZeRO-3 partitions the model while it loads
    set_seed(training_args.seed)
    dataset = build_dataset(data_args, training_args, tokenizer)
    # a resumed run's sparse head comes from its checkpoint: no refit
    corpus = None if training_args.resume_from_checkpoint else dataset.idf_corpus
    if corpus is None:
        logger.info("resuming from a checkpoint: the sparse head is loaded from it, not fitted again")
    model = load_model(model_args, training_args, tokenizer, corpus=corpus, corpus_max_length=data_args.passage_max_len,
                       corpus_key=dataset.idf_corpus_key(), cache_dir=os.path.dirname(dataset.prepared_dir))
    recipe = training_args.recipe(model_args.sparse_init)
    evaluator = build_evaluator(data_args, training_args, recipe.loss.heads)
    return M3Trainer(  # prepares the model with the recipe
        model=model,
        args=training_args,
        data_args=data_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        evaluator=evaluator,
        recipe=recipe,
    )


def main(argv: Optional[Sequence[str]] = None) -> M3Trainer:
    """``flagm3 train``: a user's mistake (bad argument, missing model, invalid data) ends in a message and a
    non-zero exit code, not a traceback."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, training_args = parse_args(argv)
    with user_errors("flagm3 train", {"--model_name_or_path": model_args.model_name_or_path,
                                      "--tokenizer_name": model_args.tokenizer_name}):
        check_model(model_args.model_name_or_path, "--model_name_or_path")
        check_model(model_args.tokenizer_name, "--tokenizer_name")
        complete = resolve_last(training_args)  # "last": a path, a fresh start, or a finished run
        if complete is not None:
            print(f"flagm3 train: {complete.message()}", file=sys.stderr)
            return None
        try:
            trainer = build_trainer(model_args, data_args, training_args)
        except DataValidationError as err:  # found before the model loads: every problem, one per line
            sys.exit(f"flagm3 train: {err}\nNothing was trained; `flagm3 validate DATA` prints a full summary.")
        check_checkpoint_fits(trainer.model, training_args.resume_from_checkpoint, model_args.model_name_or_path)
    stop = GracefulStop()
    trainer.add_callback(stop)
    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except (OSError, RuntimeError) as err:  # a full disk during a save; another process lost (killed, OOM)
        if isinstance(err, OSError):
            message = save_failure_message(err, training_args.output_dir)
        else:
            message = lost_process_message(err, training_args.output_dir, trainer.state.global_step)
        if message is None or os.environ.get("FLAGM3_TRACEBACK"):
            raise
        sys.exit(f"flagm3 train: {message}")
    if stop.signum is not None:  # a checkpoint was saved at the step boundary: no final model, no card
        if trainer.is_world_process_zero():
            print(f"flagm3 train: {stop_message(stop, training_args.output_dir)}", file=sys.stderr)
        shutdown_process_group()
        sys.exit(128 + stop.signum)
    trainer.save_model()
    trainer.save_state()
    if trainer.is_world_process_zero():
        trainer.write_model_card(model_args, data_args)
    shutdown_process_group()
    return trainer


if __name__ == "__main__":
    main()
