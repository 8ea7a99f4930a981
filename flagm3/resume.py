"""Restarting ``flagm3 train``: every stop and every rerun has one clear outcome.

- ``--resume_from_checkpoint last`` with no complete checkpoint in ``--output_dir`` starts from scratch with one
  INFO line (one job script serves the first run and every resubmission), before anything loads.
- The same with a checkpoint that already reached the run's last step trains nothing and says the run is
  complete (:class:`RunComplete`), before anything loads.
- A checkpoint whose weights do not fit the model being trained (another encoder, LoRA against full
  fine-tuning, another head size) is refused in one line naming both models (:func:`check_checkpoint_fits`),
  from the checkpoint files' headers, before any of its weights load.
- SIGINT and SIGTERM (Ctrl-C; SLURM's and Kubernetes' notice before preemption) stop training at the next step
  boundary with a checkpoint (:class:`GracefulStop`); :func:`stop_message` is the one line saying how to resume.
  A second SIGINT interrupts at once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from transformers import TrainerCallback

from .checkpointing import RESUME_LAST, last_checkpoint

logger = logging.getLogger("flagm3.train")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RESUME_HINT = "rerun the same command with --resume_from_checkpoint last to continue"


class ForeignCheckpointError(ValueError):
    """``--resume_from_checkpoint`` names a checkpoint of another model than the one being trained."""


@dataclass
class RunComplete:
    """The checkpoint ``--resume_from_checkpoint last`` found is already at the run's last step."""

    checkpoint: str
    step: int
    max_steps: int

    def message(self) -> str:
        return (f"{self.checkpoint} is at step {self.step} of {self.max_steps}: the run is complete, nothing more "
                "to train (raise --max_steps/--num_train_epochs or use another --output_dir to train further)")


def wants_last(resume: Any) -> bool:
    """``--resume_from_checkpoint`` asks for the last checkpoint (``True``, ``last``/``latest``/``true``)."""
    return resume is True or (isinstance(resume, str) and resume.lower() in RESUME_LAST and not os.path.isdir(resume))


def _read_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)


def resolve_last(args: Any) -> Optional[RunComplete]:
    """Turn ``args.resume_from_checkpoint = "last"`` into a path, or ``None`` (with one INFO line) when
    ``output_dir`` has no complete checkpoint; a :class:`RunComplete` when that checkpoint ended the run.
    Reads only ``trainer_state.json``: call it before the model loads."""
    if not wants_last(args.resume_from_checkpoint):
        return None
    path = last_checkpoint(args.output_dir)
    if path is None:
        logger.info("--resume_from_checkpoint %s: no checkpoint in %s yet, starting from scratch",
                    args.resume_from_checkpoint, args.output_dir)
        args.resume_from_checkpoint = None
        return None
    args.resume_from_checkpoint = path
    state = _read_state(path)
    step = int(state.get("global_step", 0))
    if args.max_steps and args.max_steps > 0:
        target = int(args.max_steps)
    elif float(state.get("num_train_epochs", -1)) == float(args.num_train_epochs):
        target = int(state.get("max_steps", 0))  # epochs: the number of steps the run computed for them
    else:
        return None
    return RunComplete(path, step, target) if target > 0 and step >= target else None


# ------------------------------------------------------------------------------------------- compatibility
def _weight_files(checkpoint: str) -> list[str]:
    names = ("model.safetensors", "adapter_model.safetensors")
    index = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return sorted({os.path.join(checkpoint, v) for v in json.load(f)["weight_map"].values()})
    return [os.path.join(checkpoint, n) for n in names if os.path.isfile(os.path.join(checkpoint, n))]


def checkpoint_shapes(checkpoint: str) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every tensor in the checkpoint's safetensors files, from their headers only."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in _weight_files(checkpoint):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of what saving ``model`` writes (PEFT: the adapter's and saved modules' tensors), with
    ZeRO-3 partitioned parameters at their full shape."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
        return {k: tuple(v.shape) for k, v in state.items()}
    full = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    return {k: full.get(k, tuple(v.shape)) for k, v in model.state_dict().items()}


def describe_config(config: Any) -> str:
    """``bert, hidden 32, 2 layers, vocabulary 300`` for an M3 (or plain encoder) config or its dict."""
    get = (lambda c, k: c.get(k)) if isinstance(config, dict) else getattr  # noqa: E731
    backbone = get(config, "backbone_config") if get(config, "backbone_config") is not None else config
    if backbone is None:
        return "unknown model"
    parts = [str(get(backbone, "model_type") or "?")]
    for key, label in (("hidden_size", "hidden"), ("num_hidden_layers", "layers"), ("vocab_size", "vocabulary")):
        if get(backbone, key) is not None:
            parts.append(f"{label} {get(backbone, key)}" if label != "layers" else f"{get(backbone, key)} layers")
    return ", ".join(parts)


def _describe_checkpoint(checkpoint: str) -> str:
    base = None
    adapter = os.path.join(checkpoint, "adapter_config.json")
    if os.path.isfile(adapter):
        with open(adapter, encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
    try:
        with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as f:
            text = describe_config(json.load(f))
    except (OSError, ValueError):
        text = "no config.json"
    return f"{text}{', LoRA' if os.path.isfile(adapter) else ''}{f', from {base}' if base else ''}"


def check_checkpoint_fits(model: nn.Module, checkpoint: Optional[str], model_source: str) -> None:
    """Refuse ``checkpoint`` (one line naming both models) unless its weights have exactly the names and shapes
    of the ``model``'s that a save writes; reads only the safetensors headers, so nothing loads first."""
    if not checkpoint:
        return
    have = checkpoint_shapes(checkpoint)
    if not have:
        return  # no safetensors weights (DeepSpeed-only or .bin checkpoints): left to the Trainer
    want = model_shapes(model)
    shape = next(((k, have[k], want[k]) for k in sorted(want) if k in have and have[k] != want[k]), None)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    if shape is None and not missing and not unexpected:
        return
    if shape is not None:
        detail = f"{shape[0]} is {list(shape[1])} there, {list(shape[2])} here"
    elif missing:
        detail = f"{len(missing)} weights missing there (e.g. {missing[0]})"
    else:
        detail = f"{len(unexpected)} weights it has are not in this model (e.g. {unexpected[0]})"
    unwrapped = model.get_base_model() if hasattr(model, "get_base_model") else model
    here = describe_config(getattr(unwrapped, "config", None)) + (", LoRA" if hasattr(model, "peft_config") else "")
    raise ForeignCheckpointError(
        f"--resume_from_checkpoint {checkpoint} ({_describe_checkpoint(checkpoint)}) is not a checkpoint of "
        f"--model_name_or_path {model_source} ({here}): {detail}; nothing was loaded or trained. Resume with the "
        "model and flags it was trained with, or use another --output_dir"
    )


# ------------------------------------------------------------------------------------------------- signals
class GracefulStop(TrainerCallback):
    """On SIGINT or SIGTERM, finish the current optimizer step, save a checkpoint and stop training.

    With several processes the stop flag is all-reduced at every step end (one 1-element all-reduce), so every
    rank stops at the same step even when only one was signalled. A second SIGINT raises ``KeyboardInterrupt``.
    ``signum`` is the signal received (``None``: none), ``step`` the step of the checkpoint written.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.step: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("%s received: saving a checkpoint at the end of this step, then stopping",
                       signal.Signals(signum).name)

    def on_train_begin(self, args, state, control, **kwargs):
        if not self._previous:
            try:
                self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
            except ValueError:  # not the main thread: signals stay as they are
                self._previous = {}

    def on_train_end(self, args, state, control, **kwargs):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _stop_requested(self, args) -> bool:
        flag = float(self.signum or 0)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and args.world_size > 1:
            value = torch.tensor([flag], device=args.device)
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
            flag = float(value.item())
        if flag and self.signum is None:
            self.signum = int(flag)  # another rank was signalled
        return bool(flag)

    def on_step_end(self, args, state, control, **kwargs):
        if self._stop_requested(args):
            control.should_save = True
            control.should_training_stop = True
            self.step = state.global_step
        return control


def stop_message(stop: GracefulStop, output_dir: str) -> str:
    """The one line after a signalled stop: where the checkpoint is and how to resume."""
    name = signal.Signals(stop.signum).name if stop.signum else "a signal"
    where = os.path.join(output_dir, f"checkpoint-{stop.step}")
    return f"stopped by {name} at step {stop.step}, checkpoint saved in {where}; {RESUME_HINT}"


def save_failure_message(err: OSError, output_dir: str) -> Optional[str]:
    """The one line for an ``OSError`` (a full disk, a lost mount) raised while a checkpoint was being written:
    the checkpoint it was writing (left incomplete: skipped and removed at the next start), the error, and the
    last complete checkpoint, which is intact. ``None`` when no save was under way (not a save's error)."""
    if not output_dir or not os.path.isdir(output_dir):
        return None
    last = last_checkpoint(output_dir)
    done = int(last.rsplit("-", 1)[1]) if last else -1
    steps = [int(n.rsplit("-", 1)[1]) for n in os.listdir(output_dir)
             if n.startswith("checkpoint-") and n.rsplit("-", 1)[1].isdigit()]
    written = [s for s in steps if s > done]
    if not written:
        return None
    where = os.path.join(output_dir, f"checkpoint-{max(written)}")
    failed = f"{err.filename}" if err.filename else where
    kept = f"the last complete checkpoint {last} is intact; {RESUME_HINT}" if last else "no earlier checkpoint"
    return f"writing checkpoint {where} failed ({failed}: {err.strerror or err}); {kept} once there is room"


def lost_process_message(err: BaseException, output_dir: str, step: int) -> Optional[str]:
    """The one line for a collective that failed because another process died (killed, out of memory): what
    happened, and the checkpoint to resume from. ``None`` when ``err`` is not such a failure or only one
    process runs (the error is then not a lost peer's)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if torch.distributed.get_world_size() < 2:
        return None
    distributed_errors = tuple(getattr(torch.distributed, n) for n in ("DistError", "DistBackendError")
                               if hasattr(torch.distributed, n))
    text = str(err)
    lost = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timeout",
            "NCCL communicator was aborted", "Socket Timeout")
    if not isinstance(err, distributed_errors) and not any(s in text for s in lost):
        return None
    first = text.strip().splitlines()[0][:200] if text.strip() else type(err).__name__
    last = last_checkpoint(output_dir) if output_dir else None
    kept = f"the last complete checkpoint is {last}; {RESUME_HINT}" if last else "no checkpoint was written yet"
    rank = torch.distributed.get_rank()
    return (f"rank {rank} stopped at step {step}: another process stopped answering ({type(err).__name__}: "
            f"{first}); {kept}")
