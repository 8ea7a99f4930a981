"""The Qdrant index scores as the default evaluator does, resumes without duplicates, and serves the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SENTENCES

from flagm3 import M3Embedder, M3Model
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


def test_cranfield_metrics_equal_the_default_backend(minilm_dir, cranfield_dir):
    """Exact search through Qdrant gives the default evaluator's nDCG@10 per head (all-MiniLM-L6-v2 with
    fresh heads, a seeded subset of Cranfield test: every judged document of 8 queries plus others)."""
    from transformers import AutoTokenizer

    from flagm3.evaluation import evaluate_retrieval, load_beir, subsample

    torch.manual_seed(0)
    model = M3Model.from_encoder(str(minilm_dir), colbert_dim=32).eval()
    embedder = M3Embedder(model, tokenizer=AutoTokenizer.from_pretrained(str(minilm_dir)), batch_size=32)
    corpus, queries, qrels = subsample(*load_beir(cranfield_dir, "test"), max_corpus_size=150, max_queries=8)
    options = dict(k_values=(10,), max_query_length=64, max_passage_length=96, show_progress=False)
    expected, expected_runs = evaluate_retrieval(embedder, corpus, queries, qrels, return_runs=True, **options)
    got, info = qdrant.evaluate_qdrant(embedder, corpus, queries, qrels, return_runs=True, **options)
    assert info["index"]["indexed"] == len(corpus)
    for head in ("dense", "sparse", "colbert"):
        assert got[head]["ndcg@10"] == pytest.approx(expected[head]["ndcg@10"], abs=1e-4), head
        assert 0.0 < expected[head]["ndcg@10"] < 1.0
        for qid in qrels:  # the same top 10, up to ties: equal metrics are not a coincidence of averaging
            want = sorted(expected_runs[head][qid].items(), key=lambda item: (-item[1], item[0]))[:10]
            have = sorted(info["runs"][head][qid].items(), key=lambda item: (-item[1], item[0]))[:10]
            for (doc_a, score_a), (doc_b, score_b) in zip(want, have):
                assert score_a == pytest.approx(score_b, abs=1e-5)
                assert doc_a == doc_b or abs(score_a - score_b) < 1e-5, (head, qid)


@pytest.fixture()
def saved_model_and_data(tiny_model, tiny_tokenizer, tmp_path):
    """A saved tiny model and a BEIR collection of SENTENCES with test and dev qrels."""
    with torch.no_grad():
        tiny_model.sparse_linear.bias.fill_(0.1)
    model_dir = tmp_path / "m3"
    tiny_model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "beir"
    (data / "qrels").mkdir(parents=True)
    (data / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n"
                                               for d, t in CORPUS.items()))
    queries = {"q1": "flutter of aircraft wings", "q2": "supersonic flow", "q3": "heat transfer",
               "q4": "wing in a propeller slipstream", "q5": "turbulence and shock waves"}
    (data / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    test = [("q1", "d8", 2), ("q1", "d4", 1), ("q2", "d2", 1), ("q2", "d6", 2), ("q3", "d3", 1)]
    dev = [("q4", "d1", 2), ("q4", "d4", 1), ("q5", "d9", 1), ("q5", "d7", 1)]
    for split, rows in (("test", test), ("dev", dev)):
        (data / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in rows))
    return model_dir, data


def test_cli_eval_backend_qdrant_writes_the_same_json(saved_model_and_data, tmp_path, capsys):
    model_dir, data = saved_model_and_data
    common = ["eval", "--model", str(model_dir), "--data", str(data), "--k-values", "1", "3", "10"]
    cli_main([*common, "--output", str(tmp_path / "default.json")])
    cli_main([*common, "--backend", "qdrant", "--qdrant", str(tmp_path / "index"), "--output", str(tmp_path / "q.json")])
    assert "Qdrant (" in capsys.readouterr().out
    default = json.loads((tmp_path / "default.json").read_text())
    through_qdrant = json.loads((tmp_path / "q.json").read_text())
    assert default.pop("index_bytes_per_passage") == through_qdrant.pop("index_bytes_per_passage")
    assert default.keys() == through_qdrant.keys() == {"dense", "sparse", "colbert", "dense+sparse", "all"}
    for ranking in default:  # a 10-document corpus: the hybrids' candidates are the whole corpus
        assert default[ranking].keys() == through_qdrant[ranking].keys()
        for metric, value in default[ranking].items():
            assert through_qdrant[ranking][metric] == pytest.approx(value, abs=1e-6), (ranking, metric)


def test_cli_eval_fit_weights_writes_only_to_output_and_uses_them(saved_model_and_data, tmp_path, capsys):
    """--fit-weights writes the fitted weights into --output only (never silently beside the model); an --output
    named hybrid_weights.json beside the model makes them the model's default."""
    from flagm3.evaluation import evaluate_retrieval, load_beir
    from flagm3.hybrid_weights import WEIGHT_GRID, read_hybrid_weights

    model_dir, data = saved_model_and_data
    before = sorted(p.name for p in model_dir.iterdir())
    cli_main(["eval", "--model", str(model_dir), "--data", str(data), "--fit-weights", "dev",
              "--output", str(tmp_path / "fitted.json")])
    assert "hybrid weights fitted on dev" in capsys.readouterr().out
    assert sorted(p.name for p in model_dir.iterdir()) == before  # nothing written beside the model
    written = json.loads((tmp_path / "fitted.json").read_text())
    saved = written["hybrid_weights"]
    assert saved["split"] == "dev" and saved["grid_size"] == 2 * 7 * 6 - 1
    assert saved["value"] > saved["baseline_value"] and saved["weights"] != saved["baseline_weights"]
    assert all(saved["weights"][h] in WEIGHT_GRID[h] for h in WEIGHT_GRID)
    assert read_hybrid_weights(tmp_path / "fitted.json") == saved["weights"]
    assert M3Embedder(str(model_dir)).hybrid_weights is None
    corpus, queries, qrels = load_beir(data, "test")
    expected = evaluate_retrieval(M3Embedder(str(model_dir)), corpus, queries, qrels,
                                  hybrid_weights=saved["weights"], show_progress=False)
    assert written["all"] == pytest.approx(expected["all"])  # the evaluation after fitting used them
    # asked for: the output beside the model is the file M3Embedder, eval and search read
    target = model_dir / "hybrid_weights.json"
    try:
        cli_main(["eval", "--model", str(model_dir), "--data", str(data), "--fit-weights", "dev",
                  "--output", str(target)])
        assert M3Embedder(str(model_dir)).hybrid_weights == saved["weights"]
        cli_main(["eval", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "again.json")])
        assert json.loads((tmp_path / "again.json").read_text())["all"] == pytest.approx(expected["all"])
    finally:
        target.unlink(missing_ok=True)
