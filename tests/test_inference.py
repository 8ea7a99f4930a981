"""M3Embedder against an independent per-text implementation, and its scoring helpers against dict loops."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch
import torch.nn.functional as F
from conftest import SENTENCES

from flagm3 import M3Model
from flagm3.inference import M3Embedder, compute_lexical_matching_scores, lexical_matrix
from flagm3.scoring import pool_lexical

# Varied lengths (so length sorting reorders them), repeated tokens, an unknown character ([UNK]) and an
# empty text.
TEXTS = [
    "wing",
    SENTENCES[0],
    "wing wing flow wing flow",
    "ζ the shock ζ waves",
    SENTENCES[3] + " " + SENTENCES[4],
    "",
    SENTENCES[7],
]
MAX_LENGTH = 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is fastest and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def embedder(tiny_model, tiny_tokenizer):
    return M3Embedder(tiny_model, tokenizer=tiny_tokenizer, use_fp16=False, batch_size=3)


def reference_encode(model: M3Model, tokenizer, text: str, max_length: int) -> dict:
    """Straightforward BGE-M3 encoding of one text, no batching or padding."""
    ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model.encoder(input_ids=ids).last_hidden_state[0]  # [L, H]
        dense = F.normalize(hidden[0], dim=-1)
        weights = torch.relu(model.sparse_linear(hidden)).squeeze(-1)
        colbert = F.normalize(model.colbert_linear(hidden[1:]), dim=-1)
    dropped = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    lexical: dict[str, float] = {}
    for token, w in zip(ids[0].tolist(), weights.tolist()):
        if token not in dropped and w > 0:
            lexical[str(token)] = max(w, lexical.get(str(token), 0.0))
    return {"dense": dense.numpy(), "lexical": lexical, "colbert": colbert.numpy(), "ids": ids[0].tolist(),
            "weights": weights.tolist()}


def dict_loop_score(a: dict, b: dict) -> float:
    return sum(w * b[t] for t, w in a.items() if t in b)


def assert_lexical_close(ours: dict, ref: dict, atol: float = 1e-5) -> None:
    assert set(ours) == set(ref)
    for token, w in ref.items():
        assert ours[token] == pytest.approx(w, abs=atol), token


# ------------------------------------------------------------------------------------------- encoding
def test_encode_matches_independent_implementation(embedder, tiny_model, tiny_tokenizer):
    with torch.no_grad():  # a sparse bias that keeps every token of TEXTS[2] (repeats) above the ReLU
        ids = tiny_tokenizer(TEXTS[2], return_tensors="pt")
        pre = tiny_model.sparse_linear(tiny_model.encoder(**ids).last_hidden_state).squeeze(-1)
        tiny_model.sparse_linear.bias.sub_(pre.min() - 0.01)
    out = embedder.encode(TEXTS, max_length=MAX_LENGTH, return_sparse=True, return_colbert_vecs=True)
    refs = [reference_encode(tiny_model, tiny_tokenizer, t, MAX_LENGTH) for t in TEXTS]
    assert out["dense_vecs"].shape == (len(TEXTS), 32) and out["dense_vecs"].dtype == np.float32
    assert tiny_tokenizer.unk_token_id in refs[3]["ids"]  # the [UNK] case is exercised
    assert max(len(r["ids"]) for r in refs) == MAX_LENGTH  # and truncation
    for i, ref in enumerate(refs):
        np.testing.assert_allclose(out["dense_vecs"][i], ref["dense"], atol=1e-5)
        assert_lexical_close(out["lexical_weights"][i], ref["lexical"])
        assert out["colbert_vecs"][i].shape == (len(ref["ids"]) - 1, 16)
        np.testing.assert_allclose(out["colbert_vecs"][i], ref["colbert"], atol=1e-5)
    assert out["lexical_weights"][5] == {}  # "" is [CLS] [SEP], both dropped
    # the max over repeats is exercised: a repeated token has different positive weights
    per_token: dict[int, set] = {}
    for token, w in zip(refs[2]["ids"], refs[2]["weights"]):
        per_token.setdefault(token, set()).add(round(w, 6))
    assert any(len(ws) > 1 and max(ws) > 0 for ws in per_token.values())


def test_encode_order_and_single_text(embedder):
    out = embedder.encode(TEXTS, max_length=MAX_LENGTH, return_sparse=True, return_colbert_vecs=True)
    perm = [4, 0, 6, 2, 5, 1, 3]
    shuffled = embedder.encode([TEXTS[i] for i in perm], max_length=MAX_LENGTH, batch_size=2,
                               return_sparse=True, return_colbert_vecs=True)
    np.testing.assert_allclose(shuffled["dense_vecs"], out["dense_vecs"][perm], atol=1e-6)
    for j, i in enumerate(perm):
        assert_lexical_close(shuffled["lexical_weights"][j], out["lexical_weights"][i])
        np.testing.assert_allclose(shuffled["colbert_vecs"][j], out["colbert_vecs"][i], atol=1e-6)
    single = embedder.encode(TEXTS[1], max_length=MAX_LENGTH, return_sparse=True, return_colbert_vecs=True)
    np.testing.assert_allclose(single["dense_vecs"], out["dense_vecs"][1], atol=1e-6)
    assert_lexical_close(single["lexical_weights"], out["lexical_weights"][1])
    only_dense = embedder.encode(TEXTS, max_length=MAX_LENGTH)
    assert only_dense["lexical_weights"] is None and only_dense["colbert_vecs"] is None
    assert embedder.encode([], max_length=MAX_LENGTH)["dense_vecs"].shape == (0, 32)


def test_iter_outputs_contract(embedder, tiny_tokenizer):
    lengths = [len(tiny_tokenizer(t, truncation=True, max_length=MAX_LENGTH)["input_ids"]) for t in TEXTS]
    seen, previous_max = [], None
    embedder.model.train()
    for indices, out in embedder.iter_outputs(TEXTS, MAX_LENGTH, batch_size=3, show_progress=False):
        assert torch.is_grad_enabled()  # no inference mode leaks out between batches
        b, L = len(indices), max(lengths[i] for i in indices)
        assert b <= 3 and (previous_max is None or L <= previous_max)  # longest first
        previous_max = min(lengths[i] for i in indices)
        assert set(out) == {"dense", "sparse_ids", "sparse_weights", "colbert", "colbert_mask"}
        assert out["dense"].shape == (b, 32) and out["dense"].dtype == torch.float32
        assert out["sparse_ids"].shape == out["sparse_weights"].shape == (b, L)
        assert out["colbert"].shape == (b, L - 1, 16) and out["colbert_mask"].shape == (b, L - 1)
        for t in out.values():
            assert t.device.type == "cpu" and not t.is_inference() and not t.requires_grad
        for row, i in enumerate(indices):
            assert out["sparse_ids"][row, : lengths[i]].tolist() == tiny_tokenizer(
                TEXTS[i], truncation=True, max_length=MAX_LENGTH)["input_ids"]
            assert out["colbert_mask"][row].sum() == lengths[i] - 1
            assert (out["sparse_weights"][row, lengths[i]:] == 0).all()
            assert (out["colbert"][row, lengths[i] - 1:] == 0).all()
        seen += indices
    assert sorted(seen) == list(range(len(TEXTS)))
    assert embedder.model.training  # mode restored
    _, out = next(iter(embedder.iter_outputs(TEXTS, MAX_LENGTH, heads=("sparse",), show_progress=False)))
    assert set(out) == {"sparse_ids", "sparse_weights"}
    with pytest.raises(ValueError, match="heads"):
        next(iter(embedder.iter_outputs(TEXTS, MAX_LENGTH, heads=("dense", "bm25"))))


def test_instructions_and_truncate_dim(tiny_model, tiny_tokenizer):
    emb = M3Embedder(tiny_model, tokenizer=tiny_tokenizer, query_instruction_for_retrieval="wing: ",
                     passage_instruction_for_retrieval="flow ", passage_instruction_format="{}\\n{}")
    q = emb.encode_queries(TEXTS[:3])["dense_vecs"]
    np.testing.assert_allclose(q, emb.encode(["wing: " + t for t in TEXTS[:3]])["dense_vecs"], atol=1e-6)
    p = emb.encode_corpus(TEXTS[:3])["dense_vecs"]
    np.testing.assert_allclose(p, emb.encode(["flow \n" + t for t in TEXTS[:3]])["dense_vecs"], atol=1e-6)
    full = emb.encode(TEXTS, return_colbert_vecs=True)
    emb.truncate_dim = 8
    cut = emb.encode(TEXTS, return_colbert_vecs=True)
    np.testing.assert_allclose(cut["dense_vecs"], F.normalize(torch.tensor(full["dense_vecs"][:, :8]), dim=-1),
                               atol=1e-6)
    np.testing.assert_allclose(cut["colbert_vecs"][1],
                               F.normalize(torch.tensor(full["colbert_vecs"][1][:, :8]), dim=-1), atol=1e-6)


def test_loading_from_directories(tiny_model, tiny_tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path / "flagm3")
    tiny_tokenizer.save_pretrained(tmp_path / "flagm3")
    tiny_model.save_bge_m3(str(tmp_path / "bge"), tiny_tokenizer)
    expected = M3Embedder(tiny_model, tokenizer=tiny_tokenizer).encode(TEXTS, return_sparse=True)
    for layout in ("flagm3", "bge"):
        emb = M3Embedder(str(tmp_path / layout), use_fp16=False)
        assert emb.device.type == "cpu" and emb.model.config.colbert_output_dim == 16
        got = emb.encode(TEXTS, return_sparse=True)
        np.testing.assert_allclose(got["dense_vecs"], expected["dense_vecs"], atol=1e-6)
        for a, b in zip(got["lexical_weights"], expected["lexical_weights"]):
            assert_lexical_close(a, b)
    mean = M3Embedder(str(tmp_path / "flagm3"), pooling_method="mean", normalize_embeddings=False)
    assert (mean.model.config.pooling, mean.normalize_embeddings) == ("mean", False)
    with pytest.raises(ValueError, match="normalize_embeddings"):
        M3Embedder(tiny_model, tokenizer=tiny_tokenizer, normalize_embeddings=False)
    with pytest.raises(ValueError, match="tokenizer"):
        M3Embedder(tiny_model)
    with pytest.raises(ValueError, match="colbert_dim"):
        M3Embedder(tiny_model, tokenizer=tiny_tokenizer, colbert_dim=8)


# -------------------------------------------------------------------------------------------- scoring
def test_compute_score_keys_and_formulas(embedder):
    queries, passages = TEXTS[:4], TEXTS[2:]
    pairs = [(q, p) for q in queries for p in passages]
    q = embedder.encode(queries, max_length=8, return_sparse=True, return_colbert_vecs=True)
    p = embedder.encode(passages, max_length=MAX_LENGTH, return_sparse=True, return_colbert_vecs=True)
    w = [0.4, 0.2, 0.4]
    scores = embedder.compute_score(pairs, batch_size=4, max_query_length=8, max_passage_length=MAX_LENGTH,
                                    weights_for_different_modes=w)
    assert set(scores) == {"dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense"}
    dense = np.array([[a @ b for b in p["dense_vecs"]] for a in q["dense_vecs"]]).ravel()
    sparse = np.array([[dict_loop_score(a, b) for b in p["lexical_weights"]] for a in q["lexical_weights"]]).ravel()
    colbert = np.array([[(a @ b.T).max(1).mean() for b in p["colbert_vecs"]] for a in q["colbert_vecs"]]).ravel()
    np.testing.assert_allclose(scores["dense"], dense, atol=1e-5)
    np.testing.assert_allclose(scores["sparse"], sparse, atol=1e-5)
    np.testing.assert_allclose(scores["colbert"], colbert, atol=1e-5)
    np.testing.assert_allclose(scores["sparse+dense"], (0.4 * dense + 0.2 * sparse) / 0.6, atol=1e-5)
    np.testing.assert_allclose(scores["colbert+sparse+dense"], (0.4 * dense + 0.2 * sparse + 0.4 * colbert),
                               atol=1e-5)
    default = embedder.compute_score(pairs, max_query_length=8, max_passage_length=MAX_LENGTH)
    np.testing.assert_allclose(default["colbert+sparse+dense"], (dense + sparse + colbert) / 3, atol=1e-5)
    one = embedder.compute_score(pairs[5], max_query_length=8, max_passage_length=MAX_LENGTH)
    assert isinstance(one["dense"], float) and one["dense"] == pytest.approx(dense[5], abs=1e-5)
    colbert_only = embedder.compute_score(pairs[:2], weights_for_different_modes=[0, 0, 1])
    assert np.isnan(colbert_only["sparse+dense"]).all()  # 0/0, as FlagEmbedding
    assert embedder.compute_score([]) == []
    for i, a in enumerate(q["colbert_vecs"]):
        assert float(embedder.colbert_score(a, p["colbert_vecs"][0])) == pytest.approx(colbert[i * len(passages)],
                                                                                       abs=1e-5)


def test_lexical_matrix_scoring_equals_dict_loops(embedder, tiny_tokenizer):
    rng = np.random.default_rng(0)
    a = [{str(t): float(rng.random()) for t in rng.choice(50, rng.integers(0, 8), replace=False)} for _ in range(5)]
    b = [{str(t): float(rng.random()) for t in rng.choice(70, rng.integers(0, 8), replace=False)} for _ in range(6)]
    expected = np.array([[dict_loop_score(x, y) for y in b] for x in a])
    np.testing.assert_allclose(compute_lexical_matching_scores(a, b), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(embedder.compute_lexical_matching_score(a, b), expected, rtol=1e-6, atol=1e-7)
    assert embedder.compute_lexical_matching_score(a[1], b[2]) == pytest.approx(expected[1, 2], rel=1e-6)
    with pytest.raises(ValueError, match="not correct"):
        embedder.compute_lexical_matching_score(a[0], b)

    matrix = lexical_matrix(a, num_columns=100)
    assert isinstance(matrix, scipy.sparse.csr_matrix) and matrix.shape == (5, 100)
    dense = np.zeros((5, 100))
    for row, d in enumerate(a):
        for token, w in d.items():
            dense[row, int(token)] = w
    np.testing.assert_allclose(matrix.toarray(), dense, rtol=1e-6)
    with pytest.raises(ValueError, match="num_columns"):
        lexical_matrix(b, num_columns=10)
    with pytest.raises(ValueError, match="token id"):
        lexical_matrix([{"wing": 1.0}])

    # from pooled head outputs (the evaluator's path) = from the dicts encode() gives
    (q_idx, q_out), = embedder.iter_outputs(TEXTS[:3], MAX_LENGTH, heads=("sparse",), show_progress=False)
    blocks = list(embedder.iter_outputs(TEXTS, MAX_LENGTH, batch_size=3, heads=("sparse",), show_progress=False))
    corpus = scipy.sparse.vstack([lexical_matrix(pool_lexical(o["sparse_ids"], o["sparse_weights"]), len(tiny_tokenizer))
                                  for _, o in blocks]).tocsr()
    order = np.argsort([i for idx, _ in blocks for i in idx])
    pooled_scores = compute_lexical_matching_scores(pool_lexical(q_out["sparse_ids"], q_out["sparse_weights"]),
                                                    corpus[order])
    q = embedder.encode(TEXTS[:3], max_length=MAX_LENGTH, return_dense=False, return_sparse=True)["lexical_weights"]
    p = embedder.encode(TEXTS, max_length=MAX_LENGTH, return_dense=False, return_sparse=True)["lexical_weights"]
    expected = np.array([[dict_loop_score(x, y) for y in p] for x in q])
    np.testing.assert_allclose(pooled_scores[np.argsort(q_idx)], expected, rtol=1e-5, atol=1e-6)
    assert expected.max() > 0


def test_convert_id_to_token(embedder, tiny_tokenizer):
    wing = tiny_tokenizer.convert_tokens_to_ids("wing")
    assert embedder.convert_id_to_token({str(wing): 0.5}) == {"wing": 0.5}
    assert embedder.convert_id_to_token([{str(wing): 0.5}]) == [{"wing": 0.5}]


# ------------------------------------------------------------------------------------------ precision
def test_low_precision_paths(tiny_model, tiny_tokenizer):
    kwargs = dict(tokenizer=tiny_tokenizer, return_sparse=True, return_colbert_vecs=True)
    fp32 = M3Embedder(tiny_model, use_fp16=False, **kwargs).encode(TEXTS)
    # as FlagEmbedding: fp16 is ignored on CPU, where the model runs in float32
    fp16_cpu = M3Embedder(tiny_model, use_fp16=True, **kwargs)
    assert fp16_cpu.compute_dtype is None
    np.testing.assert_array_equal(fp16_cpu.encode(TEXTS)["dense_vecs"], fp32["dense_vecs"])
    bf16 = M3Embedder(tiny_model, use_bf16=True, **kwargs)
    assert bf16.compute_dtype == torch.bfloat16
    # bf16 really runs: the encoder's matmuls happen in bfloat16
    seen = []
    hook = tiny_model.encoder.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda mod, inp, out: seen.append(out.dtype))
    low = bf16.encode(TEXTS)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert low["dense_vecs"].dtype == np.float32
    assert not np.array_equal(low["dense_vecs"], fp32["dense_vecs"])
    np.testing.assert_allclose(low["dense_vecs"], fp32["dense_vecs"], atol=3e-2)
    for a, b in zip(low["colbert_vecs"], fp32["colbert_vecs"]):
        np.testing.assert_allclose(a, b, atol=5e-2)
    for a, b in zip(low["lexical_weights"], fp32["lexical_weights"]):
        for token in set(a) & set(b):
            assert a[token] == pytest.approx(b[token], abs=3e-2)
    cos = (low["dense_vecs"] * fp32["dense_vecs"]).sum(1)
    assert cos.min() > 0.999


def test_encode_lexical_dicts_carry_arrays_that_never_go_stale(embedder):
    """encode()'s dicts score without parsing their keys; any change to one drops its arrays, so the score
    follows the dict's items."""
    from flagm3.inference import LexicalDict

    p = embedder.encode(TEXTS[:3], max_length=MAX_LENGTH, return_dense=False, return_sparse=True)["lexical_weights"]
    assert all(isinstance(d, LexicalDict) and d.arrays is not None for d in p)
    assert all(list(d) == [str(t) for t in d.arrays[0]] and list(d.values()) == list(d.arrays[1]) for d in p)
    q = [dict(p[1])]
    before = compute_lexical_matching_scores(q, p)
    np.testing.assert_allclose(before, [[dict_loop_score(q[0], d) for d in p]], rtol=1e-6)
    token = next(iter(p[1]))
    for change in (lambda d: d.__setitem__(token, 10.0), lambda d: d.pop(token), lambda d: d.update({token: 3.0}),
                   lambda d: d.clear()):
        d = LexicalDict(*p[1].arrays)
        change(d)
        assert d.arrays is None
        np.testing.assert_allclose(compute_lexical_matching_scores(q, [d]), [[dict_loop_score(q[0], d)]], rtol=1e-6)



def test_convert_to_numpy_false_gives_tensors_of_the_same_values(embedder, tiny_model, tiny_tokenizer):
    """``convert_to_numpy`` is honoured (it was accepted and ignored): tensors instead of arrays, same numbers."""
    kwargs = {"max_length": MAX_LENGTH, "return_sparse": True, "return_colbert_vecs": True}
    arrays = embedder.encode(TEXTS[:3], **kwargs)
    tensors = embedder.encode(TEXTS[:3], convert_to_numpy=False, **kwargs)
    assert isinstance(arrays["dense_vecs"], np.ndarray) and isinstance(tensors["dense_vecs"], torch.Tensor)
    np.testing.assert_array_equal(tensors["dense_vecs"].numpy(), arrays["dense_vecs"])
    for a, t in zip(arrays["colbert_vecs"], tensors["colbert_vecs"]):
        assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), a)
    assert tensors["lexical_weights"] == arrays["lexical_weights"]
    as_default = M3Embedder(tiny_model, tokenizer=tiny_tokenizer, use_fp16=False, convert_to_numpy=False)
    one = as_default.encode_queries(TEXTS[0], max_length=MAX_LENGTH)
    assert isinstance(one["dense_vecs"], torch.Tensor) and one["dense_vecs"].shape == arrays["dense_vecs"][0].shape


def test_compute_score_default_weights_are_flagembeddings_and_ranking_uses_bge_m3s(embedder):
    """compute_score keeps FlagEmbedding's 1 : 1 : 1 (a drop-in); eval, search and mining rank with 1 : 0.3 : 1.
    One constant each, in flagm3.defaults."""
    from flagm3 import defaults
    from flagm3.evaluation import DEFAULT_HYBRID_WEIGHTS
    from flagm3.mining import DENSE_SPARSE_WEIGHTS
    from flagm3.scoring import BGE_M3_ENSEMBLE_WEIGHTS

    assert defaults.COMPUTE_SCORE_WEIGHTS == {"dense": 1.0, "sparse": 1.0, "colbert": 1.0}
    assert BGE_M3_ENSEMBLE_WEIGHTS is defaults.BGE_M3_ENSEMBLE_WEIGHTS
    assert DEFAULT_HYBRID_WEIGHTS == (1.0, 0.3, 1.0) and DENSE_SPARSE_WEIGHTS == (1.0, 0.3)
    pairs = [(TEXTS[0], TEXTS[1]), (TEXTS[2], TEXTS[3])]
    default = embedder.compute_score(pairs, max_query_length=8, max_passage_length=MAX_LENGTH, show_progress=False)
    explicit = embedder.compute_score(pairs, max_query_length=8, max_passage_length=MAX_LENGTH, show_progress=False,
                                      weights_for_different_modes=[1, 1, 1])
    assert default == explicit
    import flagm3.inference as inference

    doc = inference.M3Embedder.compute_score.__doc__
    assert "1 : 1 : 1" in doc and "1 : 0.3 : 1" in doc
