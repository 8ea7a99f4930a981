"""The Qdrant index scores as the default evaluator does, resumes without duplicates, and serves the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SENTENCES

from flagm3 import M3Embedder
from flagm3.cli import main as cli_main
from flagm3.evaluation import retrieve

qdrant = pytest.importorskip("flagm3.qdrant")
pytest.importorskip("qdrant_client")

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = {f"d{i}": text for i, text in enumerate(SENTENCES)}
QUERIES = {"q1": "flutter of aircraft wings", "q2": "supersonic boundary layer on a plate", "q3": "shells"}


@pytest.fixture()
def embedder(tiny_model, tiny_tokenizer):
    with torch.no_grad():
        tiny_model.sparse_linear.bias.fill_(0.1)  # every real token gets weight: sparse matches plenty
    return M3Embedder(tiny_model, tokenizer=tiny_tokenizer, batch_size=4)


@pytest.fixture()
def client():
    client = qdrant.connect(":memory:")
    yield client
    client.close()


def test_index_resumes_without_duplicates(embedder, client):
    first = dict(list(CORPUS.items())[:4])  # an interrupted run
    assert qdrant.index_corpus(embedder, client, "c", first, chunk_size=3, show_progress=False)["indexed"] == 4
    summary = qdrant.index_corpus(embedder, client, "c", CORPUS, chunk_size=3, show_progress=False)
    assert (summary["indexed"], summary["skipped"]) == (6, 4)
    assert client.count("c").count == len(CORPUS)
    again = qdrant.index_corpus(embedder, client, "c", CORPUS.items(), show_progress=False)
    assert (again["indexed"], again["skipped"]) == (0, len(CORPUS))
    points, _ = client.scroll("c", limit=100, with_payload=True)
    assert sorted(p.payload["doc_id"] for p in points) == sorted(CORPUS)
    assert {str(p.id) for p in points} == {qdrant.point_id(d) for d in CORPUS}


def test_collection_of_another_model_is_refused(embedder, client):
    qdrant.ensure_collection(client, "c", dense_dim=8, colbert_dim=16)
    with pytest.raises(ValueError, match="one collection per model"):
        qdrant.index_corpus(embedder, client, "c", CORPUS, show_progress=False)


def test_scores_equal_the_default_evaluator(embedder, client):
    qdrant.index_corpus(embedder, client, "c", CORPUS, show_progress=False)
    # prefetch the whole corpus: the weighted hybrids are then exact too
    runs = qdrant.retrieve(embedder, client, "c", QUERIES, top_k=len(CORPUS), show_progress=False)
    expected = retrieve(embedder, CORPUS, QUERIES, top_k=len(CORPUS), show_progress=False)
    assert set(runs) == set(expected) == {"dense", "sparse", "colbert", "dense+sparse", "all"}
    for name, run in runs.items():
        for qid in QUERIES:
            want = {d: s for d, s in expected[name][qid].items() if name != "sparse" or s > 0}
            assert run[qid].keys() == want.keys(), name  # sparse: the index returns matching documents only
            for doc, score in want.items():
                assert run[qid][doc] == pytest.approx(score, abs=1e-5), (name, qid, doc)


def test_hybrid_fusions(embedder, client):
    qdrant.index_corpus(embedder, client, "c", CORPUS, show_progress=False)
    queries = qdrant.encode_queries(embedder, list(QUERIES.values()))
    colbert = qdrant.search(client, "c", queries, "colbert", limit=len(CORPUS))
    for fusion in ("weights", "rrf"):
        plain = qdrant.search(client, "c", queries, "hybrid", limit=5, fusion=fusion)
        reranked = qdrant.search(client, "c", queries, "hybrid", limit=5, fusion=fusion, rerank=True)
        for hits, reranked_hits, colbert_hits in zip(plain, reranked, colbert):
            assert len(hits) == 5 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
            if fusion == "rrf":  # reranked by ColBERT alone: its scores are ColBERT's (all candidates: whole corpus)
                assert [h["doc_id"] for h in reranked_hits] == [h["doc_id"] for h in colbert_hits[:5]]
    rrf = qdrant.search(client, "c", queries[:1], "hybrid", limit=3, fusion="rrf")[0]
    assert rrf[0]["score"] <= 1.0  # reciprocal-rank scores, not similarities
    with pytest.raises(ValueError, match="mode must be one of"):
        qdrant.search(client, "c", queries, "bm25")


def test_cli_index_and_search(tiny_model, tiny_tokenizer, tmp_path, capsys):
    with torch.no_grad():
        tiny_model.sparse_linear.bias.fill_(0.1)
    model_dir = tmp_path / "m3"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n" for d, t in CORPUS.items()))
    location = str(tmp_path / "qdrant")  # embedded local mode, on disk
    common = ["--model", str(model_dir), "--qdrant", location, "--collection", "docs"]
    cli_main(["index", *common, "--corpus", str(corpus), "--chunk-size", "4"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["indexed"] == len(CORPUS)
    cli_main(["index", *common, "--corpus", str(corpus)])  # a second run adds nothing
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["indexed"], summary["skipped"], summary["points"]) == (0, len(CORPUS), len(CORPUS))
    cli_main(["search", *common, "--query", SENTENCES[8], "--mode", "dense", "--limit", "3"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["hits"][0]["doc_id"] == "d8" and result["hits"][0]["text"] == SENTENCES[8]
    assert [h["rank"] for h in result["hits"]] == [1, 2, 3]
    cli_main(["search", *common, "--query", "wing", "shells", "--rerank", "--fusion", "rrf"])
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
