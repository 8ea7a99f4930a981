"""What a training run takes from the checkpoint and what from the arguments: a checkpoint's pooling and
normalisation win unless the flags are given explicitly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_cli_trainer, write_train_file

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_train_file(tmp_path_factory.mktemp("recipe") / "train.jsonl", 4)


build = build_cli_trainer


def test_continuing_a_mean_pooled_checkpoint_keeps_mean_pooling(tiny_encoder_dir, train_file, tmp_path):
    first = build(tiny_encoder_dir, train_file, tmp_path / "first", "--sentence_pooling_method", "mean",
                  "--normalize_embeddings", "False")
    assert first.model.config.pooling == "mean" and first.model.config.normalize_embeddings is False
    first.train()
    first.save_model()
    first.processing_class.save_pretrained(str(tmp_path / "first"))

    again = build(tmp_path / "first", train_file, tmp_path / "again")  # no pooling flags
    assert again.model.config.pooling == "mean" and again.model.config.normalize_embeddings is False
    again.train()
    again.save_model()
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["pooling"] == "mean" and saved["normalize_embeddings"] is False

    explicit = build(tmp_path / "first", train_file, tmp_path / "explicit", "--sentence_pooling_method", "cls")
    assert explicit.model.config.pooling == "cls" and explicit.model.config.normalize_embeddings is False


def test_fresh_heads_default_to_cls_and_normalised(tiny_encoder_dir, train_file, tmp_path):
    trainer = build(tiny_encoder_dir, train_file, tmp_path / "fresh")
    assert trainer.model.config.pooling == "cls" and trainer.model.config.normalize_embeddings is True


def test_colbert_dim_of_a_checkpoint_is_kept_and_a_different_one_refused(tiny_encoder_dir, train_file, tmp_path):
    first = build(tiny_encoder_dir, train_file, tmp_path / "first", "--colbert_dim", "16")
    first.save_model()
    first.processing_class.save_pretrained(str(tmp_path / "first"))
    assert build(tmp_path / "first", train_file, tmp_path / "again").model.config.colbert_output_dim == 16
    assert build(tmp_path / "first", train_file, tmp_path / "same", "--colbert_dim", "16").model.colbert_linear.out_features == 16
    with pytest.raises(ValueError, match=r"--colbert_dim 8: .*first has a trained ColBERT head of size 16"):
        build(tmp_path / "first", train_file, tmp_path / "other", "--colbert_dim", "8")


def test_trainer_built_directly_applies_the_recipe_once(tiny_model, tmp_path):
    """Python users who build M3Trainer themselves get the recipe of their arguments (no separate call), and a
    script that prepared the model first does not get it twice (one stop-gradient hook, not two)."""
    from flagm3 import M3Trainer, M3TrainingArguments
    from flagm3.recipe import prepare_for_training

    args = M3TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", loss_preset="flagm3",
                               fix_position_embedding=True)
    assert all(p.requires_grad for p in tiny_model.parameters())
    prepare_for_training(tiny_model, args)  # as flagm3 train and the examples do
    hooks = len(tiny_model.sparse_linear._forward_pre_hooks)
    M3Trainer(model=tiny_model, args=args)
    frozen = {n for n, p in tiny_model.named_parameters() if not p.requires_grad}
    assert any("position_embeddings" in n for n in frozen)
    assert len(tiny_model.sparse_linear._forward_pre_hooks) == hooks

    fresh = type(tiny_model)(tiny_model.config)
    M3Trainer(model=fresh, args=args)  # no prepare_for_training call
    assert {n for n, p in fresh.named_parameters() if not p.requires_grad} == frozen
    assert len(fresh.sparse_linear._forward_pre_hooks) == hooks
