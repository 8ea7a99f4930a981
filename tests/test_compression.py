"""Smaller vectors at encode time (flagm3.compression): truncation, ColBERT token pooling and sparse pruning by
hand on small tensors, and the same compressed vectors from M3Embedder, its ONNX export, a Qdrant collection and
the sentence-transformers export (the sparse head through SparseEncoder included)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SENTENCES

from flagm3 import M3Embedder, M3Model
from flagm3.cli import main as cli_main
from flagm3.compression import (
    Compression,
    PassageStats,
    index_bytes_per_passage,
    pool_tokens,
    prune_lexical,
    truncate,
)

pytestmark = pytest.mark.usefixtures("one_thread")
COMPRESSION = Compression(dense_dim=8, colbert_dim=6, pool_factor=2, sparse_top_k=3)


def test_truncate_renormalises_and_keeps_padding_zero():
    vecs = torch.tensor([[[3.0, 4.0, 12.0], [0.0, 0.0, 0.0]]])
    torch.testing.assert_close(truncate(vecs, 2, True), torch.tensor([[[0.6, 0.8], [0.0, 0.0]]]))
    torch.testing.assert_close(truncate(vecs, 2, False), vecs[..., :2])
    assert truncate(vecs, 3, True) is vecs and truncate(vecs, None, True) is vecs


def test_pool_tokens_by_hand():
    """Tokens 0 and 2 are near e1, 1 and 3 near e2: factor 2 gives two clusters, each the renormalised mean,
    in the order of their first token; 5 tokens at factor 2 give 2 vectors; factor 1 changes nothing."""
    a, b = torch.tensor([1.0, 0.1, 0.0]), torch.tensor([0.0, 1.0, 0.2])
    vecs = torch.stack([a, b, a + torch.tensor([0, 0.05, 0]), b + torch.tensor([0, 0, 0.05])])
    pooled = pool_tokens(vecs, 2, normalize=False)
    torch.testing.assert_close(pooled, torch.stack([(vecs[0] + vecs[2]) / 2, (vecs[1] + vecs[3]) / 2]))
    torch.testing.assert_close(pool_tokens(vecs, 2), torch.nn.functional.normalize(pooled, dim=-1))
    assert pool_tokens(torch.cat([vecs, a[None]]), 2).shape == (2, 3)
    one = vecs[:1]
    assert pool_tokens(vecs, 1) is vecs and pool_tokens(one, 4) is one
    assert pool_tokens(vecs, 8).shape == (1, 3)  # at least one vector


def test_prune_lexical_by_hand():
    """Text 0: token 5 (max .9 over two positions), 7 (.4), 9 (.4), 2 (.1); top 2: 5 and the lower id of the
    tie, 7. Text 1 has one token: kept. Threshold .3 drops token 2 only."""
    ids = torch.tensor([[5, 7, 9, 5, 2], [4, 1, 1, 1, 1]])
    weights = torch.tensor([[0.2, 0.4, 0.4, 0.9, 0.1], [0.5, 0, 0, 0, 0]])
    torch.testing.assert_close(prune_lexical(ids, weights, top_k=2),
                               torch.tensor([[0.2, 0.4, 0.0, 0.9, 0.0], [0.5, 0, 0, 0, 0]]))
    torch.testing.assert_close(prune_lexical(ids, weights, threshold=0.3),
                               torch.tensor([[0.0, 0.4, 0.4, 0.9, 0.0], [0.5, 0, 0, 0, 0]]))
    assert prune_lexical(ids, weights) is weights


def test_index_bytes():
    assert index_bytes_per_passage(256, 10.5, 20, 128) == {"dense": 1024, "sparse": 84, "colbert": 10240}
    assert index_bytes_per_passage(256, 10, 20, 128, "int8") == {"dense": 256, "sparse": 80, "colbert": 2560}
    assert index_bytes_per_passage(256, 0, 20, 128, "binary")["colbert"] == 320
    stats = PassageStats()
    stats.update({"sparse_ids": torch.tensor([[5, 5, 7], [3, 1, 1]]),
                  "sparse_weights": torch.tensor([[0.1, 0.2, 0.3], [0.0, 0.0, 0.0]]),
                  "colbert_mask": torch.tensor([[1, 1], [1, 0]])})
    assert (stats.texts, stats.mean_sparse_entries(), stats.mean_colbert_vectors()) == (2, 1.0, 1.5)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="pool_factor must be >= 1"):
        Compression(pool_factor=0)
    with pytest.raises(ValueError, match="dense_dim must be a positive integer"):
        Compression(dense_dim=0)


# ------------------------------------------------------------------------------------------------- parity
@pytest.fixture()
def model_dir(tiny_encoder_dir, tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = M3Model.from_encoder(str(tiny_encoder_dir), colbert_dim=16).eval()
    with torch.no_grad():
        model.sparse_linear.bias.fill_(0.1)
    directory = tmp_path / "m3"
    model.save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


def encode_both(embedder):
    kwargs = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True, show_progress=False)
    return embedder.encode_corpus(SENTENCES, batch_size=4, **kwargs), embedder.encode_queries(SENTENCES[:3], **kwargs)


def test_embedder_applies_dims_to_both_sides_and_the_rest_to_passages(model_dir):
    plain = M3Embedder(str(model_dir))
    full_p, full_q = encode_both(plain)
    small_p, small_q = encode_both(M3Embedder(str(model_dir), compression=COMPRESSION))
    assert small_p["dense_vecs"].shape[1] == small_q["dense_vecs"].shape[1] == 8
    np.testing.assert_allclose(small_q["dense_vecs"], truncate(torch.tensor(full_q["dense_vecs"]), 8, True).numpy(),
                               atol=1e-6)
    for full, small in zip(full_q["colbert_vecs"], small_q["colbert_vecs"]):  # queries: never pooled
        np.testing.assert_allclose(small, truncate(torch.tensor(full), 6, True).numpy(), atol=1e-6)
    for full, small in zip(full_p["colbert_vecs"], small_p["colbert_vecs"]):
        want = pool_tokens(truncate(torch.tensor(full), 6, True), 2).numpy()
        np.testing.assert_allclose(small, want, atol=1e-6)
        assert small.shape[0] == max(1, full.shape[0] // 2)
    for full, small in zip(full_p["lexical_weights"], small_p["lexical_weights"]):
        best = sorted(full.items(), key=lambda kv: (-kv[1], int(kv[0])))[:3]
        assert small == pytest.approx(dict(best))
    for full, small in zip(full_q["lexical_weights"], small_q["lexical_weights"]):
        assert small == pytest.approx(full)  # queries are not pruned
    # per-call arguments override the embedder's settings
    once = plain.encode(SENTENCES[:2], dense_dim=4, pool_factor=3, return_colbert_vecs=True, show_progress=False)
    assert once["dense_vecs"].shape == (2, 4)
    with pytest.raises(ValueError, match="never pooled"):
        plain.encode_queries(SENTENCES[:2], pool_factor=2)


def test_onnx_export_carries_the_compression(model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    cli_main(["export", "--model", str(model_dir), "--output", str(out), "--format", "onnx", "--dense-dim", "8",
              "--colbert-dim", "6"])
    meta = json.loads((out / "flagm3_onnx.json").read_text())
    assert meta["compression"] == {"dense_dim": 8, "colbert_dim": 6}
    compression = Compression(dense_dim=8, colbert_dim=6, pool_factor=2, sparse_top_k=3)
    want_p, want_q = encode_both(M3Embedder(str(model_dir), compression=compression))
    onnx = M3Embedder(str(out), compression=compression)
    got_p, got_q = encode_both(onnx)
    for want, got in ((want_p, got_p), (want_q, got_q)):
        np.testing.assert_allclose(got["dense_vecs"], want["dense_vecs"], atol=1e-5)
        for x, y in zip(got["colbert_vecs"], want["colbert_vecs"]):
            assert x.shape == y.shape
            np.testing.assert_allclose(x, y, atol=1e-5)
        for x, y in zip(got["lexical_weights"], want["lexical_weights"]):
            assert x.keys() == y.keys() and x == pytest.approx(y, abs=1e-5)
    # the graph itself gives the small vectors; the export's own settings are the default
    assert M3Embedder(str(out)).compression == Compression(dense_dim=8, colbert_dim=6)
    assert onnx.model(**onnx.tokenizer(["a wing"], return_tensors="pt")).dense.shape == (1, 8)


def test_qdrant_collection_stores_the_compressed_vectors(model_dir):
    pytest.importorskip("qdrant_client")
    from flagm3 import qdrant
    embedder = M3Embedder(str(model_dir), compression=COMPRESSION, batch_size=4)
    corpus = {f"d{i}": t for i, t in enumerate(SENTENCES)}
    client = qdrant.connect(":memory:")
    try:
        summary = qdrant.index_corpus(embedder, client, "c", corpus, show_progress=False, quantization="int8")
        params = client.get_collection("c").config.params.vectors
        assert (params["dense"].size, params["colbert"].size) == (8, 6)
        assert params["colbert"].quantization_config is not None
        want = embedder.encode_corpus(list(corpus.values()), return_dense=True, return_sparse=True,
                                      return_colbert_vecs=True, show_progress=False)
        points = client.retrieve("c", ids=[qdrant.point_id(d) for d in corpus], with_vectors=True)
        for row, point in enumerate(points):
            np.testing.assert_allclose(point.vector["dense"], want["dense_vecs"][row], atol=1e-6)
            np.testing.assert_allclose(point.vector["colbert"], want["colbert_vecs"][row], atol=1e-6)
            assert len(point.vector["sparse"].indices) == min(3, len(want["lexical_weights"][row]))
        colbert_vectors = np.mean([len(v) for v in want["colbert_vecs"]])
        sparse_entries = np.mean([len(w) for w in want["lexical_weights"]])
        assert summary["bytes_per_passage"] == pytest.approx(
            index_bytes_per_passage(8, sparse_entries, colbert_vectors, 6, "int8"))
        # search with a ColBERT rerank over the pooled passage vectors: scores as the embedder's
        queries = qdrant.encode_queries(embedder, [SENTENCES[2]])
        hits = qdrant.search(client, "c", queries, mode="colbert", limit=3, exact=True)[0]
        q = embedder.encode_queries([SENTENCES[2]], return_dense=False, return_colbert_vecs=True)["colbert_vecs"][0]
        for hit in hits:
            row = list(corpus).index(hit["doc_id"])
            assert hit["score"] == pytest.approx(float(embedder.colbert_score(q, want["colbert_vecs"][row])), abs=1e-5)
        assert qdrant.search(client, "c", queries, mode="hybrid", rerank=True, limit=3)[0]
    finally:
        client.close()


def test_sentence_transformers_export_with_sparse_encoder(model_dir, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from flagm3.st_modules import M3SparsePooling

    out = tmp_path / "st"
    cli_main(["export", "--model", str(model_dir), "--output", str(out), "--format", "sentence-transformers",
              "--dense-dim", "8", "--colbert-dim", "6"])
    embedder = M3Embedder(str(model_dir), compression=Compression(dense_dim=8, colbert_dim=6))
    want = embedder.encode(SENTENCES, return_dense=True, return_sparse=True, return_colbert_vecs=True,
                           show_progress=False)
    # a module outside sentence-transformers: ST asks for trust_remote_code (the code is flagm3's, installed)
    sparse = st.SparseEncoder(str(out / "sparse"), device="cpu", trust_remote_code=True)
    assert isinstance(sparse[-1], M3SparsePooling)
    got = sparse.encode(SENTENCES, convert_to_tensor=True).to_dense()
    for row, lexical in enumerate(want["lexical_weights"]):
        nonzero = got[row].nonzero().flatten().tolist()
        assert sorted(nonzero) == sorted(int(k) for k in lexical)
        np.testing.assert_allclose([float(got[row, int(k)]) for k in lexical], list(lexical.values()), atol=1e-5)
    dense = st.SentenceTransformer(str(out), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    np.testing.assert_allclose(dense, want["dense_vecs"], atol=1e-5)
    if hasattr(st, "MultiVectorEncoder"):
        docs = st.MultiVectorEncoder(str(out / "colbert"), device="cpu").encode_document(SENTENCES)
        for x, y in zip(docs, want["colbert_vecs"]):
            np.testing.assert_allclose(np.asarray(x), y, atol=1e-5)


def test_cli_eval_reports_index_bytes_of_the_compressed_model(model_dir, tmp_path):
    data = tmp_path / "beir"
    (data / "qrels").mkdir(parents=True)
    corpus = {f"d{i}": t for i, t in enumerate(SENTENCES)}
    (data / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": t}) + "\n" for d, t in corpus.items()))
    (data / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "flutter of wings"}) + "\n")
    (data / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td8\t1\n")
    out = tmp_path / "eval.json"
    cli_main(["eval", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--dense-dim", "8",
              "--colbert-dim", "6", "--pool-factor", "2", "--sparse-top-k", "3", "--k-values", "10"])
    written = json.loads(out.read_text())
    want = M3Embedder(str(model_dir), compression=COMPRESSION).encode_corpus(
        list(corpus.values()), return_sparse=True, return_colbert_vecs=True, show_progress=False)
    sizes = written["index_bytes_per_passage"]
    assert sizes["dense"] == 32 and sizes["sparse"] == pytest.approx(8 * np.mean([len(w) for w in want["lexical_weights"]]))
    assert sizes["colbert"] == pytest.approx(6 * 4 * np.mean([len(v) for v in want["colbert_vecs"]]))
    assert {"dense", "sparse", "colbert", "all"} <= written.keys()
