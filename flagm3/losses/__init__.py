"""Training losses: the M3 objective on head outputs (:mod:`.objective`) and the loss of one training batch
from the model and the raw batch (:mod:`.training`), with cached gradients (:mod:`.gradcache`)."""

from .objective import (
    M3Loss,
    M3LossConfig,
    M3LossOutput,
    group_logits,
    info_nce,
    kl_distill,
    m3_kd_loss,
    own_negatives_mask,
    sparse_health,
)
from .training import M3BatchLoss, M3TrainingLoss

__all__ = [
    "M3BatchLoss",
    "M3Loss",
    "M3LossConfig",
    "M3LossOutput",
    "M3TrainingLoss",
    "group_logits",
    "info_nce",
    "kl_distill",
    "m3_kd_loss",
    "own_negatives_mask",
    "sparse_health",
]
