"""Parity with FlagEmbedding 1.4.2 (the reference), run in its own virtual environment.

The reference python comes from ``$FLAGM3_REFERENCE_PYTHON`` (CI sets it after
``.ci/setup_reference_env.sh``), else ``~/.cache/flagm3/fe-venv``; without either the tests skip (or fail
under ``FLAGM3_REQUIRE_REFERENCE``). ``tests/reference/fe_encode.py`` encodes and scores with ``BGEM3FlagModel`` and writes JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import conftest
import numpy as np
import pytest
import torch
from conftest import SENTENCES, make_encoder_dir, make_xlmr_dir

from flagm3 import M3Model
from flagm3.inference import M3Embedder

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
ATOL = 1e-4
SCORE_KEYS = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")


@pytest.fixture(scope="module")
def reference_python() -> str:
    return conftest.reference_python()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_reference(python: str, model_dir: Path, spec: dict, work: Path) -> dict:
    """Run fe_encode.py (BGEM3FlagModel, fp32, CPU) on ``spec`` and return its JSON output."""
    spec_file, out_file = work / "spec.json", work / "reference.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [python, str(REFERENCE_DIR / "fe_encode.py"), str(model_dir), str(spec_file), str(out_file), "--threads", "1"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, f"reference run failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(out_file.read_text())


def assert_parity(model_dir: Path, spec: dict, ref: dict) -> None:
    """M3Embedder on ``model_dir`` gives FlagEmbedding's encodings and scores for ``spec``."""
    emb = M3Embedder(str(model_dir), use_fp16=False, batch_size=spec["batch_size"],
                     query_max_length=spec["query_max_length"], passage_max_length=spec["passage_max_length"])
    assert sorted(emb.model.config.sparse_ignore_token_ids) == ref["dropped_special_ids"]
    ours = {}
    for side, texts, encode in (("queries", spec["queries"], emb.encode_queries),
                                ("passages", spec["passages"], emb.encode_corpus)):
        out = encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True)
        theirs = ref[side]
        np.testing.assert_allclose(out["dense_vecs"], np.array(theirs["dense_vecs"]), atol=ATOL, rtol=0)
        for i, (a, b) in enumerate(zip(out["lexical_weights"], theirs["lexical_weights"])):
            assert set(a) == set(b), f"{side}[{i}]: lexical tokens differ"
            np.testing.assert_allclose([a[k] for k in b], list(b.values()), atol=ATOL, rtol=0)
        for i, (a, b) in enumerate(zip(out["colbert_vecs"], theirs["colbert_vecs"])):
            assert a.shape == (len(theirs["input_ids"][i]) - 1, len(b[0]))
            np.testing.assert_allclose(a, np.array(b), atol=ATOL, rtol=0)
        ours[side] = out
    q, p = ours["queries"], ours["passages"]
    scores = ref["scores"]
    np.testing.assert_allclose(q["dense_vecs"] @ p["dense_vecs"].T, scores["dense"], atol=ATOL, rtol=0)
    lexical = emb.compute_lexical_matching_score(q["lexical_weights"], p["lexical_weights"])
    np.testing.assert_allclose(lexical, scores["lexical_matching"], atol=ATOL, rtol=0)
    assert np.abs(lexical).max() > 0  # the sparse comparison is not between zeros
    colbert = np.array([[float(emb.colbert_score(a, b)) for b in p["colbert_vecs"]] for a in q["colbert_vecs"]])
    np.testing.assert_allclose(colbert, scores["colbert"], atol=ATOL, rtol=0)

    cs_ref = ref["compute_score"]
    pairs = cs_ref["pairs"]
    cs = emb.compute_score([(spec["queries"][i], spec["passages"][j]) for i, j in pairs],
                           weights_for_different_modes=cs_ref["weights"])
    assert set(cs) == set(SCORE_KEYS)
    theirs = {k: np.array(cs_ref[k]) for k in SCORE_KEYS}
    ours_cs = {k: np.array(cs[k]) for k in SCORE_KEYS}
    # Our ColBERT score of a pair is FlagEmbedding's colbert_score on the unpadded vectors ...
    unpadded = np.array([scores["colbert"][i][j] for i, j in pairs])
    np.testing.assert_allclose(ours_cs["colbert"], unpadded, atol=ATOL, rtol=0)
    # ... and its compute_score agrees except where its quirk shows: it pads passages together and lets the
    # zero vectors of padding into MaxSim, which can only raise a score (to 0 for a query token whose real
    # similarities are all negative).
    quirk = np.abs(theirs["colbert"] - unpadded) > ATOL
    assert (theirs["colbert"][quirk] > unpadded[quirk]).all()
    assert quirk.sum() <= len(pairs) // 4, f"reference quirk in {quirk.sum()} of {len(pairs)} pairs"
    for key in SCORE_KEYS:
        np.testing.assert_allclose(ours_cs[key][~quirk], theirs[key][~quirk], atol=ATOL, rtol=0, err_msg=key)


def tiny_encoder(kind: str, directory: Path) -> Path:
    """A random tiny encoder with its tokenizer: BERT + WordPiece (EOS = SEP), or BGE-M3's own architecture,
    XLM-R + SentencePiece (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3)."""
    return make_encoder_dir(directory, seed=3, eos_as_sep=True) if kind == "bert" else make_xlmr_dir(directory, seed=3)


@pytest.mark.parametrize("kind", ["bert", "xlmr"])
def test_parity_tiny_bge_m3_layout(reference_python, tmp_path, kind):
    encoder_dir = tiny_encoder(kind, tmp_path / "encoder")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
    assert tokenizer.eos_token == ("[SEP]" if kind == "bert" else "</s>")
    torch.manual_seed(3)
    M3Model.from_encoder(str(encoder_dir)).save_bge_m3(str(tmp_path / "bge"), tokenizer)
    queries = [*SENTENCES[:5], "wing wing flow wing", "ζ shock ζ"]
    passages = [*SENTENCES, "", "the wing the wing the flow"]
    spec = {"queries": queries, "passages": passages, "query_max_length": 12, "passage_max_length": 14,
            "batch_size": 4, "weights_for_different_modes": [0.4, 0.2, 0.4]}
    ref = run_reference(reference_python, tmp_path / "bge", spec, tmp_path)
    assert ref["fe_version"] == "1.4.2"
    assert max(len(ids) for ids in ref["passages"]["input_ids"]) == 14  # truncation exercised
    if kind == "xlmr":  # SentencePiece ids, and FlagEmbedding drops <s>, </s>, <pad>, <unk> (not <mask>)
        assert ref["dropped_special_ids"] == [0, 1, 2, 3]
        assert all(ids[0] == 0 and ids[-1] == 2 for ids in ref["queries"]["input_ids"])
        unknown = ref["queries"]["input_ids"][queries.index("ζ shock ζ")]
        assert 3 in unknown and "3" not in ref["queries"]["lexical_weights"][queries.index("ζ shock ζ")]
    assert_parity(tmp_path / "bge", spec, ref)


def test_parity_minilm_fresh_heads(reference_python, minilm_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    tokenizer.eos_token = tokenizer.sep_token  # FlagEmbedding needs an EOS token; BERT has none
    torch.manual_seed(0)
    model = M3Model.from_encoder(str(minilm_dir), tokenizer=tokenizer)
    model.save_bge_m3(str(tmp_path / "bge"), tokenizer)
    queries = ["what is the lift of a wing in supersonic flow?", "heat transfer at hypersonic speed",
               "How do shells buckle?"]
    passages = [SENTENCES[1], SENTENCES[3], SENTENCES[5], SENTENCES[2] + ". " + SENTENCES[6], SENTENCES[9]]
    spec = {"queries": queries, "passages": passages, "query_max_length": 32, "passage_max_length": 24,
            "batch_size": 2, "weights_for_different_modes": [1.0, 0.3, 1.0]}
    ref = run_reference(reference_python, tmp_path / "bge", spec, tmp_path)
    assert_parity(tmp_path / "bge", spec, ref)
