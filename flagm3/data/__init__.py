"""Training data pipeline: validation, group-sampling dataset, collator and batch sampler."""

from .collator import M3Collator
from .dataset import M3TrainDataset
from .sampler import M3BatchSampler, padding_fraction
from .validation import (
    DataValidationError,
    Issue,
    ValidationReport,
    approx_num_tokens,
    validate_data,
    validate_file,
)

__all__ = [
    "DataValidationError",
    "Issue",
    "M3BatchSampler",
    "M3Collator",
    "M3TrainDataset",
    "ValidationReport",
    "approx_num_tokens",
    "padding_fraction",
    "validate_data",
    "validate_file",
]
