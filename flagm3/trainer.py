"""``M3Trainer``: a Hugging Face ``Trainer`` for M3 models, whose loss owns the training step.

The trainer builds the loss from its arguments (``loss_class``: the objective, ``training_loss_class``: the
batch loss around it, :class:`flagm3.losses.M3TrainingLoss`), feeds it length-grouped batches
(``batch_sampler_class``, ``collator_class``), builds the optimizer (heads at their own learning rate),
skips optimizer steps with non-finite gradients, logs the loss terms, and saves (also in the BGE-M3 layout).
The forward work, cached gradients (``sub_batch_size``) included, is the loss's: the training step is the
Trainer's own. The model is prepared with :func:`flagm3.recipe.prepare_for_training` (freezing, attention).
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import Trainer

from .checkpointing import AtomicCheckpointMixin
from .convert_bge_m3 import save_bge_m3
from .data import M3BatchSampler, M3Collator, M3TrainDataset
from .distributed import world, zero3_enabled
from .losses import M3Loss, M3TrainingLoss
from .losses.objective import RECIPE_SPARSE_LEARNING_RATE
from .modeling_m3 import unwrap_m3
from .recipe import prepare_for_training
from .training_args import M3DataArguments, M3TrainingArguments

SPARSE_ANCHOR_FILE = "sparse_anchor.safetensors"  # the sparse anchor's reference, in checkpoints (when on)

logger = logging.getLogger(__name__)

HEAD_MODULES = ("sparse_linear", "colbert_linear")

__all__ = ["M3Trainer", "NonFiniteLossError", "unwrap_m3"]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive training steps had a non-finite loss or gradient."""


def _largest_magnitude(tensors: list[Tensor]) -> Tensor:
    """``max |t|`` over all ``tensors`` in fused kernels per device and dtype (NaN if any entry is NaN)."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(tensors, norm_type=math.inf)
    return torch.stack([t.detach().abs().max().float() for t in tensors]).max()


class M3Trainer(AtomicCheckpointMixin, Trainer):
    """Trainer for :class:`flagm3.M3Model` on (query, group of passages) batches from ``flagm3.data``.

    Non-finite steps: after the last micro-batch of each optimizer step one fused check (the largest gradient
    magnitude, one host read)
    tests every gradient; a step with a non-finite one is skipped (gradients dropped, the optimizer and the
    learning-rate schedule untouched), and ``max_consecutive_nonfinite_steps`` in a row stop training. Under
    DeepSpeed, whose gradients live in partitions, a micro-batch with a non-finite loss is back-propagated as
    zero gradients instead (one all-reduced flag), so DeepSpeed's own step bookkeeping runs as usual. With fp16 loss
    scaling the GradScaler skips such steps itself. Checkpoints are written atomically
    (:mod:`flagm3.checkpointing`).
    """

    loss_class: type[M3Loss] = M3Loss
    training_loss_class: type[M3TrainingLoss] = M3TrainingLoss
    collator_class: type[M3Collator] = M3Collator
    batch_sampler_class: type[M3BatchSampler] = M3BatchSampler

    def __init__(
        self,
        model: nn.Module,
        args: M3TrainingArguments,
        data_args: Optional[M3DataArguments] = None,
        loss: Optional[M3Loss] = None,
        evaluator: Optional[Callable[[nn.Module, Any], dict]] = None,
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
        self.m3_loss = loss if loss is not None else self.loss_class(args.loss_config())
        self.training_loss = self.training_loss_class.from_args(self.m3_loss, args)
        if getattr(args, "sub_batch_size", None) and getattr(args, "deepspeed", None) and zero3_enabled():
            raise ValueError("sub_batch_size (cached gradients) runs under DeepSpeed ZeRO stages 0-2, not ZeRO-3.")
        self.evaluator = evaluator
        self._log_sums: dict[str, Any] = defaultdict(float)  # tensors (losses) and host floats (padding)
        self._log_count: Any = 0  # micro-batches with a finite loss (a tensor once counting starts)
        self._host_count = 0  # micro-batches recorded
        self._step_logs: list[dict[str, Any]] = []  # this optimizer step's micro-batches, read only when it fails
        self._last_logs: dict[str, Any] = {}
        self._bad_steps = 0
        self._skipped_step: Optional[int] = None  # the last step (1-based) marked as skipped
        self._sparse_start: Optional[dict[str, float]] = None  # the first logged sparse health
        self._sparse_warned = False
        if hasattr(args, "loss_config"):
            prepare_for_training(model, args, self.m3_loss.config)
        super().__init__(model=model, args=args, **kwargs)

    def create_optimizer(self, model: Optional[nn.Module] = None):
        """AdamW as the Trainer builds it, with the heads at ``head_learning_rate`` when given."""
        head_lr = getattr(self.args, "head_learning_rate", None)
        sparse_lr = getattr(self.args, "sparse_learning_rate", None)
        if sparse_lr is None and head_lr is None and getattr(self.args, "loss_preset", None) == "flagm3":
            sparse_lr = RECIPE_SPARSE_LEARNING_RATE
        if (head_lr is None and sparse_lr is None) or self.optimizer is not None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[Optional[float], bool], list] = defaultdict(list)
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                lr = None  # the encoder's
                if "sparse_linear." in name:
                    lr = sparse_lr if sparse_lr is not None else head_lr
                elif any(f"{h}." in name for h in HEAD_MODULES):
                    lr = head_lr
                groups[(lr, name in decay)].append(param)
        param_groups = [
            {
                "params": params,
                "weight_decay": self.args.weight_decay if with_decay else 0.0,
                **({"lr": lr} if lr is not None else {}),
            }
            for (lr, with_decay), params in groups.items()
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def get_train_dataloader(self) -> DataLoader:
        """Length-grouped, per-dataset batches from :class:`M3BatchSampler` for an :class:`M3TrainDataset`."""
        dataset = self.train_dataset
        if not isinstance(dataset, M3TrainDataset):
            return super().get_train_dataloader()
        sampler = self.batch_sampler_class(
            dataset,
            batch_size=self._train_batch_size,
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

    # ------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The batch loss (:class:`flagm3.losses.M3TrainingLoss`); its terms are kept for the logs."""
        out = self.training_loss(model, inputs, step=self.state.global_step)
        loss = out.loss
        if model.training and torch.is_grad_enabled():
            self._record(out.logs, out.stats)
            if self.is_deepspeed_enabled and not self._finite_on_every_rank(loss):
                self._skip_step(*self._nonfinite_loss())
                self._step_logs.clear()
                # a zero gradient for every trained parameter: DeepSpeed reduces and steps as usual
                loss = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
        return (loss, out) if return_outputs else loss

    # -------------------------------------------------------------------------------- non-finite
    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step; after the last micro-batch of an optimizer step, :meth:`_guard_gradients` (before
        the Trainer clips them, so a non-finite gradient is still found where it arose)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            self._guard_gradients()
        return loss

    def _finite_on_every_rank(self, value: Tensor) -> bool:
        """True only if ``value`` is finite on every process (one all-reduce, one host read)."""
        bad = (~torch.isfinite(value.detach())).any().float().reshape(1)
        if world()[1] > 1:
            torch.distributed.all_reduce(bad)
        return bad.item() == 0

    def _guard_gradients(self) -> None:
        """Skip this optimizer step if any gradient is non-finite (one fused max-norm, one host read). Gradients are
        the same on every process after DDP's all-reduce, so every process decides alike."""
        step_logs, self._step_logs = self._step_logs, []
        if self.is_deepspeed_enabled or self._loss_scaler() is not None:
            return  # DeepSpeed: partitioned gradients (guarded per micro-batch); fp16: the GradScaler skips
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        finite = not grads or bool(torch.isfinite(_largest_magnitude(grads)))
        if not finite:
            what, terms = self._nonfinite_loss(step_logs)
            self._skip_step(what or self._nonfinite_gradient_description(), terms)
            self.model.zero_grad(set_to_none=True)  # the optimizer leaves parameters without gradients alone
        if hasattr(self.optimizer, "_is_overflow"):  # accelerate's step_was_skipped: no scheduler step either
            self.optimizer._is_overflow = not finite

    def _nonfinite_loss(self, step_logs: Optional[list] = None) -> tuple[str, list[str]]:
        """(``loss nan``, its non-finite terms) for the first micro-batch of this step with a non-finite loss;
        ``("", [])`` when every loss was finite."""
        for logs in self._step_logs if step_logs is None else step_logs:
            values = {k: float(v) for k, v in logs.items()}
            if not math.isfinite(values.get("loss", 0.0)):
                return f"loss {values['loss']}", [k for k, v in values.items() if not math.isfinite(v) and k != "loss"]
        return "", []

    def _nonfinite_gradient_description(self) -> str:
        bad = [n for n, p in unwrap_m3(self.model).named_parameters()
               if p.grad is not None and not torch.isfinite(p.grad).all()]
        bad.sort(key=lambda n: not n.startswith(HEAD_MODULES))  # the heads first: nearest to the loss
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return f"gradient of {', '.join(bad[:3]) or 'a parameter'}{more}"

    def _skip_step(self, what: str, terms: Optional[list[str]] = None) -> None:
        """Mark the current optimizer step as skipped, warn, and stop after too many consecutive ones."""
        step = self.state.global_step + 1  # the step being computed, numbered as the logs number it
        if self._skipped_step != step:
            consecutive = self._skipped_step is not None and self._skipped_step == step - 1
            self._bad_steps = self._bad_steps + 1 if consecutive else 1
            self._skipped_step = step
        logger.warning("step %d: non-finite %s%s; step skipped (%d in a row)", step, what,
                       f" (terms: {', '.join(terms)})" if terms else "", self._bad_steps)
        if self._bad_steps >= self.args.max_consecutive_nonfinite_steps:
            last = {k: float(v) for k, v in self._last_logs.items() if k.startswith(("loss", "self_distill"))}
            raise NonFiniteLossError(
                f"{self._bad_steps} consecutive steps with a non-finite {what} at step {step}; "
                f"last per-term losses: {last}. Lower the learning rate, check the data, or use bf16."
            )

    def _loss_scaler(self):
        return getattr(self.accelerator, "scaler", None)

    # ---------------------------------------------------------------------------------- logging
    def _record(self, logs: dict[str, Any], stats: Optional[dict[str, Tensor]] = None) -> None:
        """Add one micro-batch's terms and statistics (``sparse_health``) to the sums logged next (device
        tensors: no host read here); a micro-batch with a non-finite loss adds nothing but its padding."""
        self._last_logs = logs
        self._step_logs.append(logs)
        stats = dict(stats or {})
        for side in ("query", "passage"):  # a ratio (weight per active token): summed times its denominator
            if f"sparse_weight_{side}" in stats and f"sparse_active_{side}" in stats:
                stats[f"sparse_weight_{side}"] = stats[f"sparse_weight_{side}"] * stats[f"sparse_active_{side}"]
        finite = torch.isfinite(logs["loss"])
        for key, value in {**logs, **(stats or {})}.items():
            if key == "loss":
                continue
            if torch.is_tensor(value):  # a loss term: counted only with a finite loss
                self._log_sums[key] = self._log_sums[key] + torch.where(finite, value, torch.zeros_like(value))
            else:  # a host float (padding): counted always
                self._log_sums[key] += value
        self._log_count = self._log_count + finite.to(torch.float32)
        self._host_count += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the per-term losses and the padding fractions, averaged over the micro-batches since the last
        log and over every process (the one place they are read back to the host)."""
        if "loss" in logs and self._log_sums:
            keys = sorted(self._log_sums)
            device = self.args.device
            values = torch.stack([torch.as_tensor(self._log_sums[k], dtype=torch.float32, device=device)
                                  for k in keys] + [torch.as_tensor(self._log_count, dtype=torch.float32,
                                                                    device=device)])
            if world()[1] > 1:
                torch.distributed.all_reduce(values)
            values = values.tolist()
            count, host_count = values[-1], self._host_count * world()[1]
            for key, value in zip(keys, values):
                n = host_count if not torch.is_tensor(self._log_sums[key]) else count
                if n:
                    logs[key] = round(value / n, 6)
            raw = dict(zip(keys, values))
            for side in ("query", "passage"):  # over every active token of every micro-batch and process
                if raw.get(f"sparse_active_{side}") and f"sparse_weight_{side}" in raw:
                    logs[f"sparse_weight_{side}"] = round(raw[f"sparse_weight_{side}"] / raw[f"sparse_active_{side}"], 6)
            self._log_sums.clear()
            self._log_count = 0
            self._host_count = 0
            self._check_sparse_health(logs)
        super().log(logs, *args, **kwargs)

    def _check_sparse_health(self, logs: dict[str, float]) -> None:
        """One WARNING when more than 5% of the passages have all-zero lexical vectors, or when the active tokens
        per passage or query fall below half of their first logged value."""
        if "sparse_active_passage" not in logs:
            return
        if self._sparse_start is None:
            self._sparse_start = {k: v for k, v in logs.items() if k.startswith("sparse_")}
        if self._sparse_warned:
            return
        start = self._sparse_start
        halved = [side for side in ("passage", "query")
                  if logs[f"sparse_active_{side}"] < 0.5 * start[f"sparse_active_{side}"]]
        if logs["sparse_zero_passage"] > 0.05 or halved:
            self._sparse_warned = True
            logger.warning(
                "sparse head collapsing at step %d: %.1f%% of passages have all-zero lexical weights, active tokens "
                "per passage %.1f (%.1f at the start), per query %.1f (%.1f at the start); see "
                "docs/heads-and-loss.md, 'Training the sparse head'",
                self.state.global_step, 100 * logs["sparse_zero_passage"], logs["sparse_active_passage"],
                start["sparse_active_passage"], logs["sparse_active_query"], start["sparse_active_query"],
            )


    # ------------------------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Retrieval metrics from the evaluator (every head and hybrid), logged as ``eval_<head>_<metric>``."""
        if self.evaluator is None:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        metrics = self.evaluator(self.model, self.processing_class)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # -------------------------------------------------------------------------------------- save
    def write_model_card(self, model_args: Any = None, data_args: Any = None, metrics: Optional[dict] = None) -> str:
        """Write ``README.md`` (base model, data, arguments, loss, metrics, usage) to the output directory."""
        from .model_card import write_model_card

        return write_model_card(
            self.args.output_dir,
            trainer=self,
            model_args=model_args,
            data_args=data_args or self.data_args,
            metrics=metrics,
        )

    def resolve_resume_checkpoint(self, resume: Any) -> Optional[str]:
        """The checkpoint to resume from (:class:`AtomicCheckpointMixin`); its sparse-anchor reference
        (``sparse_anchor.safetensors``) is restored, so a resumed run anchors the sparse head where the
        interrupted one did."""
        path = super().resolve_resume_checkpoint(resume)
        anchor_file = os.path.join(path, SPARSE_ANCHOR_FILE) if path else None
        if anchor_file and os.path.isfile(anchor_file) and self.m3_loss.config.sparse_anchor_weight > 0:
            self.training_loss.load_sparse_anchor_reference(load_file(anchor_file))
        return path

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        output_dir = output_dir or self.args.output_dir
        super()._save(output_dir, state_dict=state_dict)
        reference = self.training_loss.sparse_anchor_reference()
        if reference is not None and self.args.should_save:
            save_file(reference, os.path.join(output_dir, SPARSE_ANCHOR_FILE))
        if self.args.save_bge_m3_layout and self.args.should_save:
            model = self.accelerator.unwrap_model(self.model)
            if hasattr(model, "merge_and_unload"):
                logger.warning("save_bge_m3_layout: skipped for a LoRA model; merge the adapter first.")
            else:
                save_bge_m3(unwrap_m3(model), os.path.join(output_dir, "bge-m3"), self.processing_class,
                            state_dict=state_dict)
