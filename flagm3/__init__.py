"""flagm3: multi-granularity (dense, sparse, ColBERT) retrieval training on the Hugging Face stack."""

from .configuration_m3 import M3Config, sparse_ignore_ids_from_tokenizer
from .modeling_m3 import CheckpointError, M3Model, M3Output
from .version import __version__

__all__ = [
    "CheckpointError",
    "M3Config",
    "M3Model",
    "M3Output",
    "__version__",
    "sparse_ignore_ids_from_tokenizer",
]
