"""``M3Trainer``: a Hugging Face ``Trainer`` for M3 models, whose loss owns the training step.

What the run trains comes from one :class:`~flagm3.recipe.Recipe` (the arguments' ``recipe()`` unless given):
the loss (``loss_class``: the objective, ``batch_loss_class``: the loss of one batch around it,
:class:`flagm3.losses.M3BatchLoss`), the optimizer's parameter groups, and the model's preparation (freezing,
attention; once per model). The trainer feeds the loss length-grouped batches (``batch_sampler_class``,
``collator_class``) and dispatches to it; the rest is callbacks (:mod:`flagm3.callbacks`: non-finite steps,
sparse health, model-card data; :mod:`flagm3.checkpointing`: complete checkpoints). The training step is the
Trainer's own.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer

from .callbacks import (
    LossTermLogs,
    ModelCardCallback,
    ModelCardData,
    NonFiniteLossError,
    NonFiniteStepGuard,
    SparseHealthCallback,
)
from .checkpointing import CheckpointCallback, remove_incomplete_checkpoints, resolve_resume
from .convert_bge_m3 import save_bge_m3
from .data import M3BatchSampler, M3Collator, M3TrainDataset
from .distributed import zero3_enabled
from .losses import M3BatchLoss, M3Loss
from .losses.training import SPARSE_ANCHOR_FILE
from .modeling_m3 import unwrap_m3
from .recipe import Recipe
from .training_args import M3DataArguments, M3TrainingArguments

logger = logging.getLogger(__name__)

__all__ = ["SPARSE_ANCHOR_FILE", "M3Trainer", "NonFiniteLossError", "unwrap_m3"]


def select_by_evaluator(args: Any, evaluator: Any) -> None:
    """``metric_for_best_model`` / ``greater_is_better`` from the evaluator's ``primary_metric`` /
    ``greater_is_better``, unless the arguments name a metric other than the loss (which an evaluator has not)."""
    if getattr(args, "metric_for_best_model", None) in (None, "loss", "eval_loss"):
        args.metric_for_best_model = f"eval_{evaluator.primary_metric}"
        args.greater_is_better = evaluator.greater_is_better


class M3Trainer(Trainer):
    """Trainer for :class:`flagm3.M3Model` on (query, group of passages) batches from ``flagm3.data``.

    ``evaluator``: an object with sentence-transformers' ``SentenceEvaluator`` contract
    (:class:`flagm3.evaluation.M3RetrievalEvaluator`): ``evaluator(model, tokenizer)`` returns metrics named
    after it, ``primary_metric`` and ``greater_is_better`` choose the best checkpoint
    (``metric_for_best_model="eval_<primary_metric>"`` unless the arguments name another metric). No eval
    dataset is needed. Non-finite steps are skipped (:class:`~flagm3.callbacks.NonFiniteStepGuard`).
    """

    loss_class: type[M3Loss] = M3Loss
    batch_loss_class: type[M3BatchLoss] = M3BatchLoss
    collator_class: type[M3Collator] = M3Collator
    batch_sampler_class: type[M3BatchSampler] = M3BatchSampler

    def __init__(
        self,
        model: nn.Module,
        args: M3TrainingArguments,
        data_args: Optional[M3DataArguments] = None,
        loss: Optional[M3Loss] = None,
        evaluator: Any = None,
        recipe: Optional[Recipe] = None,
        **kwargs: Any,
    ) -> None:
        self.data_args = data_args or M3DataArguments()
        tokenizer = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None and tokenizer is not None:
            kwargs["data_collator"] = self.collator_class(
                tokenizer,
                query_max_len=self.data_args.query_max_len,
                passage_max_len=self.data_args.passage_max_len,
                pad_to_multiple_of=self.data_args.pad_to_multiple_of,
            )
        self.recipe = recipe if recipe is not None else Recipe.from_args(args, loss=loss.config if loss else None)
        self.m3_loss = loss if loss is not None else self.loss_class(self.recipe.loss)
        self.training_loss = self.batch_loss_class.from_args(self.m3_loss, args)
        if getattr(args, "sub_batch_size", None) and getattr(args, "deepspeed", None) and zero3_enabled():
            raise ValueError("sub_batch_size (cached gradients) runs under DeepSpeed ZeRO stages 0-2, not ZeRO-3.")
        self.evaluator = evaluator
        if evaluator is not None:
            select_by_evaluator(args, evaluator)
        self.recipe.prepare(model, gradient_checkpointing=bool(getattr(args, "gradient_checkpointing", False)))
        self.term_logs = LossTermLogs()
        self.nonfinite_guard = NonFiniteStepGuard(
            self.term_logs, getattr(args, "max_consecutive_nonfinite_steps", 3), fp16=bool(args.fp16))
        self.model_card_data = ModelCardData()
        callbacks = list(kwargs.pop("callbacks", None) or []) + [
            CheckpointCallback(), self.nonfinite_guard, SparseHealthCallback(),
            ModelCardCallback(self.model_card_data, self.recipe, self.m3_loss)]
        placeholder = evaluator is not None and kwargs.get("eval_dataset") is None
        if placeholder:  # the Trainer refuses an eval strategy without an eval dataset; the evaluator is one
            kwargs["eval_dataset"] = "evaluator"
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        if placeholder:
            self.eval_dataset = None

    def create_optimizer(self, model: Optional[nn.Module] = None):
        """The Trainer's optimizer over the recipe's parameter groups (heads at their own learning rates)."""
        opt_model = self.model if model is None else model
        groups = None if self.optimizer is not None else self.recipe.parameter_groups(
            opt_model, self.args.weight_decay, self.get_decay_parameter_names(opt_model))
        if groups is None:
            super().create_optimizer(*([model] if model is not None else []))
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        if self.is_deepspeed_enabled:
            self.nonfinite_guard.watch_optimizer(self.optimizer, opt_model)
        return self.optimizer

    def get_train_dataloader(self) -> DataLoader:
        """Length-grouped, per-dataset batches from :class:`M3BatchSampler` for an :class:`M3TrainDataset`."""
        dataset = self.train_dataset
        if not isinstance(dataset, M3TrainDataset):
            return super().get_train_dataloader()
        sampler = self.batch_sampler_class(
            dataset,
            batch_size=self.args.train_batch_size,
            num_replicas=self.args.world_size,
            seed=self.args.seed,
            same_dataset_within_batch=self.data_args.same_dataset_within_batch,
            group_by_length=self.data_args.group_by_length,
            drop_last=self.args.dataloader_drop_last,
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    # ------------------------------------------------------------------------------------------ step
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The batch loss (:class:`flagm3.losses.M3BatchLoss`); its terms are kept for the logs."""
        out = self.training_loss(model, inputs, step=self.state.global_step)
        if model.training and torch.is_grad_enabled():
            self.term_logs.add(out.logs, out.stats)
        return (out.loss, out) if return_outputs else out.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step; after the last micro-batch of an optimizer step (before the Trainer clips), the
        non-finite check (not under DeepSpeed, whose engine steps inside backward, nor with fp16's scaler)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        scaler = getattr(self.accelerator, "scaler", None)
        if self.accelerator.sync_gradients and not self.is_deepspeed_enabled and scaler is None:
            self.nonfinite_guard.check_gradients(self.model, self.optimizer)
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the per-term losses, padding fractions and sparse statistics, averaged over the micro-batches since
        the last log and over every process (:class:`~flagm3.callbacks.LossTermLogs`)."""
        if "loss" in logs:
            logs.update(self.term_logs.reduce(self.args.device))
        super().log(logs, *args, **kwargs)

    # -------------------------------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The evaluator's metrics (every head and hybrid), logged as ``eval_<name>``; with an eval dataset and
        no evaluator, the Trainer's own evaluation."""
        if self.evaluator is None:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        metrics = self.evaluator(self.model, self.processing_class)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ------------------------------------------------------------------------------------ checkpoints
    def train(self, resume_from_checkpoint: Any = None, trial: Any = None, **kwargs: Any):
        """The Trainer's training; ``resume_from_checkpoint`` may be ``"last"`` (:meth:`resolve_resume_checkpoint`)."""
        resume_from_checkpoint = self.resolve_resume_checkpoint(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def resolve_resume_checkpoint(self, resume: Any) -> Optional[str]:
        """The complete checkpoint to resume from (:func:`flagm3.checkpointing.resolve_resume`), after which the
        incomplete checkpoints of ``output_dir`` are removed; the loss's state saved with it is restored."""
        path = resolve_resume(resume, self.args.output_dir)
        self.accelerator.wait_for_everyone()
        if self.args.should_save and self.args.output_dir:
            remove_incomplete_checkpoints(self.args.output_dir)
        self.accelerator.wait_for_everyone()  # no process looks for checkpoints while they are being removed
        if path:
            self.training_loss.load_state(path)
        return path

    def write_model_card(self, model_args: Any = None, data_args: Any = None, metrics: Optional[dict] = None) -> str:
        """Write ``README.md`` (base model, data, recipe, loss, metrics, usage) to the output directory."""
        from .model_card import write_model_card

        return write_model_card(self.args.output_dir, trainer=self, model_args=model_args,
                                data_args=data_args or self.data_args, metrics=metrics)

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """The Trainer's save, plus the loss's state and, when asked, the BGE-M3 layout."""
        output_dir = output_dir or self.args.output_dir
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        self.training_loss.save_state(output_dir)
        if self.args.save_bge_m3_layout:
            model = self.accelerator.unwrap_model(self.model)
            if hasattr(model, "merge_and_unload"):
                logger.warning("save_bge_m3_layout: skipped for a LoRA model; merge the adapter first.")
            else:
                save_bge_m3(unwrap_m3(model), f"{output_dir}/bge-m3", self.processing_class, state_dict=state_dict)
