"""ONNX and sentence-transformers exports give the PyTorch model's vectors and scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SENTENCES

from flagm3 import M3Embedder, M3Model
from flagm3.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")

QUERIES = SENTENCES[:3]
FITTED = {"dense": 1.0, "sparse": 0.5, "colbert": 0.25}


@pytest.fixture()
def model_dir(tiny_encoder_dir, tiny_tokenizer, tmp_path):
    """A saved flagm3 checkpoint with an active sparse head and fitted hybrid weights beside it."""
    torch.manual_seed(0)
    model = M3Model.from_encoder(str(tiny_encoder_dir), colbert_dim=16, pooling="mean").eval()
    with torch.no_grad():
        model.sparse_linear.bias.fill_(0.1)
    directory = tmp_path / "m3"
    model.save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    (directory / "hybrid_weights.json").write_text(json.dumps({"weights": FITTED}))
    return directory


def _encode_all(embedder):
    return embedder.encode(SENTENCES, batch_size=4, return_dense=True, return_sparse=True,
                           return_colbert_vecs=True, show_progress=False)


def _assert_same_outputs(a, b, atol):
    np.testing.assert_allclose(a["dense_vecs"], b["dense_vecs"], atol=atol)
    for x, y in zip(a["lexical_weights"], b["lexical_weights"]):
        assert x.keys() == y.keys()
        np.testing.assert_allclose([x[k] for k in x], [y[k] for k in x], atol=atol)
    for x, y in zip(a["colbert_vecs"], b["colbert_vecs"]):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, atol=atol)


def test_onnx_export_equals_pytorch(model_dir, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    cli_main(["export", "--model", str(model_dir), "--output", str(out), "--format", "onnx"])
    meta = json.loads((out / "flagm3_onnx.json").read_text())
    assert meta["outputs"] == ["dense", "sparse", "colbert"] and meta["quantization"] is None
    assert (out / "hybrid_weights.json").is_file()  # fitted weights travel with the export

    torch_embedder, onnx_embedder = M3Embedder(str(model_dir)), M3Embedder(str(out))
    assert type(onnx_embedder.model).__name__ == "OnnxM3Model"
    assert onnx_embedder.pooling_method == "mean"
    # other batch sizes and lengths than the traced sample: dynamic axes
    _assert_same_outputs(_encode_all(torch_embedder), _encode_all(onnx_embedder), atol=1e-4)
    single = onnx_embedder.encode(SENTENCES[0], return_sparse=True)
    np.testing.assert_allclose(single["dense_vecs"], torch_embedder.encode(SENTENCES[0])["dense_vecs"], atol=1e-4)
    pairs = list(zip(QUERIES, SENTENCES[3:6]))
    expected, got = torch_embedder.compute_score(pairs), onnx_embedder.compute_score(pairs)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-4)
    # both read the fitted weights beside the model: compute_score's default hybrid uses them
    assert onnx_embedder.hybrid_weights == torch_embedder.hybrid_weights == FITTED
    modes = np.array([got["dense"], got["sparse"], got["colbert"]])
    weights = np.array([FITTED["dense"], FITTED["sparse"], FITTED["colbert"]])
    np.testing.assert_allclose(got["colbert+sparse+dense"], weights @ modes / weights.sum(), atol=1e-6)


def test_onnx_export_refuses_other_pooling(model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from flagm3.export import export_onnx

    export_onnx(M3Model.from_pretrained(str(model_dir)), _tokenizer(model_dir), str(tmp_path / "onnx"))
    with pytest.raises(ValueError, match="pooling_method='cls' but the ONNX graph"):
        M3Embedder(str(tmp_path / "onnx"), pooling_method="cls")


def test_onnx_int8_quantisation_stays_close(model_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "int8"
    cli_main(["export", "--model", str(model_dir), "--output", str(out), "--format", "onnx", "--quantize"])
    assert json.loads((out / "flagm3_onnx.json").read_text())["quantization"] == "int8-dynamic"
    assert not (out / "model.float32.onnx").exists()
    full = _encode_all(M3Embedder(str(model_dir)))["dense_vecs"]
    quant = _encode_all(M3Embedder(str(out)))["dense_vecs"]
    assert not np.allclose(full, quant, atol=1e-6)  # really quantised
    cosine = (full * quant).sum(1)  # both normalised
    assert cosine.min() > 0.95


def _tokenizer(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def test_quantize_needs_onnx(model_dir, tmp_path):
    with pytest.raises(SystemExit, match="--quantize applies to --format onnx only"):
        cli_main(["export", "--model", str(model_dir), "--output", str(tmp_path / "x"), "--quantize"])


def test_sentence_transformers_export(model_dir, tmp_path, capsys):
    st = pytest.importorskip("sentence_transformers")
    out = tmp_path / "st"
    cli_main(["export", "--model", str(model_dir), "--output", str(out), "--format", "sentence-transformers"])
    printed = capsys.readouterr().out
    assert "wrote the sparse head" in printed
    summary = json.loads((out / "flagm3_export.json").read_text())
    assert "sparse" in summary["written"] and "dense" in summary["written"]

    embedder = M3Embedder(str(model_dir))
    reference = _encode_all(embedder)
    dense = st.SentenceTransformer(str(out), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    np.testing.assert_allclose(dense, reference["dense_vecs"], atol=1e-5)

    if not hasattr(st, "MultiVectorEncoder"):
        assert "colbert" in summary["left_out"]
        return
    assert summary["written"]["colbert"] == str(out / "colbert")
    colbert = st.MultiVectorEncoder(str(out / "colbert"), device="cpu")
    docs = colbert.encode_document(SENTENCES)
    for got, expected in zip(docs, reference["colbert_vecs"]):
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
    scores = np.asarray(colbert.similarity(colbert.encode_query(QUERIES), docs))
    expected = [[float(embedder.colbert_score(reference["colbert_vecs"][i], d)) for d in reference["colbert_vecs"]]
                for i in range(len(QUERIES))]
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_exports_of_the_bge_m3_architecture(tmp_path):
    """XLM-RoBERTa (positions from the padding id, SentencePiece) as BGE-M3: ONNX and sentence-transformers."""
    pytest.importorskip("onnxruntime")
    from conftest import make_xlmr_dir
    from transformers import AutoTokenizer

    from flagm3.export import export_onnx

    encoder = make_xlmr_dir(tmp_path / "xlmr")
    tokenizer = AutoTokenizer.from_pretrained(str(encoder))
    torch.manual_seed(0)
    model = M3Model.from_encoder(str(encoder), tokenizer=tokenizer).eval()  # ColBERT size = hidden, CLS pooling
    with torch.no_grad():
        model.sparse_linear.bias.fill_(0.1)
    export_onnx(model, tokenizer, str(tmp_path / "onnx"))
    reference = _encode_all(M3Embedder(model, tokenizer=tokenizer))
    _assert_same_outputs(reference, _encode_all(M3Embedder(str(tmp_path / "onnx"))), atol=1e-4)
    st = pytest.importorskip("sentence_transformers")
    from flagm3.export import export_sentence_transformers

    export_sentence_transformers(model, tokenizer, str(tmp_path / "st"))
    dense = st.SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    np.testing.assert_allclose(dense, reference["dense_vecs"], atol=1e-5)


def test_hybrid_weight_files_have_one_owner(tmp_path):
    """flagm3.hybrid_weights writes and reads hybrid_weights.json (export.py only copies it): a round trip, a
    malformed file named, and the file export copies is the one the module writes."""
    import ast
    from pathlib import Path

    import flagm3.export as export
    from flagm3.hybrid_weights import HYBRID_WEIGHTS_FILE, read_hybrid_weights, save_hybrid_weights

    fitted = {"weights": FITTED, "metric": "ndcg@10", "split": "dev"}
    path = save_hybrid_weights(str(tmp_path), fitted)
    assert path == str(tmp_path / HYBRID_WEIGHTS_FILE) and read_hybrid_weights(tmp_path) == FITTED
    assert read_hybrid_weights(tmp_path / "elsewhere") is None and read_hybrid_weights("org/hub-id") is None
    (tmp_path / HYBRID_WEIGHTS_FILE).write_text('{"weights": {"dense": 1}}')
    with pytest.raises(ValueError, match=r"hybrid_weights\.json: expected"):
        read_hybrid_weights(tmp_path)
    assert export.SIDE_FILES == (HYBRID_WEIGHTS_FILE,)
    source = Path(export.__file__).read_text(encoding="utf-8")
    defined = {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
    assert not defined & {"read_hybrid_weights", "save_hybrid_weights"} and "json.load(" not in source
