"""Defaults that several parts of flagm3 share, each defined once (no torch or transformers import here, so the
command line can show them without loading either).

Two hybrid weightings exist on purpose:

- :data:`BGE_M3_ENSEMBLE_WEIGHTS` (dense 1 : sparse 0.3 : ColBERT 1) is BGE-M3's training ensemble and what
  flagm3 ranks with when no fitted weights are given: ``flagm3 eval`` / ``search``, the evaluator, mining's
  ``--hybrid`` (its dense and sparse entries) and the training loss's ensemble.
- :data:`COMPUTE_SCORE_WEIGHTS` (1 : 1 : 1) is the default of FlagEmbedding's ``BGEM3FlagModel.compute_score``,
  which ``M3Embedder.compute_score`` keeps so that it stays a drop-in: the same pairs give the same scores.

Both are overridden by a model's fitted ``hybrid_weights.json`` (see :mod:`flagm3.hybrid_weights`).
"""

from __future__ import annotations

from typing import Dict

HEADS = ("dense", "sparse", "colbert")  # the three retrieval heads, in this order everywhere

BGE_M3_ENSEMBLE_WEIGHTS: Dict[str, float] = {"dense": 1.0, "sparse": 0.3, "colbert": 1.0}
COMPUTE_SCORE_WEIGHTS: Dict[str, float] = {"dense": 1.0, "sparse": 1.0, "colbert": 1.0}
