"""A fresh sparse head fitted to corpus IDF (flagm3.sparse_init): weights follow IDF, on BGE-M3's scale."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SENTENCES

from flagm3.sparse_init import bm25_idf, init_sparse_head_from_idf

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def test_bm25_idf_formula():
    idf = bm25_idf([[1, 2, 2], [2, 3], [2]])
    assert idf[2] == pytest.approx(math.log(1 + 0.5 / 3.5))  # in every document
    assert idf[1] == pytest.approx(math.log(1 + 2.5 / 1.5)) == pytest.approx(idf[3])


def token_weights(model, tokenizer, texts) -> tuple[list[int], torch.Tensor]:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        weights = model(**batch, heads=("sparse",)).sparse
    keep = weights.new_ones(weights.shape, dtype=torch.bool) & batch["attention_mask"].bool()
    keep &= ~torch.isin(batch["input_ids"], model.sparse_ignore_ids)
    return batch["input_ids"][keep].tolist(), weights[keep]


def test_fitted_head_follows_idf_at_the_requested_scale(tiny_model, tiny_tokenizer):
    corpus = SENTENCES + ["the flow of the wing", "the wing and the flow"]
    stats = init_sparse_head_from_idf(tiny_model, tiny_tokenizer, corpus, max_length=64, mean_weight=0.15)
    assert stats["texts"] == len(corpus) and stats["scale"] > 0 and 0 < stats["r2"] <= 1
    ids, weights = token_weights(tiny_model, tiny_tokenizer, corpus)
    assert float(weights.mean()) == pytest.approx(0.15, rel=1e-3)  # the mean over the fitted tokens

    idf = bm25_idf(tiny_tokenizer(corpus, add_special_tokens=False)["input_ids"])
    per_token: dict[int, list[float]] = {}
    for token, weight in zip(ids, weights.tolist()):
        per_token.setdefault(token, []).append(weight)
    common = [t for t in per_token if idf[t] == min(idf.values())]  # "the": in most texts
    rare = [t for t in per_token if idf[t] == max(idf.values())]
    mean = lambda ts: sum(sum(per_token[t]) / len(per_token[t]) for t in ts) / len(ts)  # noqa: E731
    assert mean(rare) ** 2 > 2 * mean(common) ** 2  # a rare token's score w_q * w_p, against a common one's
    # over token occurrences, the fitted weight correlates with sqrt(IDF), so that a query weight times a passage
    # weight approximates the token's IDF (ridge fit of a random tiny model)
    target = torch.tensor([idf[t] ** 0.5 for t in ids], dtype=weights.dtype)
    assert torch.corrcoef(torch.stack([weights, target]))[0, 1] > 0.5


def test_empty_corpus_is_refused(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="non-empty corpus"):
        init_sparse_head_from_idf(tiny_model, tiny_tokenizer, [])


def loop_fit(model, tokenizer, corpus, max_length, ridge=1.0, mean_weight=0.15):
    """The fit as it was first written (a Python loop over tokens, a float64 copy of every state): the oracle."""
    ids = tokenizer(list(corpus), truncation=True, max_length=max_length, add_special_tokens=False)["input_ids"]
    idf = bm25_idf(ids)
    batch = tokenizer(list(corpus), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.encoder(**batch, return_dict=True).last_hidden_state
    keep = batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], model.sparse_ignore_ids)
    x = hidden[keep].double()
    y = torch.tensor([math.sqrt(idf.get(t, 0.0)) for t in batch["input_ids"][keep].tolist()], dtype=torch.float64)
    x1 = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.solve(x1.T @ x1 + ridge * torch.eye(x1.shape[1], dtype=torch.float64), x1.T @ y)
    fitted = torch.relu(x1 @ solution)
    return solution * mean_weight / fitted.mean()


def test_vectorised_fit_equals_the_token_loop(tiny_model, tiny_tokenizer):
    """IDF by bincount and the normal equations accumulated per batch give the loop's head (regression test of
    the vectorised fit, which keeps no float64 copy of the token states)."""
    corpus = SENTENCES + ["the flow of the wing", "the wing and the flow", "shock shock shock"]
    expected = loop_fit(tiny_model, tiny_tokenizer, corpus, max_length=64)
    init_sparse_head_from_idf(tiny_model, tiny_tokenizer, corpus, max_length=64, batch_size=3)
    got = torch.cat([tiny_model.sparse_linear.weight.view(-1), tiny_model.sparse_linear.bias.view(-1)]).double()
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-5)


def test_idf_table_equals_bm25_idf(tiny_tokenizer):
    from flagm3.sparse_init import idf_table

    corpus = SENTENCES + ["the flow of the wing", "wing wing wing"]
    table = idf_table(tiny_tokenizer, corpus, max_length=64, vocab_size=len(tiny_tokenizer), batch_size=2)
    expected = bm25_idf(tiny_tokenizer(corpus, add_special_tokens=False)["input_ids"])
    assert set(table.nonzero().view(-1).tolist()) == set(expected)
    for token, value in expected.items():
        assert float(table[token]) == pytest.approx(value, rel=1e-6)
