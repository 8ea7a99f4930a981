"""Mined negatives that are likely false negatives: candidates scoring too close to the query's positive.

A candidate is dropped when its score with the query is above ``fraction`` of the positive's score (the best of
the query's positives), ``score > positive - (1 - fraction) * |positive|`` (for a positive score that is
``fraction * positive``; the margin form keeps the rule meaningful for logits below 0). Scores are the mining
model's own (dense, or the dense + sparse hybrid with ``flagm3 mine --hybrid``) or, where the training line
carries them, the teacher's ``pos_scores`` / ``neg_scores`` for its own passages: each candidate is compared
with the positive on one scale only.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor


def check_fraction(fraction: Optional[float]) -> None:
    """A false-negative fraction is ``None`` (off) or in (0, 1]."""
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"the false-negative fraction must be in (0, 1], got {fraction}")


def false_negative_mask(candidate_scores: Tensor, positive_score: float, fraction: float) -> Tensor:
    """``[n]`` bool: which of ``candidate_scores`` [n] are above ``fraction`` of ``positive_score``."""
    check_fraction(fraction)
    return candidate_scores > positive_score - (1 - fraction) * abs(positive_score)


def teacher_scores_of(record: Mapping) -> Optional[dict[str, float]]:
    """``{passage text: teacher score}`` from a line's ``pos_scores`` / ``neg_scores`` (aligned with ``pos`` /
    ``neg``), or ``None`` when the line has none (or they do not line up)."""
    pos, neg = record.get("pos_scores"), record.get("neg_scores")
    if not isinstance(pos, list) or len(pos) != len(record.get("pos", [])):
        return None
    scores = dict(zip(record["pos"], map(float, pos)))
    if isinstance(neg, list) and len(neg) == len(record.get("neg", [])):
        scores.update(zip(record["neg"], map(float, neg)))
    return scores


def false_negatives(
    candidates: Sequence[str],
    candidate_scores: Tensor,
    positive_scores: Tensor,
    fraction: float,
    teacher: Optional[Mapping[str, float]] = None,
    positives: Sequence[str] = (),
) -> set[str]:
    """The texts of ``candidates`` to drop: the model's ``candidate_scores`` [n] against the best of
    ``positive_scores`` [m]; a candidate with a ``teacher`` score is judged on the teacher's scale instead (against
    the best teacher score of ``positives``)."""
    if not candidates:
        return set()
    model_drop = false_negative_mask(candidate_scores, float(positive_scores.max()), fraction).tolist()
    teacher_positive = None
    if teacher is not None and positives and all(p in teacher for p in positives):
        teacher_positive = max(teacher[p] for p in positives)
    dropped = set()
    for text, drop in zip(candidates, model_drop):
        if teacher_positive is not None and text in teacher:
            drop = bool(false_negative_mask(torch.tensor([teacher[text]]), teacher_positive, fraction)[0])
        if drop:
            dropped.add(text)
    return dropped
