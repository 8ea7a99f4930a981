"""What differs between the transformers versions flagm3 supports (4.57.x and 5.x), in one place.

Every other module imports the version-dependent names from here instead of testing versions itself.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
TRANSFORMERS_5 = TRANSFORMERS_VERSION >= Version("5.0.0.dev0")


def init_copy_(tensor: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Copy ``value`` into ``tensor`` inside ``_init_weights`` (5.x: ``transformers.initialization.copy_``,
    which also marks the tensor initialised; 4.x: a plain in-place copy without autograd)."""
    if TRANSFORMERS_5:
        from transformers import initialization

        return initialization.copy_(tensor, value)
    with torch.no_grad():
        return tensor.copy_(value)


def tokenizer_config_for_v4(config: dict) -> dict:
    """A ``tokenizer_config.json`` written by 5.x, made readable by 4.x (FlagEmbedding's transformers).

    5.x may write ``extra_special_tokens`` as a list (its extra special tokens); 4.x reads that key as a
    ``{name: token}`` mapping and fails on a list ("'list' object has no attribute 'keys'"). The list's tokens
    go to ``additional_special_tokens``, the name 4.x reads.
    """
    extra = config.get("extra_special_tokens")
    if not isinstance(extra, list):
        return config
    config = {k: v for k, v in config.items() if k != "extra_special_tokens"}
    if extra:
        known = list(config.get("additional_special_tokens") or [])
        config["additional_special_tokens"] = known + [t for t in extra if t not in known]
    return config


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute encoder activations in backward (5.x: ``activation_checkpointing_enable``; 4.x:
    ``gradient_checkpointing_enable``, the name 5.x deprecates)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable()


def is_activation_checkpointing(model: Any) -> bool:
    return bool(getattr(model, "is_activation_checkpointing", getattr(model, "is_gradient_checkpointing", False)))



def mismatched_shapes(loading_info: dict, model: torch.nn.Module, weights_file: str) -> list[tuple[str, tuple, tuple]]:
    """``(key, shape in the weights file, shape in the model)`` for each tensor ``from_pretrained`` reported as
    mismatched (``ignore_mismatched_sizes=True``). 5.x reports these triples; 4.x reports key names only, so the
    file's shape is read from its safetensors header and the model's from the model."""
    entries = loading_info.get("mismatched_keys") or []
    if all(isinstance(e, (tuple, list)) and len(e) == 3 for e in entries):
        return [(k, tuple(a), tuple(b)) for k, a, b in entries]
    state = model.state_dict()
    shapes = {}
    if weights_file.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(weights_file, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return [(k, shapes.get(k, ()), tuple(state[k].shape) if k in state else ()) for k in entries]


# --------------------------------------------------------------------------------------- TrainingArguments
_MIXED_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
_mixed_precision_env: dict[str, Any] = {}  # "launcher": the value before flagm3's first arguments; "written"


def before_training_arguments(args: Any) -> None:
    """Called first in ``M3TrainingArguments.__post_init__``; 4.x only.

    - ``warmup_steps`` below 1 is a fraction of the total steps, as in 5.x (4.x reads that from ``warmup_ratio``).
    - 4.x's ``TrainingArguments`` writes its fp16/bf16 choice to ``$ACCELERATE_MIXED_PRECISION`` and reads the
      variable back as the next arguments' default, so one bf16 run made every later run of the process bf16.
      When the variable still holds what earlier arguments wrote, the launcher's value is put back first.
    """
    if TRANSFORMERS_5:
        return
    if 0 < args.warmup_steps < 1:
        args.warmup_ratio, args.warmup_steps = float(args.warmup_steps), 0
    args.warmup_steps = int(args.warmup_steps)
    current = os.environ.get(_MIXED_PRECISION_ENV)
    if "written" in _mixed_precision_env and current == _mixed_precision_env["written"]:
        launcher = _mixed_precision_env["launcher"]
        if launcher is None:
            os.environ.pop(_MIXED_PRECISION_ENV, None)
        else:
            os.environ[_MIXED_PRECISION_ENV] = launcher
    else:
        _mixed_precision_env["launcher"] = current


def after_training_arguments(args: Any) -> None:
    """Called last in ``M3TrainingArguments.__post_init__`` (see :func:`before_training_arguments`)."""
    if not TRANSFORMERS_5:
        _mixed_precision_env["written"] = os.environ.get(_MIXED_PRECISION_ENV)
