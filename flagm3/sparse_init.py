"""Start a fresh sparse head from corpus statistics instead of random weights.

A random ``Linear(hidden, 1)`` gives near-random lexical weights, and the contrastive loss moves it slowly, so
a freshly attached sparse head trails BM25 for a long time. :func:`init_sparse_head_from_idf` fits the head
by ridge regression so that ``ReLU(w . h_t + b)`` approximates the square root of the BM25 inverse document
frequency of each token ``t`` over a corpus. The lexical score multiplies a query's and a passage's weights, so
at step 0 it is already ``sum over shared tokens of idf(t)``, an IDF-weighted term overlap, and training refines
it from there. (Fitting IDF itself would score ``idf(t)^2``, which over-weights rare tokens: nDCG@10 0.290 vs
0.302 on Cranfield test and 0.232 vs 0.261 on CACM test, bench/sparse_gap.py.)

The fitted weights are then rescaled (ranking is unchanged) so that their mean is ``mean_weight``, by default
0.15, the scale of the published BGE-M3 model's lexical weights. Raw IDF values (2 to 7) would make sparse
scores 100x larger than the dense head's cosines: the sparse term would then dominate the ensemble score and,
at the contrastive temperature, saturate the softmax, and the head collapses (docs/heads-and-loss.md).
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from typing import Any, Sequence

import torch

from .modeling_m3 import M3Model

logger = logging.getLogger(__name__)


def bm25_idf(tokenized: Sequence[Sequence[int]]) -> dict[int, float]:
    """``log(1 + (N - df + 0.5) / (df + 0.5))`` per token id over ``N`` tokenised documents."""
    df = Counter(t for doc in tokenized for t in set(doc))
    n = len(tokenized)
    return {t: math.log(1 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}


@torch.no_grad()
def init_sparse_head_from_idf(
    model: M3Model,
    tokenizer: Any,
    corpus: Sequence[str],
    max_length: int = 256,
    max_texts: int = 1024,
    ridge: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    mean_weight: float = 0.15,
) -> dict[str, float]:
    """Fit ``model.sparse_linear`` so that its token weights approximate ``sqrt(idf)`` of each token.

    IDF is computed over all of ``corpus``; the regression uses the encoder's token states of at most
    ``max_texts`` texts of it; the fitted head is then scaled so its mean token weight is ``mean_weight``.
    Returns fit statistics (number of tokens, R^2 of the linear fit, the scale applied).
    """
    if not corpus:
        raise ValueError("init_sparse_head_from_idf needs a non-empty corpus")
    ids = tokenizer(list(corpus), truncation=True, max_length=max_length, add_special_tokens=False)["input_ids"]
    idf = bm25_idf(ids)
    sample = list(corpus)
    if len(sample) > max_texts:
        sample = random.Random(seed).sample(sample, max_texts)
    was_training = model.training
    model.eval()
    ignore = model.sparse_ignore_ids
    device = model.sparse_linear.weight.device
    states, targets = [], []
    for start in range(0, len(sample), batch_size):
        batch = tokenizer(sample[start : start + batch_size], truncation=True, max_length=max_length,
                          padding=True, return_tensors="pt").to(device)
        hidden = model.encoder(**batch, return_dict=True).last_hidden_state
        keep = batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], ignore.to(device))
        token_ids = batch["input_ids"][keep].tolist()
        states.append(hidden[keep].float().cpu())
        targets.append(torch.tensor([math.sqrt(idf.get(t, 0.0)) for t in token_ids]))
    model.train(was_training)
    x = torch.cat(states)
    y = torch.cat(targets)
    x1 = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double()
    gram = x1.T @ x1 + ridge * torch.eye(x1.shape[1], dtype=torch.float64)
    solution = torch.linalg.solve(gram, x1.T @ y.double())
    weight, bias = solution[:-1], solution[-1]
    fitted = torch.relu(x1 @ solution).float()
    r2 = 1 - float(((fitted - y) ** 2).sum() / ((y - y.mean()) ** 2).sum().clamp(min=1e-12))
    scale = mean_weight / float(fitted.mean().clamp(min=1e-12))
    model.sparse_linear.weight.copy_((scale * weight).to(model.sparse_linear.weight).view(1, -1))
    model.sparse_linear.bias.copy_((scale * bias).to(model.sparse_linear.bias).view(1))
    stats = {"tokens": float(x.shape[0]), "texts": float(len(sample)), "r2": r2, "mean_sqrt_idf": float(y.mean()),
             "scale": scale}
    logger.info("sparse head initialised from corpus IDF: %s", stats)
    return stats
