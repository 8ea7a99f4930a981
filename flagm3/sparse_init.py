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

import itertools
import logging
import math
import random
from collections import Counter
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from .modeling_m3 import M3Model

logger = logging.getLogger(__name__)

# How many texts the regression encodes by default (their IDF is computed over the whole corpus given).
DEFAULT_FIT_TEXTS = 1024


def bm25_idf(tokenized: Sequence[Sequence[int]]) -> dict[int, float]:
    """``log(1 + (N - df + 0.5) / (df + 0.5))`` per token id over ``N`` tokenised documents."""
    df = Counter(t for doc in tokenized for t in set(doc))
    n = len(tokenized)
    return {t: math.log(1 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}


def idf_table(
    tokenizer: Any, corpus: Sequence[str], max_length: int, vocab_size: int, batch_size: int = 4096,
) -> torch.Tensor:
    """FloatTensor ``[vocab_size]``: :func:`bm25_idf` of every token id over ``corpus`` (0 for absent ids),
    tokenised in batches (special tokens excluded, no padding), each text's distinct ids counted once."""
    df = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(corpus), batch_size):
        ids = tokenizer(list(corpus[start : start + batch_size]), truncation=True, max_length=max_length,
                        add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        if not lengths.sum():
            continue
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        rows = np.repeat(np.arange(len(ids), dtype=np.int64), lengths)
        pairs = np.unique(rows * vocab_size + flat)  # one (text, token) pair per text the token occurs in
        df += np.bincount(pairs % vocab_size, minlength=vocab_size)
    df_t = torch.from_numpy(df)
    n = float(len(corpus))
    idf = torch.log1p((n - df_t.double() + 0.5) / (df_t.double() + 0.5))
    return torch.where(df_t > 0, idf, torch.zeros_like(idf)).float()


def _vocab_size(model: M3Model, tokenizer: Any) -> int:
    """Enough ids for every token the tokenizer or the model's embeddings know."""
    embeddings = model.encoder.get_input_embeddings()
    sizes = [len(tokenizer), getattr(embeddings, "num_embeddings", 0), getattr(model.config, "vocab_size", 0) or 0]
    return int(max(sizes))


@torch.no_grad()  # (not inference_mode: a model that caches a buffer lazily would keep an inference tensor)
def init_sparse_head_from_idf(
    model: M3Model,
    tokenizer: Any,
    corpus: Sequence[str],
    max_length: int = 256,
    max_texts: int = DEFAULT_FIT_TEXTS,
    ridge: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    mean_weight: float = 0.15,
) -> dict[str, float]:
    """Fit ``model.sparse_linear`` so that its token weights approximate ``sqrt(idf)`` of each token.

    IDF is computed over all of ``corpus``; the regression uses the encoder's token states of at most
    ``max_texts`` texts of it, on the device the sparse head is on; the fitted head is then scaled so its mean
    token weight is ``mean_weight``. Returns fit statistics (number of tokens, R^2 of the fit, the scale applied).

    Memory: the normal equations ``[H+1, H+1]`` are accumulated in float64 one batch at a time; the token states
    ``[tokens, H]`` are kept once, in float32 on the device, to evaluate the fit (no float64 copy of them).
    """
    if not corpus:
        raise ValueError("init_sparse_head_from_idf needs a non-empty corpus")
    device = model.sparse_linear.weight.device
    idf = idf_table(tokenizer, corpus, max_length, _vocab_size(model, tokenizer))
    sqrt_idf = idf.sqrt().to(device)
    sample = list(corpus)
    if len(sample) > max_texts:
        sample = random.Random(seed).sample(sample, max_texts)
    was_training = model.training
    model.eval()
    ignore = model.sparse_ignore_ids.to(device)
    hidden_size = model.sparse_linear.weight.shape[1]
    gram = torch.zeros(hidden_size + 1, hidden_size + 1, dtype=torch.float64, device=device)
    moment = torch.zeros(hidden_size + 1, dtype=torch.float64, device=device)
    states, targets = [], []
    for start in range(0, len(sample), batch_size):
        batch = tokenizer(sample[start : start + batch_size], truncation=True, max_length=max_length,
                          padding=True, return_tensors="pt").to(device)
        hidden = model.encoder(**batch, return_dict=True).last_hidden_state
        keep = batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], ignore)
        x = hidden[keep].float()  # [tokens of this batch, H]
        y = sqrt_idf[batch["input_ids"][keep]]
        x1 = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1).double()  # one batch at a time
        gram += x1.T @ x1
        moment += x1.T @ y.double()
        states.append(x)
        targets.append(y)
    model.train(was_training)
    gram += ridge * torch.eye(hidden_size + 1, dtype=torch.float64, device=device)
    solution = torch.linalg.solve(gram, moment)
    weight, bias = solution[:-1].float(), solution[-1].float()
    n_tokens = sum(x.shape[0] for x in states)
    y_sum = sum(float(y.sum()) for y in targets)
    y_mean = y_sum / max(n_tokens, 1)
    fitted_sum = sse = sst = 0.0
    for x, y in zip(states, targets):
        fitted = torch.relu(x @ weight + bias)
        fitted_sum += float(fitted.sum())
        sse += float(((fitted - y) ** 2).sum())
        sst += float(((y - y_mean) ** 2).sum())
    r2 = 1 - sse / max(sst, 1e-12)
    scale = mean_weight / max(fitted_sum / max(n_tokens, 1), 1e-12)
    model.sparse_linear.weight.copy_((scale * weight).to(model.sparse_linear.weight).view(1, -1))
    model.sparse_linear.bias.copy_((scale * bias).to(model.sparse_linear.bias).view(1))
    stats = {"tokens": float(n_tokens), "texts": float(len(sample)), "r2": r2, "mean_sqrt_idf": y_mean,
             "scale": scale}
    logger.info("sparse head initialised from corpus IDF: %s", stats)
    return stats


def fit_sparse_head_once(
    model: M3Model,
    tokenizer: Any,
    corpus: Union[Sequence[str], Callable[[], Sequence[str]]],
    device: Union[str, torch.device, None] = None,
    max_length: int = 256,
    cache: Any = None,
    **fit_options: Any,
) -> Optional[dict[str, float]]:
    """:func:`init_sparse_head_from_idf` on rank 0 only, on ``device`` (the training device: the model is moved
    there, as training would), then the fitted head broadcast to every other process. ``corpus`` may be a
    callable, called on rank 0 only. With ``cache`` (a :class:`flagm3.sparse_head_cache.SparseHeadCache`), rank 0
    loads the head from it when it holds this fit, and stores the head it fits otherwise (the corpus is then not
    even read). Every process must call this. Returns the fit statistics on rank 0."""
    import torch.distributed as dist

    from .distributed import world

    rank, world_size = world()
    stats = None
    if device is not None:
        model.to(device)
    if rank == 0:
        stats = cache.load(model) if cache is not None else None
        if stats is None:
            texts = corpus() if callable(corpus) else corpus
            stats = init_sparse_head_from_idf(model, tokenizer, texts, max_length=max_length, **fit_options)
            if cache is not None:
                cache.save(model, stats)
    if world_size > 1:
        head = model.sparse_linear
        on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        for param in (head.weight, head.bias):
            buffer = param.detach().to(on).contiguous()
            dist.broadcast(buffer, src=0)
            with torch.no_grad():
                param.copy_(buffer.to(param.device))
    return stats
