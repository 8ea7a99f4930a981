"""flagm3: multi-granularity (dense, sparse, ColBERT) retrieval training on the Hugging Face stack.

The names below load on first use (PEP 562). ``import flagm3`` registers the ``flagm3`` model type with
transformers' ``AutoConfig`` / ``AutoModel`` (it imports :mod:`flagm3.modeling_m3`), except in the ``flagm3``
command itself, whose ``--help`` imports neither torch nor transformers (each subcommand imports what it runs).
"""

import os
import sys
from importlib import import_module
from typing import Any

from .version import __version__

# public name -> the module that defines it
_LAZY = {
    "M3Config": "configuration_m3",
    "sparse_ignore_ids_from_tokenizer": "configuration_m3",
    "BGEM3FlagModel": "inference",
    "M3Embedder": "inference",
    "M3Loss": "losses",
    "M3LossConfig": "losses",
    "CheckpointError": "modeling_m3",
    "M3Model": "modeling_m3",
    "M3Output": "modeling_m3",
    "M3Trainer": "trainer",
    "M3TrainingArguments": "training_args",
    "M3ModelArguments": "training_args",
    "M3DataArguments": "training_args",
    "M3SparsePooling": "st_modules",  # needs sentence-transformers
    "Compression": "compression",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module 'flagm3' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", *sorted(_LAZY)]


def _is_the_flagm3_command() -> bool:
    """True while the ``flagm3`` console script or ``python -m flagm3`` imports the package."""
    first = sys.argv[0] if sys.argv else ""
    return first == "-m" or os.path.basename(first) == "flagm3"


if not _is_the_flagm3_command():
    import_module(".modeling_m3", __name__)  # AutoConfig / AutoModel know the flagm3 model type
