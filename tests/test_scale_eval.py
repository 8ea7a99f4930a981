"""Evaluation at corpus scale: encoding tokenises window by window, hybrid weights are fitted from running top-k
score blocks (no [queries, documents] matrix), with the same values as the full ranking."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import SENTENCES, spread_embedder

import flagm3.inference as inference
from flagm3.evaluation import evaluate_run, retrieve
from flagm3.hybrid_weights import hybrid_metrics
from flagm3.scoring import hybrid_scores

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [f"{s} {t}" for s in SENTENCES for t in ("wing", "flow", "shock")]


@pytest.fixture(scope="module")
def embedder(tiny_encoder_dir, tiny_tokenizer):
    return spread_embedder(tiny_encoder_dir, tiny_tokenizer, 2, batch_size=4)


def test_encoding_tokenises_one_window_at_a_time(embedder, monkeypatch):
    full = embedder.encode(DOCS, max_length=32, return_sparse=True, return_colbert_vecs=True)
    calls = []
    tokenizer = embedder.tokenizer
    original = type(tokenizer).__call__

    def counting(self, texts, *args, **kwargs):
        calls.append(len(texts) if isinstance(texts, list) else 1)
        return original(self, texts, *args, **kwargs)

    monkeypatch.setattr(inference, "_ENCODE_WINDOW", 7)
    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    windowed = embedder.encode(DOCS, max_length=32, return_sparse=True, return_colbert_vecs=True)
    assert max(calls) <= 7 and sum(calls) == len(DOCS)  # never the whole corpus at once
    np.testing.assert_allclose(windowed["dense_vecs"], full["dense_vecs"], atol=1e-5)
    for a, b in zip(windowed["colbert_vecs"], full["colbert_vecs"]):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert [sorted(d) for d in windowed["lexical_weights"]] == [sorted(d) for d in full["lexical_weights"]]


def test_hybrid_metrics_from_running_top_k_equal_the_full_ranking(embedder):
    """Regression test: the metric of each weight set equals the one computed from full [Q, N] score matrices
    (what hybrid_metrics did before), with the corpus cut in chunks of 5."""
    import torch

    rng = random.Random(0)
    corpus = {f"doc{i:02d}": text for i, text in enumerate(DOCS)}
    queries = {f"q{i}": s[:25] for i, s in enumerate(SENTENCES)}
    qrels = {q: {d: rng.choice([1, 2]) for d in rng.sample(sorted(corpus), 3)} for q in queries}
    weight_sets = [{"dense": 1.0, "sparse": 0.3, "colbert": 1.0}, {"dense": 0.0, "sparse": 1.0, "colbert": 0.0},
                   {"dense": 1.0, "sparse": 2.0, "colbert": 0.25}, {"dense": 0.0, "sparse": 0.0, "colbert": 1.0}]
    got = hybrid_metrics(embedder, corpus, queries, qrels, weight_sets, "ndcg@5", 32, 32, show_progress=False,
                         corpus_chunk_size=5)
    runs = retrieve(embedder, corpus, queries, hybrids=(), top_k=len(corpus), max_query_length=32,
                    max_passage_length=32, show_progress=False)
    doc_ids, qids = sorted(corpus, reverse=True), list(queries)
    matrices = {h: torch.tensor([[runs[h][q][d] for d in doc_ids] for q in qids], dtype=torch.float64)
                for h in ("dense", "sparse", "colbert")}
    expected = []
    for weights in weight_sets:
        fused = hybrid_scores(matrices, weights)
        run = {q: {d: float(fused[i, j]) for j, d in enumerate(doc_ids)} for i, q in enumerate(qids)}
        expected.append(evaluate_run(run, qrels, (5,), ("ndcg",))["ndcg@5"])
    assert got == pytest.approx(expected, abs=1e-9)
    assert len(set(round(v, 6) for v in got)) > 1  # the weight sets rank differently


@pytest.mark.slow  # two spawned worker processes: about 20 s on 2 cores
def test_encode_pool_of_two_processes_equals_one_embedder(tiny_encoder_dir, tiny_tokenizer, tmp_path):
    from flagm3 import M3Embedder, M3Model
    from flagm3.encode_pool import EncodePool

    model = M3Model.from_encoder(str(tiny_encoder_dir), colbert_dim=16)
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    kwargs = dict(batch_size=4, use_fp16=False, query_instruction_for_retrieval="q: ")
    expected = M3Embedder(str(tmp_path / "m"), devices="cpu", **kwargs).encode_queries(
        DOCS, max_length=32, return_sparse=True, return_colbert_vecs=True)
    with EncodePool(str(tmp_path / "m"), devices=["cpu", "cpu"], chunk_size=5, **kwargs) as pool:
        got = pool.encode_queries(DOCS, max_length=32, return_sparse=True, return_colbert_vecs=True)
        single = pool.encode("one text", max_length=32)
    np.testing.assert_allclose(got["dense_vecs"], expected["dense_vecs"], atol=1e-5)
    assert [dict(d) == pytest.approx(dict(e), abs=1e-5) for d, e in
            zip(got["lexical_weights"], expected["lexical_weights"])] == [True] * len(DOCS)
    for a, b in zip(got["colbert_vecs"], expected["colbert_vecs"]):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert single["dense_vecs"].shape == expected["dense_vecs"][0].shape
