"""M3Model: head equations, pooling, ignored ids, checkpoints (flagm3, Auto*, BGE-M3 layout, hub), errors, numerics."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel

from flagm3 import CheckpointError, M3Config, M3Model, sparse_ignore_ids_from_tokenizer
from flagm3.compat import enable_activation_checkpointing, is_activation_checkpointing
from flagm3.convert_bge_m3 import checkpoint_layout
from flagm3.modeling_m3 import pool
from flagm3.scoring import colbert_scores, sparse_scores

TEXTS = [
    "the boundary layer on a flat plate in supersonic flow",
    "a wing § in flow",  # '§' is not in the tiny vocabulary: an [UNK]
    "shock waves",
]
HEAD_KEYS = {"colbert_linear.weight", "colbert_linear.bias", "sparse_linear.weight", "sparse_linear.bias"}


@pytest.fixture()
def batch(tiny_tokenizer):
    return dict(tiny_tokenizer(TEXTS, padding=True, return_tensors="pt"))


def outputs(model: M3Model, batch: dict) -> dict:
    with torch.no_grad():
        out = model(**batch)
    return {k: out[k] for k in ("dense", "sparse", "colbert", "colbert_mask")}


def assert_same_outputs(a: dict, b: dict, exact: bool = True) -> None:
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], msg=name)


def special_ids(tokenizer) -> set[int]:
    return {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}


# ------------------------------------------------------------------------------------------- equations
def test_heads_match_hand_computation(tiny_model, tiny_tokenizer, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any() and (ids == tiny_tokenizer.unk_token_id).any()  # the batch has pads and an UNK
    keep = (mask == 1) & ~torch.isin(ids, torch.tensor(sorted(special_ids(tiny_tokenizer))))
    with torch.no_grad():
        h = tiny_model.encoder(**batch).last_hidden_state
        # a bias at the median pre-activation of the kept tokens: the ReLU both cuts and passes
        tiny_model.sparse_linear.bias.fill_(-(h @ tiny_model.sparse_linear.weight.T)[keep].median())
    out = outputs(tiny_model, batch)
    ws, bs = tiny_model.sparse_linear.weight, tiny_model.sparse_linear.bias
    wc, bc = tiny_model.colbert_linear.weight, tiny_model.colbert_linear.bias

    cls = h[:, 0]
    torch.testing.assert_close(out["dense"], cls / cls.norm(dim=-1, keepdim=True))

    pre = (h @ ws.T + bs).squeeze(-1)
    expected_sparse = torch.where(keep & (pre > 0), pre, torch.zeros_like(pre))
    torch.testing.assert_close(out["sparse"], expected_sparse)
    assert ((pre <= 0) & keep).any() and (expected_sparse > 0).any()

    vecs = h[:, 1:] @ wc.T + bc
    expected_colbert = vecs / vecs.norm(dim=-1, keepdim=True) * mask[:, 1:, None]
    assert out["colbert"].shape == (3, ids.shape[1] - 1, 16)
    torch.testing.assert_close(out["colbert"], expected_colbert)
    assert torch.equal(out["colbert_mask"], mask[:, 1:])


def test_sparse_zero_exactly_at_pads_and_ignored_ids(tiny_model, tiny_tokenizer, batch):
    """With every pre-activation positive, the only zeros are pads and CLS/SEP/PAD/UNK."""
    with torch.no_grad():
        tiny_model.sparse_linear.bias.fill_(100.0)
    sparse = outputs(tiny_model, batch)["sparse"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ignored = torch.isin(ids, torch.tensor(sorted(special_ids(tiny_tokenizer))))
    assert torch.equal(sparse == 0, (mask == 0) | ignored)


def test_heads_without_normalisation(tiny_encoder_dir, batch):
    model = M3Model.from_encoder(str(tiny_encoder_dir), colbert_dim=8, normalize_embeddings=False).eval()
    out = outputs(model, batch)
    with torch.no_grad():
        h = model.encoder(**batch).last_hidden_state
        colbert = model.colbert_linear(h[:, 1:]) * batch["attention_mask"][:, 1:, None]
    torch.testing.assert_close(out["dense"], h[:, 0])
    torch.testing.assert_close(out["colbert"], colbert)


def test_head_selection(tiny_model, batch):
    out = tiny_model(**batch, heads=("dense",))
    assert out.dense is not None and out.sparse is None and out.colbert is None and out.colbert_mask is None
    with pytest.raises(ValueError, match="unknown heads"):
        tiny_model(**batch, heads=("dense", "bm25"))


def test_default_colbert_dim_is_hidden_size(tiny_encoder_dir):
    model = M3Model.from_encoder(str(tiny_encoder_dir))
    assert model.config.colbert_dim == -1 and model.config.colbert_output_dim == 32
    assert tuple(model.colbert_linear.weight.shape) == (32, 32)
    assert tuple(model.sparse_linear.weight.shape) == (1, 32)


def test_from_encoder_builds_no_second_encoder(tiny_encoder_dir, monkeypatch):
    """The pretrained encoder is the only one materialised: the model's own (replaced) encoder stays on the
    meta device, so a large encoder never needs twice its memory. Heads and the ignored-id buffer are real."""
    built = []
    from_config = AutoModel.from_config

    def recording_from_config(*args, **kwargs):
        encoder = from_config(*args, **kwargs)
        built.append({p.device.type for p in encoder.parameters()})
        return encoder

    monkeypatch.setattr(AutoModel, "from_config", recording_from_config)
    model = M3Model.from_encoder(str(tiny_encoder_dir), colbert_dim=16)
    assert built and all(devices == {"meta"} for devices in built)
    assert {t.device.type for t in model.state_dict().values()} | {model.sparse_ignore_ids.device.type} == {"cpu"}
    reference = BertModel.from_pretrained(str(tiny_encoder_dir))
    for name, value in reference.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], value), name
    for head in (model.sparse_linear, model.colbert_linear):
        bound = 1 / head.in_features**0.5  # torch's default Linear init
        assert head.weight.abs().max() <= bound and head.weight.std() > 0
    assert model.sparse_ignore_ids.tolist() == model.config.sparse_ignore_token_ids


def test_base_model_is_the_encoder(tiny_model, tmp_path):
    assert tiny_model.base_model_prefix == "encoder" and tiny_model.base_model is tiny_model.encoder
    tiny_model.save_pretrained(tmp_path)
    for loaded in (M3Model.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert loaded.base_model is loaded.encoder
        state = loaded.state_dict()
        assert state.keys() == tiny_model.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in tiny_model.state_dict().items())


# --------------------------------------------------------------------------------------------- pooling
def test_pool_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]], [[5.0, 6.0], [7.0, 8.0], [1.0, 0.0]]])
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(hidden, right, "cls"), torch.tensor([[1.0, 2.0], [5.0, 6.0]]))
    torch.testing.assert_close(pool(hidden, right, "mean"), torch.tensor([[2.0, 3.0], [13 / 3, 14 / 3]]))
    torch.testing.assert_close(pool(hidden, right, "last_token"), torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])  # left padding: the last position is always real
    torch.testing.assert_close(pool(hidden, left, "last_token"), torch.tensor([[9.0, 9.0], [1.0, 0.0]]))
    torch.testing.assert_close(pool(hidden, left, "cls"), torch.tensor([[3.0, 4.0], [5.0, 6.0]]))
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, right, "max")
    with pytest.raises(ValueError, match="pooling must be one of"):
        M3Config(backbone_config=BertConfig(), pooling="max")


@pytest.mark.parametrize("pooling", ["mean", "last_token"])
def test_model_pooling(tiny_encoder_dir, batch, pooling):
    model = M3Model.from_encoder(str(tiny_encoder_dir), pooling=pooling).eval()
    with torch.no_grad():
        h = model.encoder(**batch).last_hidden_state
    mask = batch["attention_mask"]
    if pooling == "mean":
        vec = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    else:
        vec = h[torch.arange(h.shape[0]), mask.sum(1) - 1]
    torch.testing.assert_close(outputs(model, batch)["dense"], F.normalize(vec, dim=-1))


def test_left_padding_gives_the_right_padding_scores(tiny_model, tiny_tokenizer, batch):
    """CLS pooling, the ColBERT token mask and the sparse weights follow the first real token, so a left-padded
    batch scores as the right-padded one (BERT's positions are passed so both see the same positions)."""
    left = dict(tiny_tokenizer(TEXTS, padding=True, return_tensors="pt", padding_side="left"))
    assert not torch.equal(left["input_ids"], batch["input_ids"])
    left["position_ids"] = (left["attention_mask"].cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        right_out, left_out = tiny_model(**batch), tiny_model(**left)
    torch.testing.assert_close(left_out.dense, right_out.dense, atol=1e-5, rtol=1e-5)
    assert left_out.colbert_mask.sum() == right_out.colbert_mask.sum() == batch["attention_mask"].sum() - len(TEXTS)
    for scores, args in ((sparse_scores, lambda o, b: (b["input_ids"], o.sparse)),
                         (colbert_scores, lambda o, b: (o.colbert, o.colbert_mask))):
        torch.testing.assert_close(scores(*args(left_out, left), *args(left_out, left)),
                                   scores(*args(right_out, batch), *args(right_out, batch)), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ ignore ids
def test_ignore_ids_bert_tokenizer_uses_sep(tiny_tokenizer, tiny_model):
    assert tiny_tokenizer.eos_token_id is None
    expected = sorted(special_ids(tiny_tokenizer))
    assert sparse_ignore_ids_from_tokenizer(tiny_tokenizer) == expected
    assert tiny_model.config.sparse_ignore_token_ids == expected
    assert tiny_model.sparse_ignore_ids.tolist() == expected


def test_ignore_ids_tokenizer_with_eos(tiny_encoder_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_encoder_dir))
    tokenizer.eos_token = "[MASK]"  # an EOS distinct from SEP (as in tokenizers that have both)
    eos = tokenizer.eos_token_id
    assert eos not in special_ids(tokenizer)
    expected = sorted({tokenizer.cls_token_id, eos, tokenizer.pad_token_id, tokenizer.unk_token_id})
    assert sparse_ignore_ids_from_tokenizer(tokenizer) == expected  # EOS, not SEP
    model = M3Model.from_encoder(str(tiny_encoder_dir), tokenizer=tokenizer).eval()
    assert model.config.sparse_ignore_token_ids == expected
    with torch.no_grad():
        model.sparse_linear.bias.fill_(100.0)
    ids = torch.tensor([[tokenizer.cls_token_id, 20, eos, tokenizer.sep_token_id]])
    sparse = model(input_ids=ids, attention_mask=torch.ones_like(ids), heads=("sparse",)).sparse
    assert sparse[0, 0] == 0 and sparse[0, 2] == 0 and sparse[0, 1] > 0 and sparse[0, 3] > 0


# --------------------------------------------------------------------------------------- flagm3 format
@pytest.mark.parametrize(
    "settings", [dict(colbert_dim=16), dict(colbert_dim=-1, pooling="mean", normalize_embeddings=False)]
)
def test_save_and_load_round_trip(tiny_encoder_dir, batch, tmp_path, settings):
    model = M3Model.from_encoder(str(tiny_encoder_dir), **settings).eval()
    before = outputs(model, batch)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # heads inside, no .pt files
    tensors = load_file(tmp_path / "model.safetensors")
    assert HEAD_KEYS <= set(tensors) and all(k.startswith("encoder.") for k in set(tensors) - HEAD_KEYS)
    assert torch.equal(tensors["colbert_linear.weight"], model.colbert_linear.weight)
    assert checkpoint_layout(str(tmp_path)) == "flagm3"

    loaded = M3Model.from_pretrained(tmp_path).eval()
    for field in ("colbert_dim", "pooling", "normalize_embeddings", "sparse_ignore_token_ids"):
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    # A non-persistent buffer is not in the file: it must be rebuilt from the config, not left uninitialised.
    assert loaded.sparse_ignore_ids.tolist() == model.config.sparse_ignore_token_ids
    assert_same_outputs(before, outputs(loaded, batch))


def test_from_pretrained_config_overrides(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    loaded = M3Model.from_pretrained(tmp_path, pooling="mean", normalize_embeddings=False)
    assert loaded.config.pooling == "mean" and loaded.config.normalize_embeddings is False


def test_auto_classes_round_trip(tiny_model, batch, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, M3Config) and isinstance(config.backbone_config, BertConfig)
    assert config.backbone_config.hidden_size == 32 and config.colbert_dim == 16
    model = AutoModel.from_pretrained(tmp_path).eval()
    assert type(model) is M3Model
    assert_same_outputs(outputs(tiny_model, batch), outputs(model, batch))
    fresh = AutoModel.from_config(config)
    assert type(fresh) is M3Model and tuple(fresh.colbert_linear.weight.shape) == (16, 32)


def test_config_from_backbone_dict():
    config = M3Config(backbone_config={"model_type": "bert", "hidden_size": 48, "num_attention_heads": 4})
    assert isinstance(config.backbone_config, BertConfig) and config.colbert_output_dim == 48
    with pytest.raises(ValueError, match="model_type"):
        M3Config(backbone_config={"hidden_size": 48})


# ----------------------------------------------------------------------------------------- BGE-M3 layout
def test_bge_m3_export_files(tiny_model, tiny_tokenizer, batch, tmp_path):
    tiny_model.save_bge_m3(str(tmp_path), tokenizer=tiny_tokenizer)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "colbert_linear.pt", "sparse_linear.pt", "tokenizer.json"} <= files
    assert checkpoint_layout(str(tmp_path)) == "bge-m3"
    for name, head in (("colbert_linear.pt", tiny_model.colbert_linear), ("sparse_linear.pt", tiny_model.sparse_linear)):
        state = torch.load(tmp_path / name, map_location="cpu", weights_only=True)  # as FlagEmbedding loads it
        assert set(state) == {"weight", "bias"}
        assert torch.equal(state["weight"], head.weight) and torch.equal(state["bias"], head.bias)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bert"
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "embeddings.word_embeddings.weight" in keys  # the bare encoder's names, no M3 prefix, no heads
    assert not any(k.startswith(("encoder.embeddings", "colbert_linear", "sparse_linear")) for k in keys)
    # FlagEmbedding loads the encoder with AutoModel: a plain BertModel with no missing weights.
    encoder, info = BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        hidden = encoder.eval()(**batch).last_hidden_state
        expected = tiny_model.encoder(**batch).last_hidden_state
    assert torch.equal(hidden, expected)
    # FlagEmbedding's BGEM3FlagModel needs an EOS token: a BERT tokenizer is saved with SEP as EOS, the caller's
    # tokenizer untouched, encodings unchanged
    saved = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tiny_tokenizer.eos_token is None and saved.eos_token == tiny_tokenizer.sep_token
    assert saved(TEXTS)["input_ids"] == tiny_tokenizer(TEXTS)["input_ids"]


def test_bge_m3_export_then_import(tiny_model, tiny_tokenizer, batch, tmp_path):
    tiny_model.save_bge_m3(str(tmp_path), tokenizer=tiny_tokenizer)
    before = outputs(tiny_model, batch)
    for loaded in (M3Model.from_pretrained(tmp_path), M3Model.from_bge_m3(str(tmp_path))):
        loaded.eval()
        assert loaded.config.colbert_dim == 16
        assert loaded.config.sparse_ignore_token_ids == tiny_model.config.sparse_ignore_token_ids
        assert_same_outputs(before, outputs(loaded, batch))
    again = tmp_path / "again"
    loaded.save_bge_m3(str(again), tokenizer=tiny_tokenizer)
    for name in ("colbert_linear.pt", "sparse_linear.pt"):
        first, second = (torch.load(d / name, weights_only=True) for d in (tmp_path, again))
        assert all(torch.equal(first[k], second[k]) for k in ("weight", "bias"))
    assert all(torch.equal(v, load_file(again / "model.safetensors")[k])
               for k, v in load_file(tmp_path / "model.safetensors").items())


# ------------------------------------------------------------------------------------------------ errors
@pytest.fixture()
def bge_dir(tiny_model, tiny_tokenizer, tmp_path) -> Path:
    path = tmp_path / "bge"
    tiny_model.save_bge_m3(str(path), tokenizer=tiny_tokenizer)
    return path


def test_missing_head_file_is_named(bge_dir):
    os.remove(bge_dir / "sparse_linear.pt")
    with pytest.raises(CheckpointError, match="sparse_linear.pt is missing"):
        M3Model.from_pretrained(bge_dir)


def test_mismatched_head_shape_names_the_file(bge_dir):
    torch.save({"weight": torch.zeros(16, 24), "bias": torch.zeros(16)}, bge_dir / "colbert_linear.pt")
    with pytest.raises(CheckpointError, match=r"colbert_linear\.pt.*hidden size 32"):
        M3Model.from_pretrained(bge_dir)
    torch.save({"weight": torch.zeros(2, 32), "bias": torch.zeros(2)}, bge_dir / "colbert_linear.pt")
    torch.save({"weight": torch.zeros(2, 32), "bias": torch.zeros(2)}, bge_dir / "sparse_linear.pt")
    with pytest.raises(CheckpointError, match=r"sparse_linear\.pt"):  # the sparse head has one output
        M3Model.from_pretrained(bge_dir)


def test_head_file_with_other_keys_is_refused(bge_dir):
    torch.save({"linear.weight": torch.zeros(1, 32), "linear.bias": torch.zeros(1)}, bge_dir / "sparse_linear.pt")
    with pytest.raises(CheckpointError, match=r"sparse_linear\.pt.*'weight' and 'bias'"):
        M3Model.from_pretrained(bge_dir)


class _Payload:
    """Unpickling this runs os.mkdir(marker): only a full (not weights-only) unpickler would do it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_payload_in_head_file_is_refused(bge_dir, tmp_path):
    marker = tmp_path / "payload-ran"
    state = {"weight": torch.zeros(1, 32), "bias": torch.zeros(1), "extra": _Payload(str(marker))}
    torch.save(state, bge_dir / "sparse_linear.pt")
    with pytest.raises(CheckpointError, match=r"sparse_linear\.pt: cannot be read as a weights-only"):
        M3Model.from_pretrained(bge_dir)
    assert not marker.exists()


def test_plain_encoder_dir_is_refused(tiny_encoder_dir):
    with pytest.raises(CheckpointError, match=r"plain 'bert' encoder.*from_encoder"):
        M3Model.from_pretrained(tiny_encoder_dir)


def test_dir_without_config_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        M3Model.from_pretrained(tmp_path)


def test_missing_tensor_is_an_error_not_a_fresh_head(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    del tensors["colbert_linear.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="colbert_linear.weight"):
        M3Model.from_pretrained(tmp_path)


def test_unexpected_tensor_is_an_error(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    tensors["lm_head.weight"] = torch.zeros(3, 3)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        M3Model.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------------- hub
def test_push_to_hub_uploads_the_checkpoint(tiny_model):
    from huggingface_hub import HfApi, ModelCard, RepoUrl
    from huggingface_hub.errors import EntryNotFoundError
    from transformers.utils import hub

    uploaded: dict[str, bytes] = {}

    def fake_commit(*args, repo_id, operations, **kwargs):
        assert repo_id == "someone/m3-test"
        for op in operations:  # read now: the files live in a temporary directory
            uploaded[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()

    # transformers 5 calls HfApi's methods; 4.x calls huggingface_hub's module functions it imported by name.
    owner = hub if hasattr(hub, "create_commit") else HfApi
    commit = mock.Mock(side_effect=fake_commit)
    with (
        mock.patch.object(owner, "create_repo", return_value=RepoUrl("https://huggingface.co/someone/m3-test")),
        mock.patch.object(owner, "create_commit", commit),
        mock.patch.object(HfApi, "upload_folder", side_effect=AssertionError("unexpected upload_folder")),
        mock.patch.object(ModelCard, "load", side_effect=EntryNotFoundError("offline test: no card")),
    ):
        tiny_model.push_to_hub("someone/m3-test")
    assert commit.call_count == 1
    assert {"config.json", "model.safetensors"} <= set(uploaded)
    assert not any(name.endswith(".pt") for name in uploaded)
    config = json.loads(uploaded["config.json"])
    assert config["model_type"] == "flagm3" and config["colbert_dim"] == 16
    assert config["sparse_ignore_token_ids"] == tiny_model.config.sparse_ignore_token_ids
    from safetensors.torch import load as load_bytes

    tensors = load_bytes(uploaded["model.safetensors"])
    assert set(tensors) == set(tiny_model.state_dict())
    assert all(torch.equal(tensors[k], v) for k, v in tiny_model.state_dict().items())


# ----------------------------------------------------------------------------------------------- numerics
def test_activation_checkpointing_backward(tiny_encoder_dir, batch):
    def grads(checkpointing: bool):
        torch.manual_seed(0)
        model = M3Model.from_encoder(str(tiny_encoder_dir), colbert_dim=8).train()
        if checkpointing:
            enable_activation_checkpointing(model)  # what the HF Trainer calls
            assert is_activation_checkpointing(model)
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.encoder.modules())
        out = model(**batch)
        (out.dense.sum() + out.sparse.sum() + out.colbert.pow(2).sum()).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert set(plain) == set(checkpointed) and "encoder.embeddings.word_embeddings.weight" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_sdpa_matches_eager(tiny_encoder_dir, batch, tmp_path):
    models = {}
    for impl in ("eager", "sdpa"):
        models[impl] = M3Model.from_encoder(str(tiny_encoder_dir), attn_implementation=impl).eval()
        # The requested implementation is the one the encoder runs with (not silently replaced by a default).
        assert models[impl].config._attn_implementation == impl
        assert models[impl].encoder.config._attn_implementation == impl
    models["sdpa"].load_state_dict(models["eager"].state_dict())
    sdpa = outputs(models["sdpa"], batch)
    for name, value in outputs(models["eager"], batch).items():
        torch.testing.assert_close(sdpa[name], value, atol=1e-5, rtol=0, msg=name)
    models["sdpa"].save_pretrained(tmp_path)
    loaded = M3Model.from_pretrained(tmp_path, attn_implementation="eager")
    assert loaded.encoder.config._attn_implementation == "eager"


def test_bf16_autocast_close_to_fp32(tiny_model, batch):
    fp32 = outputs(tiny_model, batch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model(**batch)
    assert out.sparse.dtype == torch.bfloat16  # autocast did run the heads in bf16
    for name in ("dense", "sparse", "colbert"):
        torch.testing.assert_close(out[name].float(), fp32[name], atol=3e-2, rtol=3e-2, msg=name)


# ---------------------------------------------------------------------------------------- all-MiniLM-L6-v2
def test_minilm_through_from_encoder(minilm_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    model = M3Model.from_encoder(str(minilm_dir), pooling="mean").eval()
    expected_ids = sorted(tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", "[PAD]", "[UNK]"]))
    assert model.config.sparse_ignore_token_ids == expected_ids == [0, 100, 101, 102]
    texts = [
        "How does a wing produce lift?",
        "Why do airplane wings generate lift?",
        "A recipe for tomato soup with basil.",
    ]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    out = outputs(model, batch)
    assert out["dense"].shape == (3, 384) and out["colbert"].shape == (3, batch["input_ids"].shape[1] - 1, 384)
    with torch.no_grad():
        hidden = BertModel.from_pretrained(str(minilm_dir)).eval()(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None]
    torch.testing.assert_close(out["dense"], F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    ignored = torch.isin(batch["input_ids"], torch.tensor(expected_ids))
    assert (out["sparse"][ignored] == 0).all()
    sims = out["dense"] @ out["dense"].T
    assert sims[0, 1] > sims[0, 2] + 0.2  # the real encoder's weights are in use: paraphrases are closer



def test_token_weights_name_the_per_token_sparse_output_and_sparse_stays_an_alias(tiny_model, batch):
    """M3Output.token_weights is the sparse head's [B, L] per-token weights (not a pooled sparse vector); the
    former name ``sparse`` still reads and builds it, with a DeprecationWarning."""
    import warnings

    from flagm3.modeling_m3 import M3Output, merge_outputs

    with torch.no_grad():
        out = tiny_model(**batch)
    assert list(out.keys()) == ["dense", "token_weights", "colbert", "colbert_mask"]
    assert out.token_weights.shape == batch["input_ids"].shape
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert out.sparse is out.token_weights
    assert [w.category for w in caught] == [DeprecationWarning]
    old = M3Output(dense=out.dense, sparse=out.token_weights)
    assert old.token_weights is out.token_weights and list(old.keys()) == ["dense", "token_weights"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert out["sparse"] is out["token_weights"]
    assert [w.category for w in caught] == [DeprecationWarning]
    with pytest.raises(TypeError):
        M3Output(token_weights=out.token_weights, sparse=out.token_weights)
    rows = [[1], [0, *range(2, out.dense.shape[0])]]
    parts = [M3Output(token_weights=out.token_weights[r]) for r in rows]
    assert torch.equal(merge_outputs(parts, rows, out.token_weights.shape[1]).token_weights, out.token_weights)
