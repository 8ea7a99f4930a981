"""Checkpoint files: the original BGE-M3 layout (import and export), layout detection and hub resolution.

The BGE-M3 layout, as FlagEmbedding's ``BGEM3FlagModel`` reads and writes it, is a plain encoder checkpoint
(``config.json``, weights, tokenizer) with two head files beside it: ``colbert_linear.pt`` (``Linear(hidden, D)``)
and ``sparse_linear.pt`` (``Linear(hidden, 1)``), each a weights-only ``{"weight", "bias"}`` state dict.
:class:`flagm3.M3Model` loads this layout in ``from_pretrained`` and writes it with ``save_bge_m3``, both
through the functions here; this module knows files, not the model class.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Any, Optional

import torch
from torch import Tensor

from .compat import tokenizer_config_for_v4
from .configuration_m3 import M3Config

COLBERT_HEAD_FILE = "colbert_linear.pt"
SPARSE_HEAD_FILE = "sparse_linear.pt"
HEAD_FILES = {"colbert_linear": COLBERT_HEAD_FILE, "sparse_linear": SPARSE_HEAD_FILE}  # module -> file


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as an M3 model; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------- finding
def resolve_checkpoint(name_or_path: str, kwargs: dict) -> str:
    """A local directory for ``name_or_path``: itself, or a snapshot of the hub repository it names.

    ``kwargs`` are ``from_pretrained``'s: ``revision`` is taken out of them, ``cache_dir``/``token`` are read.
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    return snapshot_download(
        name_or_path,
        revision=kwargs.pop("revision", None),
        cache_dir=kwargs.get("cache_dir"),
        token=kwargs.get("token"),
        allow_patterns=["*.json", "*.safetensors", "*.pt", "*.model", "*.txt", "*.bin"],
    )


def read_config(path: str) -> dict:
    """``config.json`` of a model directory as a dict; a missing or invalid file is a :class:`CheckpointError`."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{config_file} is missing: {path} is not a model directory.")
    try:
        with open(config_file, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err}).") from err


def checkpoint_layout(path: str) -> str:
    """``flagm3`` (own format), ``bge-m3`` (encoder + head .pt files) or ``encoder`` (a plain encoder)."""
    config = read_config(path)
    if config.get("model_type") == M3Config.model_type:
        return "flagm3"
    has_heads = [os.path.isfile(os.path.join(path, n)) for n in (COLBERT_HEAD_FILE, SPARSE_HEAD_FILE)]
    return "bge-m3" if any(has_heads) else "encoder"


def weights_file(path: str) -> str:
    """The weights file of a model directory (``path`` itself when none is found)."""
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    return path


# ------------------------------------------------------------------------------------------- import
def load_linear(file: str, in_features: int, out_features: Optional[int]) -> dict[str, Tensor]:
    """Load a Linear layer's state dict safely (``weights_only=True``) and check its shape against the encoder."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, non-tensor objects
        raise CheckpointError(f"{file}: cannot be read as a weights-only state dict ({err}).") from err
    if not isinstance(state, dict) or set(state) != {"weight", "bias"}:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{file}: expected a Linear state dict with 'weight' and 'bias', found {keys}.")
    weight, bias = state["weight"], state["bias"]
    out = weight.shape[0] if out_features is None else out_features
    if weight.ndim != 2 or tuple(weight.shape) != (out, in_features) or tuple(bias.shape) != (out,):
        raise CheckpointError(
            f"{file}: head weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not fit an encoder of hidden "
            f"size {in_features} (expected weight ({out}, {in_features})): a head from another model?"
        )
    return state


def check_bge_m3_heads(path: str) -> None:
    """Refuse a BGE-M3-layout directory that lacks one of the two head files."""
    for name in (COLBERT_HEAD_FILE, SPARSE_HEAD_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(
                f"{os.path.join(path, name)} is missing: a BGE-M3 checkpoint needs both {COLBERT_HEAD_FILE} "
                f"and {SPARSE_HEAD_FILE} beside the encoder."
            )


def load_bge_m3_heads(path: str, hidden_size: int) -> dict[str, dict[str, Tensor]]:
    """``{"colbert_linear": state, "sparse_linear": state}`` from a BGE-M3-layout directory, shapes checked
    against an encoder of ``hidden_size`` (the ColBERT size is whatever the file holds)."""
    check_bge_m3_heads(path)
    return {
        "colbert_linear": load_linear(os.path.join(path, COLBERT_HEAD_FILE), hidden_size, out_features=None),
        "sparse_linear": load_linear(os.path.join(path, SPARSE_HEAD_FILE), hidden_size, out_features=1),
    }


# ------------------------------------------------------------------------------------------- export
def sep_as_eos(tokenizer: Any) -> Any:
    """``tokenizer``, or a copy with ``eos_token = sep_token`` when it has no EOS token (BERT tokenizers):
    FlagEmbedding's ``BGEM3FlagModel`` needs one. Encodings are unchanged."""
    if getattr(tokenizer, "eos_token", "") is None and getattr(tokenizer, "sep_token", None) is not None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.eos_token = tokenizer.sep_token
    return tokenizer


def save_bge_m3_tokenizer(tokenizer: Any, directory: str) -> None:
    """Save ``tokenizer`` for the BGE-M3 layout (with an EOS token, see :func:`sep_as_eos`).

    ``tokenizer_config.json`` is written so that transformers 4.x (FlagEmbedding's) reads it too, and the
    SentencePiece model the tokenizer was loaded from is copied beside it (BGE-M3 ships both).
    """
    sep_as_eos(tokenizer).save_pretrained(directory)
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if isinstance(vocab_file, str) and vocab_file.endswith(".model") and os.path.isfile(vocab_file):
        target = os.path.join(directory, os.path.basename(vocab_file))
        if not os.path.exists(target):
            shutil.copyfile(vocab_file, target)
    config_file = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        readable = tokenizer_config_for_v4(config)
        if readable != config:
            with open(config_file, "w", encoding="utf-8") as f:
                json.dump(readable, f, indent=2, ensure_ascii=False)


def save_bge_m3(model: Any, directory: str, tokenizer: Any = None, state_dict: Optional[dict] = None) -> None:
    """Write ``model`` (an ``M3Model``) in the BGE-M3 layout, loadable by FlagEmbedding's ``BGEM3FlagModel``.

    ``state_dict`` (the model's, keys ``encoder.*``/``colbert_linear.*``/``sparse_linear.*``) replaces the
    module's own tensors when given: under ZeRO-3 the parameters are empty partitions and only the gathered
    state dict the Trainer passes holds the weights.
    """
    if state_dict is None:
        state_dict = model.state_dict()

    def part(prefix: str, clone: bool = False) -> dict[str, Tensor]:
        out = {k[len(prefix):]: v.detach().cpu() for k, v in state_dict.items() if k.startswith(prefix)}
        return {k: v.clone() if clone else v.contiguous() for k, v in out.items()}

    os.makedirs(directory, exist_ok=True)
    model.encoder.save_pretrained(directory, state_dict=part("encoder."), safe_serialization=True)
    for module, name in HEAD_FILES.items():
        torch.save(part(f"{module}.", clone=True), os.path.join(directory, name))
    if tokenizer is not None:
        save_bge_m3_tokenizer(tokenizer, directory)
