"""BGE-M3's own architecture and tokenizer: XLM-RoBERTa (``padding_idx`` 1, position ids offset past it, 8,194
positions) with a SentencePiece tokenizer, built tiny and random here (see conftest.make_xlmr_dir).

FlagEmbedding parity for this model lives with the BERT cases it parametrises (test_parity_flagembedding.py,
test_parity_loss.py); here: tokenizer and position layout, export/re-import, a SentencePiece-only checkpoint,
GradCache and length chunks, BAAI/bge-m3's real config, and 8,192-token inputs.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import test_gradcache
import test_length_chunks
import torch
from conftest import REPO, SENTENCES, make_xlmr_dir, train_sentencepiece

from flagm3 import M3Config, M3Model
from flagm3.data import M3Collator
from flagm3.inference import M3Embedder

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FAIRSEQ_SPECIALS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}


@pytest.fixture(scope="module")
def xlmr_dir(tmp_path_factory) -> Path:
    return make_xlmr_dir(tmp_path_factory.mktemp("xlmr") / "encoder")


@pytest.fixture(scope="module")
def xlmr_tokenizer(xlmr_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(xlmr_dir))


def encode_all(model: M3Model, tokenizer, texts, padding_side="right") -> dict:
    tokenizer.padding_side = padding_side
    try:
        batch = tokenizer(texts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    with torch.no_grad():
        out = model(**batch)
    return {"batch": batch, "out": out}


# --------------------------------------------------------------------------------------------- layout
def test_sentencepiece_tokenizer_and_ignored_ids(xlmr_dir, xlmr_tokenizer):
    assert (xlmr_dir / "sentencepiece.bpe.model").is_file() and (xlmr_dir / "tokenizer.json").is_file()
    assert {t: xlmr_tokenizer.convert_tokens_to_ids(t) for t in FAIRSEQ_SPECIALS} == FAIRSEQ_SPECIALS
    assert xlmr_tokenizer.mask_token_id == len(xlmr_tokenizer) - 1
    ids = xlmr_tokenizer("ζ shock")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and 3 in ids  # <s> ... </s>, an unknown character
    model = M3Model.from_encoder(str(xlmr_dir)).eval()
    assert model.config.sparse_ignore_token_ids == [0, 1, 2, 3]  # <s>, <pad>, </s>, <unk>; not <mask>
    out = encode_all(model, xlmr_tokenizer, ["ζ shock wing", "flow"])
    sparse, ids = out["out"].sparse, out["batch"]["input_ids"]
    assert (sparse[ids <= 3] == 0).all() and (sparse[ids > 3] > 0).any()


def test_position_ids_start_past_padding(xlmr_dir, xlmr_tokenizer):
    """XLM-R numbers real tokens from padding_idx + 1 = 2 wherever the padding is: token vectors of left- and
    right-padded batches are those of each text alone (dense too when padded right; CLS pooling reads column 0)."""
    model = M3Model.from_encoder(str(xlmr_dir), colbert_dim=8).eval()
    embeddings = model.encoder.embeddings
    assert embeddings.padding_idx == 1 and model.encoder.config.pad_token_id == 1
    texts = [SENTENCES[0], "wing", SENTENCES[3]]
    right = encode_all(model, xlmr_tokenizer, texts, "right")
    left = encode_all(model, xlmr_tokenizer, texts, "left")
    assert not torch.equal(right["batch"]["input_ids"], left["batch"]["input_ids"])
    for i, text in enumerate(texts):
        alone = encode_all(model, xlmr_tokenizer, [text])["out"]
        torch.testing.assert_close(right["out"].dense[i], alone.dense[0])
        n = alone.sparse.shape[1]
        torch.testing.assert_close(right["out"].sparse[i, :n], alone.sparse[0])
        torch.testing.assert_close(left["out"].sparse[i, -n:], alone.sparse[0])
        torch.testing.assert_close(left["out"].colbert[i, -(n - 1):], alone.colbert[0])


# ------------------------------------------------------------------------------------ export / import
def test_export_and_reimport(xlmr_dir, xlmr_tokenizer, tmp_path):
    torch.manual_seed(1)
    model = M3Model.from_encoder(str(xlmr_dir)).eval()
    texts = [SENTENCES[1], "ζ flutter", SENTENCES[7]]
    want = encode_all(model, xlmr_tokenizer, texts)["out"]

    model.save_pretrained(str(tmp_path / "flagm3"))
    model.save_bge_m3(str(tmp_path / "bge"), xlmr_tokenizer)
    files = {p.name for p in (tmp_path / "bge").iterdir()}
    assert {"config.json", "model.safetensors", "colbert_linear.pt", "sparse_linear.pt", "tokenizer.json",
            "tokenizer_config.json", "sentencepiece.bpe.model"} <= files
    assert json.loads((tmp_path / "bge" / "config.json").read_text())["model_type"] == "xlm-roberta"
    assert not isinstance(json.loads((tmp_path / "bge" / "tokenizer_config.json").read_text())
                          .get("extra_special_tokens"), list)  # transformers 4.x (FlagEmbedding) reads it

    for path in (tmp_path / "flagm3", tmp_path / "bge"):
        again = M3Model.from_pretrained(str(path)).eval()
        assert again.config.sparse_ignore_token_ids == [0, 1, 2, 3]
        assert again.encoder.config.max_position_embeddings == model.encoder.config.max_position_embeddings
        got = encode_all(again, xlmr_tokenizer, texts)["out"]
        for name in ("dense", "sparse", "colbert"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=f"{path.name}: {name}")


def test_sentencepiece_only_checkpoint_loads(xlmr_dir, xlmr_tokenizer, tmp_path):
    """A BGE-M3 checkpoint with sentencepiece.bpe.model and no tokenizer.json: the tokenizer is built from the
    SentencePiece model (needs protobuf under transformers 5) and encodes exactly as the full checkpoint."""
    torch.manual_seed(2)
    M3Model.from_encoder(str(xlmr_dir)).save_bge_m3(str(tmp_path / "full"), xlmr_tokenizer)
    shutil.copytree(tmp_path / "full", tmp_path / "spm")
    (tmp_path / "spm" / "tokenizer.json").unlink()
    texts = [SENTENCES[2], "ζ shock waves", ""]
    results = {}
    for name in ("full", "spm"):
        emb = M3Embedder(str(tmp_path / name), use_fp16=False, batch_size=2)
        assert emb.tokenizer("ζ shock")["input_ids"] == xlmr_tokenizer("ζ shock")["input_ids"]
        results[name] = emb.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    full, spm = results["full"], results["spm"]
    np.testing.assert_allclose(spm["dense_vecs"], full["dense_vecs"], atol=1e-6)
    assert [dict(d) for d in spm["lexical_weights"]] == [dict(d) for d in full["lexical_weights"]]
    for a, b in zip(spm["colbert_vecs"], full["colbert_vecs"]):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_install_requires_what_a_sentencepiece_checkpoint_needs():
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    requires = next(ast.literal_eval(k.value) for k in call.keywords if k.arg == "install_requires")
    names = {r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requires}
    assert {"sentencepiece", "protobuf"} <= names


def test_sentencepiece_fixture_is_deterministic(tmp_path):
    import sentencepiece as spm

    pieces = []
    for name in ("a", "b"):
        sp = spm.SentencePieceProcessor(model_file=str(train_sentencepiece(tmp_path / name)))
        pieces.append([(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())])
    assert pieces[0] == pieces[1] and len(pieces[0]) > 50


# ------------------------------------------------------------------------------------ BAAI/bge-m3 size
def test_bge_m3_config_builds_the_real_model_shape():
    """BAAI/bge-m3's config.json (the real file's values) as M3Model on the meta device: no weights allocated."""
    from transformers import AutoConfig

    backbone = AutoConfig.from_pretrained(str(FIXTURES / "bge-m3"))
    assert (backbone.model_type, backbone.vocab_size, backbone.hidden_size, backbone.num_hidden_layers) == (
        "xlm-roberta", 250002, 1024, 24)
    assert (backbone.max_position_embeddings, backbone.pad_token_id, backbone.type_vocab_size) == (8194, 1, 1)
    with torch.device("meta"):
        model = M3Model(M3Config(backbone_config=backbone, sparse_ignore_token_ids=[0, 1, 2, 3]))
    assert type(model.encoder).__name__ == "XLMRobertaModel"
    assert model.get_input_embeddings().weight.shape == (250002, 1024)
    assert model.encoder.embeddings.position_embeddings.weight.shape == (8194, 1024)
    assert model.encoder.embeddings.padding_idx == 1
    assert (model.sparse_linear.in_features, model.sparse_linear.out_features) == (1024, 1)
    assert (model.colbert_linear.in_features, model.colbert_linear.out_features) == (1024, 1024)
    encoder = sum(p.numel() for p in model.encoder.parameters())
    heads = sum(p.numel() for p in (*model.sparse_linear.parameters(), *model.colbert_linear.parameters()))
    assert encoder == 567_754_752  # XLM-RoBERTa large with 8,194 positions and its pooler
    assert heads == 1024 * 1024 + 1024 + 1024 + 1
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(568e6, rel=0.002)


# -------------------------------------------------------------------- GradCache and length chunks
@pytest.mark.parametrize("teacher, kd", [(False, "kl_div"), (True, "m3_kd_loss")])
def test_gradcache_whole_batch_loss_and_gradients(xlmr_dir, xlmr_tokenizer, tmp_path, teacher, kd):
    test_gradcache.test_cached_step_equals_uncached_step(xlmr_dir, xlmr_tokenizer, tmp_path, teacher, kd)


def test_gradcache_left_padding(xlmr_dir, xlmr_tokenizer, tmp_path):
    test_gradcache.test_cached_step_with_left_padding(xlmr_dir, xlmr_tokenizer, tmp_path)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_length_chunks_whole_batch_loss_and_gradients(xlmr_dir, xlmr_tokenizer, tmp_path, monkeypatch,
                                                      padding_side):
    test_length_chunks.test_chunked_step_equals_whole_step(xlmr_dir, xlmr_tokenizer, tmp_path, monkeypatch,
                                                           padding_side, None)


# ------------------------------------------------------------------------------------- 8,192 tokens
LONG = 8192


@pytest.fixture(scope="module")
def long_xlmr_dir(tmp_path_factory) -> Path:
    """A tiny XLM-R with BGE-M3's 8,194 positions (8,192 tokens + padding_idx + 1): one layer, hidden 16."""
    return make_xlmr_dir(tmp_path_factory.mktemp("xlmr_long") / "encoder", max_position_embeddings=LONG + 2,
                         hidden_size=16, num_hidden_layers=1, intermediate_size=32)


def long_text(tokenizer, tokens: int) -> str:
    text = " ".join(SENTENCES)
    while len(tokenizer(text)["input_ids"]) < tokens:
        text = text + " " + text
    return text


def test_8192_token_passages_train_a_step(long_xlmr_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(long_xlmr_dir))
    assert tokenizer.model_max_length == LONG
    text = long_text(tokenizer, LONG + 100)
    items = [{"query": SENTENCES[0], "passages": [text, SENTENCES[1]], "teacher_scores": None},
             {"query": SENTENCES[4], "passages": [SENTENCES[4] + " " + text, "wing"], "teacher_scores": None}]
    inputs = M3Collator(tokenizer, query_max_len=32, passage_max_len=LONG)(items)
    assert inputs["passage"]["input_ids"].shape == (4, LONG)  # truncated to 8,192 tokens, </s> last
    assert inputs["passage"]["input_ids"][0, -1] == 2

    model = test_gradcache.load_model(long_xlmr_dir, dtype=torch.float32)
    trainer = test_gradcache.make_trainer(model, tokenizer, tmp_path)
    loss, grads = test_gradcache.step(trainer, inputs)
    assert np.isfinite(loss) and loss > 0
    positions = grads["encoder.embeddings.position_embeddings.weight"]
    assert positions.shape[0] == LONG + 2
    assert positions[LONG + 1].abs().sum() > 0  # the last position row (token 8,192) takes part
    assert positions[1].abs().sum() == 0  # padding_idx's row never does
    for head in ("sparse_linear.weight", "colbert_linear.weight"):
        assert grads[head].abs().sum() > 0 and torch.isfinite(grads[head]).all()


def test_8192_token_passages_encode(long_xlmr_dir, tmp_path):
    from transformers import AutoTokenizer

    M3Model.from_encoder(str(long_xlmr_dir)).save_bge_m3(
        str(tmp_path / "bge"), AutoTokenizer.from_pretrained(str(long_xlmr_dir)))
    emb = M3Embedder(str(tmp_path / "bge"), use_fp16=False, batch_size=2, passage_max_length=LONG)
    text = long_text(emb.tokenizer, LONG + 100)
    out = emb.encode_corpus([text, SENTENCES[2]], return_dense=True, return_sparse=True, return_colbert_vecs=True)
    assert out["dense_vecs"].shape == (2, 16) and np.isfinite(out["dense_vecs"]).all()
    assert out["colbert_vecs"][0].shape == (LONG - 1, 16)  # every token after <s>, </s> included
    assert len(out["colbert_vecs"][1]) < 100
    assert out["lexical_weights"][0] and not {"0", "1", "2", "3"} & set(out["lexical_weights"][0])
    scores = emb.compute_score([(SENTENCES[0], text), (SENTENCES[0], SENTENCES[2])], max_passage_length=LONG)
    assert all(np.isfinite(scores[key]).all() for key in scores)


# --------------------------------------------------------------------------------------- flagm3 train
def test_flagm3_train_from_an_xlmr_encoder_saves_both_layouts(xlmr_dir, tmp_path):
    """``flagm3 train`` on the XLM-R/SentencePiece encoder: fresh heads (IDF-fitted sparse head over the
    SentencePiece vocabulary), the bge-m3 objective, and a saved model that loads in both layouts."""
    from dist_scripts.common import losses, train_args, train_in_process, write_train_data

    data = write_train_data(tmp_path / "train.jsonl", 4)
    out = tmp_path / "run"
    args = train_args(xlmr_dir, data, out / "model", max_steps=2, save_bge_m3_layout=True)
    trainer, record = train_in_process(out, args)
    assert record["global_step"] == 2 and all(np.isfinite(losses(record)))
    model = trainer.model
    assert model.config.sparse_ignore_token_ids == [0, 1, 2, 3]
    bge = out / "model" / "bge-m3"
    assert (bge / "sentencepiece.bpe.model").is_file() and (bge / "tokenizer.json").is_file()
    texts = [SENTENCES[0], "ζ wing"]
    encoded = [M3Embedder(str(path), use_fp16=False).encode(texts, return_sparse=True)
               for path in (out / "model", bge)]
    np.testing.assert_allclose(encoded[0]["dense_vecs"], encoded[1]["dense_vecs"], atol=1e-6)
    for a, b in zip(encoded[0]["lexical_weights"], encoded[1]["lexical_weights"]):
        assert a.keys() == b.keys() and a
        np.testing.assert_allclose([a[k] for k in b], list(b.values()), atol=1e-6)
