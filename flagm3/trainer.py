"""``M3Trainer``: a Hugging Face ``Trainer`` whose ``compute_loss`` trains the three M3 heads jointly.

Specialise it by class attributes (``loss_class``, ``collator_class``, ``batch_sampler_class``) or by
overriding :meth:`M3Trainer.encode` / :meth:`M3Trainer.compute_loss`.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import Trainer

from .attention import set_attention_dropout, use_recompute_attention
from .checkpointing import AtomicCheckpointMixin
from .convert_bge_m3 import save_bge_m3
from .data import (
    M3BatchSampler,
    M3Collator,
    M3TrainDataset,
    chunked_padding_fraction,
    split_by_length,
)
from .data.sampler import CHUNK_OVERHEAD_TOKENS
from .distributed import gather_passages, world
from .losses import M3Loss, M3LossOutput
from .modeling_m3 import M3Output, merge_outputs, unwrap_m3
from .training_args import M3DataArguments, M3TrainingArguments

logger = logging.getLogger(__name__)

HEAD_MODULES = ("sparse_linear", "colbert_linear")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive training steps had a non-finite loss or gradient."""


def _float_output(out: M3Output) -> M3Output:
    """Scores and losses in fp32 even when the encoder ran in bf16/fp16."""
    cast = lambda t: t.float() if t is not None and t.is_floating_point() else t  # noqa: E731
    return M3Output(dense=cast(out.dense), sparse=cast(out.sparse), colbert=cast(out.colbert),
                    colbert_mask=out.colbert_mask)


class M3Trainer(AtomicCheckpointMixin, Trainer):
    """Trainer for :class:`flagm3.M3Model` on (query, group of passages) batches from ``flagm3.data``.

    Checkpoints are written atomically (see :mod:`flagm3.checkpointing`)."""

    loss_class: type[M3Loss] = M3Loss
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
        self.evaluator = evaluator
        self._log_sums: dict[str, float] = defaultdict(float)
        self._log_count = 0
        self._bad_steps = 0
        self._stat_sums: dict[str, Tensor] = {}
        self._stat_count = 0
        self._sparse_start: Optional[dict[str, float]] = None
        self._sparse_warned = False
        self._prepare_parameters(model, args)
        self._prepare_sparse_head(model)
        self._choose_attention(model, args)
        super().__init__(model=model, args=args, **kwargs)

    # ------------------------------------------------------------------------------------ setup
    def _prepare_parameters(self, model: nn.Module, args: M3TrainingArguments) -> None:
        """Freeze what must not train: unused heads, the encoder's pooler, and what the arguments fix."""
        m3 = unwrap_m3(model)
        trained = {h for h in self.m3_loss.heads if self.m3_loss.config.trains(h)}
        frozen = []
        for name, param in m3.named_parameters():
            unused_head = (name.startswith("sparse_linear") and "sparse" not in trained) or (
                name.startswith("colbert_linear") and "colbert" not in trained
            )
            pooler = name.startswith("encoder.pooler.")
            fixed = (args.fix_encoder and name.startswith("encoder.")) or (
                args.fix_position_embedding and "position_embeddings" in name
            )
            if unused_head or pooler or fixed:
                if param.requires_grad:
                    frozen.append(name)
                param.requires_grad_(False)
        if frozen:
            logger.info("frozen parameters: %d tensors (%s ...)", len(frozen), ", ".join(frozen[:3]))

    def _prepare_sparse_head(self, model: nn.Module) -> None:
        """The sparse-head levers of the loss config: detached hidden states into the head
        (``sparse_stop_gradient``) and the anchor's copy of the head's initial parameters."""
        cfg = self.m3_loss.config
        head = unwrap_m3(model).sparse_linear
        self._sparse_initial = None
        if "sparse" not in self.m3_loss.heads:
            return
        if cfg.sparse_stop_gradient:
            head.register_forward_pre_hook(lambda module, inputs: tuple(x.detach() for x in inputs))
        if cfg.sparse_anchor_weight > 0:
            self._sparse_initial = [p.detach().clone() for p in head.parameters()]

    @staticmethod
    def _choose_attention(model: nn.Module, args: M3TrainingArguments) -> None:
        """The training-time attention settings of :mod:`flagm3.attention`: the dropout on attention
        probabilities (``attention_dropout``; by default 0 in the ``flagm3`` recipe) and, when asked, probabilities
        recomputed in the backward pass (not with gradient checkpointing, which recomputes whole layers)."""
        encoder = unwrap_m3(model).encoder
        dropout = getattr(args, "attention_dropout", None)
        if dropout is None and getattr(args, "loss_preset", None) == "flagm3":
            dropout = 0.0
        if dropout is not None and not set_attention_dropout(encoder, dropout):
            logger.warning("attention_dropout=%s: no attention module of %s has a dropout to set",
                           dropout, type(encoder).__name__)
        if getattr(args, "recompute_attention", False) and not args.gradient_checkpointing:
            if not use_recompute_attention(encoder):
                logger.warning("recompute_attention: %s does not dispatch attention through transformers' "
                               "AttentionInterface; attention is left as it is", type(encoder).__name__)

    def create_optimizer(self, model: Optional[nn.Module] = None):
        """AdamW as the Trainer builds it, with the heads at ``head_learning_rate`` when given."""
        head_lr = getattr(self.args, "head_learning_rate", None)
        sparse_lr = getattr(self.args, "sparse_learning_rate", None)
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
    def encode(self, model: nn.Module, features: dict[str, Tensor]) -> M3Output:
        """Run the (wrapped) model on one side of the batch, computing only the heads the loss needs.

        With ``max_length_chunks > 1`` the rows are encoded in length-sorted chunks, each cut to its own longest
        text (:func:`flagm3.data.split_by_length`), and reassembled: the same outputs for fewer padded tokens.
        """
        heads = self.m3_loss.heads
        mask = features["attention_mask"]
        right_padded = bool((mask.cumprod(1) == mask).all())
        max_chunks = getattr(self.args, "max_length_chunks", 1) if right_padded else 1
        chunks = split_by_length(features, max_chunks, CHUNK_OVERHEAD_TOKENS)
        if len(chunks) < 2:
            return _float_output(model(**features, heads=heads))
        parts = [_float_output(model(**part, heads=heads)) for _, part in chunks]
        return merge_outputs(parts, [rows for rows, _ in chunks], mask.shape[1])

    def m3_loss_from_outputs(
        self, q: M3Output, q_ids: Tensor, p: M3Output, p_ids: Tensor, inputs: dict[str, Any]
    ) -> M3LossOutput:
        """The loss of one batch from both sides' head outputs (passages gathered across processes if asked)."""
        no_in_batch_neg = bool(inputs.get("no_in_batch_neg", False))
        group_size = p_ids.shape[0] // q_ids.shape[0]
        offset = 0
        if self.args.negatives_cross_device and not no_in_batch_neg:
            rank, size = world()
            if size > 1:
                p, p_ids = gather_passages(p, p_ids)
                offset = rank * q_ids.shape[0]
        return self.m3_loss(
            q,
            q_ids,
            p,
            p_ids,
            group_size=group_size,
            teacher_scores=inputs.get("teacher_scores"),
            no_in_batch_neg=no_in_batch_neg,
            step=self.state.global_step,
            query_offset=offset,
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        q = self.encode(model, inputs["query"])
        p = self.encode(model, inputs["passage"])
        out = self.m3_loss_from_outputs(q, inputs["query"]["input_ids"], p, inputs["passage"]["input_ids"], inputs)
        if self._sparse_initial is not None:
            anchor = self.m3_loss.sparse_anchor(unwrap_m3(model).sparse_linear, self._sparse_initial)
            out.loss = out.loss + anchor
            out.stats["sparse_anchor"] = anchor.detach()
        self._record(out.logs, inputs)
        self._record_stats(out.stats)
        return (out.loss, out) if return_outputs else out.loss

    # ------------------------------------------------------------------------------ training step
    def training_step(self, model, inputs, num_items_in_batch=None):
        """One micro-batch, with cached gradients when ``sub_batch_size`` is set. A non-finite loss or gradient
        in any micro-batch skips the whole optimizer step (see :meth:`_drop_skipped_step`)."""
        if self.args.sub_batch_size:
            if self.is_deepspeed_enabled:
                raise ValueError("sub_batch_size (cached-gradient training) does not run under DeepSpeed.")
            from .gradcache import cached_gradient_step

            model.train()
            inputs = self._prepare_inputs(inputs)
            loss = cached_gradient_step(self, model, inputs)
        else:
            loss = self._guarded_step(model, inputs, num_items_in_batch)
        self._check_gradients(model)
        self._drop_skipped_step(model)
        return loss

    def _guarded_step(self, model, inputs, num_items_in_batch) -> Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if not self.all_finite(loss):
            self._skip_step(f"loss {float(loss.detach())}")
            if self._loss_scaler() is None:  # with fp16 loss scaling, backward runs and the GradScaler skips
                return torch.zeros((), device=loss.device)
        loss = loss / self.current_gradient_accumulation_steps
        kwargs = {"scale_wrt_gas": False} if self.is_deepspeed_enabled else {}
        self.accelerator.backward(loss, **kwargs)
        return loss.detach()

    def all_finite(self, value: Tensor) -> bool:
        """True on every process only if ``value`` is finite on every process (so none waits in backward)."""
        bad = torch.tensor([0.0 if bool(torch.isfinite(value.detach()).all()) else 1.0], device=value.device)
        if self.args.world_size > 1:
            torch.distributed.all_reduce(bad)
        return bad.item() == 0

    def _check_gradients(self, model: nn.Module) -> None:
        # DeepSpeed: gradients live in its partitions. fp16 loss scaling: the GradScaler skips inf/NaN steps.
        # A step already skipped loses its gradients anyway. (Each condition is the same on every process.)
        if self.is_deepspeed_enabled or self._loss_scaler() is not None or self._step_skipped():
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and not self.all_finite(torch.stack([g.detach().float().abs().max() for g in grads])):
            bad = [n for n, p in unwrap_m3(model).named_parameters()
                   if p.grad is not None and not torch.isfinite(p.grad).all()]
            bad.sort(key=lambda n: not n.startswith(HEAD_MODULES))  # the heads first: nearest to the loss
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            self._skip_step(f"gradient of {', '.join(bad[:3]) or 'a parameter on another process'}{more}")

    def _skip_step(self, what: str) -> None:
        """Mark the current optimizer step as skipped, warn, and stop after too many consecutive ones."""
        step = self.state.global_step + 1  # the step being computed, numbered as the logs number it
        if self._skipped_step != step:
            consecutive = self._skipped_step is not None and self._skipped_step == step - 1
            self._bad_steps = self._bad_steps + 1 if consecutive else 1
            self._skipped_step = step
        heads = [k for k, v in self._last_logs.items() if not math.isfinite(v)] if self._last_logs else []
        logger.warning(
            "step %d: non-finite %s%s; step skipped (%d in a row)",
            step, what, f" (terms: {', '.join(heads)})" if heads else "", self._bad_steps,
        )
        if self._bad_steps >= self.args.max_consecutive_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self._bad_steps} consecutive steps with a non-finite {what} at step {step}; "
                f"last per-term losses: {self._last_logs}. Lower the learning rate, check the data, or use bf16."
            )

    _skipped_step: Optional[int] = None  # the last step (1-based) marked as skipped

    def _step_skipped(self) -> bool:
        return self._skipped_step == self.state.global_step + 1

    def _loss_scaler(self):
        return getattr(self.accelerator, "scaler", None)

    def _drop_skipped_step(self, model: nn.Module) -> None:
        """After every micro-batch: if the step is skipped, drop its gradients (``None``: the optimizer leaves
        those parameters and their Adam moments untouched) and flag the step as skipped, as accelerate flags an
        fp16 overflow, so the Trainer does not advance the learning-rate schedule either.

        Under DeepSpeed only the non-finite micro-batch's backward is skipped; with fp16 loss scaling the
        GradScaler skips the step (its backward ran on the non-finite loss)."""
        if self.is_deepspeed_enabled or self._loss_scaler() is not None:
            return
        skipped = self._step_skipped()
        if skipped:
            model.zero_grad(set_to_none=True)
        if hasattr(self.optimizer, "_is_overflow"):  # accelerate's AcceleratedOptimizer.step_was_skipped
            self.optimizer._is_overflow = skipped

    # ---------------------------------------------------------------------------------- logging
    _last_logs: dict[str, float] = {}

    def _record(self, logs: dict[str, float], inputs: dict[str, Any]) -> None:
        self._last_logs = logs
        if not all(math.isfinite(v) for v in logs.values()):
            return
        for key, value in logs.items():
            if key != "loss":
                self._log_sums[key] += value
        chunks = getattr(self.args, "max_length_chunks", 1)
        for side in ("passage", "query"):  # what the encoder processes, after length chunking
            mask = inputs[side]["attention_mask"]
            self._log_sums[f"padding_{side}"] += chunked_padding_fraction(mask, chunks, CHUNK_OVERHEAD_TOKENS)
        self._log_count += 1

    def _record_stats(self, stats: dict[str, Tensor]) -> None:
        """Sum the loss's detached statistics on the device; they reach the host at logging steps only."""
        for key, value in stats.items():
            self._stat_sums[key] = self._stat_sums[key] + value if key in self._stat_sums else value
        if stats:
            self._stat_count += 1

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

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the per-head losses, the padding fractions and the sparse health, averaged since the last log."""
        if "loss" in logs and self._log_count:
            logs.update({k: round(v / self._log_count, 6) for k, v in self._log_sums.items()})
            self._log_sums.clear()
            self._log_count = 0
        if "loss" in logs and self._stat_count:
            logs.update({k: round(float(v) / self._stat_count, 6) for k, v in self._stat_sums.items()})
            self._stat_sums.clear()
            self._stat_count = 0
            self._check_sparse_health(logs)
        super().log(logs, *args, **kwargs)

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

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        output_dir = output_dir or self.args.output_dir
        super()._save(output_dir, state_dict=state_dict)
        if self.args.save_bge_m3_layout and self.args.should_save:
            model = self.accelerator.unwrap_model(self.model)
            if hasattr(model, "merge_and_unload"):
                logger.warning("save_bge_m3_layout: skipped for a LoRA model; merge the adapter first.")
            else:
                save_bge_m3(unwrap_m3(model), os.path.join(output_dir, "bge-m3"), self.processing_class,
                            state_dict=state_dict)
