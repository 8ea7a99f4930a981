"""flagm3: multi-granularity (dense, sparse, ColBERT) retrieval training on the Hugging Face stack."""

from importlib import import_module
from typing import Any

from .configuration_m3 import M3Config, sparse_ignore_ids_from_tokenizer
from .inference import BGEM3FlagModel, M3Embedder
from .losses import M3Loss, M3LossConfig
from .modeling_m3 import CheckpointError, M3Model, M3Output
from .version import __version__

# Training pulls in the Trainer stack (accelerate, optional DeepSpeed): loaded on first use.
_LAZY = {
    "M3Trainer": "trainer",
    "M3TrainingArguments": "training_args",
    "M3ModelArguments": "training_args",
    "M3DataArguments": "training_args",
    "M3SparsePooling": "st_modules",  # needs sentence-transformers
    "Compression": "compression",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'flagm3' has no attribute {name!r}")


__all__ = [
    "BGEM3FlagModel",
    "CheckpointError",
    "Compression",
    "M3Config",
    "M3DataArguments",
    "M3Embedder",
    "M3Loss",
    "M3LossConfig",
    "M3Model",
    "M3ModelArguments",
    "M3Output",
    "M3SparsePooling",
    "M3Trainer",
    "M3TrainingArguments",
    "__version__",
    "sparse_ignore_ids_from_tokenizer",
]
