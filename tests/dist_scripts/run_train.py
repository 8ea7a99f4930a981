"""Run ``flagm3`` training from test code, in this process or under ``torchrun``/DeepSpeed, and record it.

Usage: ``python run_train.py RESULT_DIR [flagm3 train arguments ...] [:: RESULT_DIR2 arguments ...]`` (also
under ``torchrun``; several runs separated by ``::`` share one launch). For each run every rank
writes ``RESULT_DIR/rank<r>.json``: the world size, the log history, and the query token ids of each batch it
trained on; rank 0 also writes ``RESULT_DIR/grads.pt`` (the gradients every parameter had before the first
optimizer step, after DDP averaged them; not under DeepSpeed, whose gradients live in partitions) and
``RESULT_DIR/params.pt`` (the parameters after training, gathered from their partitions under ZeRO-3).
The model is saved with ``trainer.save_model()`` to ``--output_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from transformers import TrainerCallback


def _skip_deepspeed_op_builds() -> None:
    """DeepSpeed compiles its shared-memory communication op on first use (30 s): not needed on CPU tests."""
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except ImportError:
        pass


class GradientRecorder(TrainerCallback):
    """Keep a CPU copy of every gradient just before the first optimizer step."""

    def __init__(self) -> None:
        self.grads: Optional[dict[str, torch.Tensor]] = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs: Any):
        if self.grads is None and model is not None:
            from flagm3.trainer import unwrap_m3

            self.grads = {
                name: p.grad.detach().float().cpu().clone()
                for name, p in unwrap_m3(model).named_parameters()
                if p.grad is not None
            }


class EngineSteps(TrainerCallback):
    """After each optimizer step: the Trainer's step and, under DeepSpeed, the engine's own counters."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.steps: list[dict[str, int]] = []

    def on_step_end(self, args, state, control, **kwargs: Any):
        engine = self.trainer.model_wrapped
        if hasattr(engine, "micro_steps"):
            self.steps.append({"trainer": state.global_step, "engine_global_steps": engine.global_steps,
                               "engine_micro_steps": engine.micro_steps})


def poison(trainer: Any, spec: str) -> None:
    """``STEP:MICRO``: multiply the sparse head's output by inf in that (1-based) step's MICRO-th (0-based)
    micro-batch, so its loss is non-finite."""
    from flagm3.trainer import unwrap_m3

    step, micro = (int(x) for x in spec.split(":"))
    seen: dict[int, int] = {}

    def hook(module, inputs, output):
        current = trainer.state.global_step + 1
        calls = seen[current] = seen.get(current, 0) + 1  # one call per side and micro-batch, when not chunked
        if current == step and (calls - 1) // 2 == micro:
            return output.abs() * float("inf")
        return None

    unwrap_m3(trainer.model).sparse_linear.register_forward_hook(hook)


class ParameterChanges(TrainerCallback):
    """Whether each optimizer step changed any parameter (1-based steps); not under ZeRO-3 (partitioned)."""

    def __init__(self) -> None:
        self.changed: dict[int, bool] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs: Any):
        from flagm3.trainer import unwrap_m3

        self.before = [p.detach().clone() for p in unwrap_m3(model).parameters()]

    def on_step_end(self, args, state, control, model=None, **kwargs: Any):
        from flagm3.trainer import unwrap_m3

        after = list(unwrap_m3(model).parameters())
        self.changed[state.global_step] = any(not torch.equal(a, b) for a, b in zip(after, self.before))


def nan_gradient(trainer: Any, step: int) -> None:
    """On rank 0 only, turn the ColBERT head's weight gradient NaN in that (1-based) step: the loss stays finite."""
    from flagm3.trainer import unwrap_m3

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if trainer.state.global_step + 1 == step and trainer.args.process_index == 0:
            return grad * float("nan")
        return grad

    unwrap_m3(trainer.model).colbert_linear.weight.register_hook(hook)


class WarningRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def checkpointing(model: torch.nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on (transformers 5 renamed the property)."""
    flag = getattr(type(model), "is_activation_checkpointing", None)
    return bool(model.is_activation_checkpointing if flag is not None else model.is_gradient_checkpointing)


def trained_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU fp32 copies of all parameters, gathered from their ZeRO-3 partitions where partitioned."""
    from flagm3.distributed import zero3_enabled

    if not zero3_enabled():
        return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}


def run(result_dir: str, argv: Sequence[str]) -> dict:
    """Build the trainer from ``argv``, train, save, and write this rank's record; return it."""
    return train(result_dir, argv)[1]


def train(result_dir: str, argv: Sequence[str]) -> tuple[Any, dict]:
    """:func:`run`, returning the trained ``M3Trainer`` too."""
    from flagm3.train import build_trainer, parse_args
    from flagm3.trainer import unwrap_m3

    _skip_deepspeed_op_builds()
    argv = list(argv)
    poison_spec = None
    if "--test_poison" in argv:  # test-only: see poison()
        at = argv.index("--test_poison")
        poison_spec = argv[at + 1]
        del argv[at : at + 2]
    nan_step = None
    if "--test_nan_gradient" in argv:  # test-only: see nan_gradient()
        at = argv.index("--test_nan_gradient")
        nan_step = int(argv[at + 1])
        del argv[at : at + 2]
    model_args, data_args, training_args = parse_args(argv)
    trainer = build_trainer(model_args, data_args, training_args)
    changes = ParameterChanges()
    trainer.add_callback(changes)
    warnings = WarningRecorder()
    logging.getLogger("flagm3.trainer").addHandler(warnings)
    if nan_step:
        nan_gradient(trainer, nan_step)
    recorder = GradientRecorder()
    trainer.add_callback(recorder)
    engine_steps = EngineSteps(trainer)
    trainer.add_callback(engine_steps)
    if poison_spec:
        poison(trainer, poison_spec)

    batches: list[list[list[int]]] = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args: Any, **kwargs: Any):
        batches.append(inputs["query"]["input_ids"].tolist())
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finally:
        logging.getLogger("flagm3.trainer").removeHandler(warnings)
    trainer.save_model()

    rank = trainer.args.process_index
    record = {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
        "batches": batches,
        "attn_implementation": unwrap_m3(trainer.model).encoder.config._attn_implementation,
        "gradient_checkpointing": checkpointing(unwrap_m3(trainer.model).encoder),
        "engine_steps": engine_steps.steps,
        "changed": changes.changed,
        "warnings": warnings.messages,
    }
    out = Path(result_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    params = trained_parameters(unwrap_m3(trainer.model))  # collective under ZeRO-3: every rank
    if rank == 0:
        if recorder.grads is not None:
            torch.save(recorder.grads, out / "grads.pt")
        torch.save(params, out / "params.pt")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return trainer, record


def split_runs(argv: Sequence[str]) -> list[list[str]]:
    runs: list[list[str]] = [[]]
    for arg in argv:
        if arg == "::":
            runs.append([])
        else:
            runs[-1].append(arg)
    return [r for r in runs if r]


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for run_argv in split_runs(sys.argv[1:]):
        run(run_argv[0], run_argv[1:])
    from flagm3.distributed import shutdown_process_group

    shutdown_process_group()
