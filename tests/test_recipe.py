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


def test_recipe_holds_every_setting_of_the_presets(tmp_path):
    """One object: the loss preset, the learning rate of each parameter group, attention, sparse init, the sparse
    stop-gradient and anchor; explicit arguments win over the preset's."""
    from flagm3 import M3TrainingArguments
    from flagm3.recipe import RECIPE_SPARSE_LEARNING_RATE, Recipe

    def recipe(**overrides) -> Recipe:
        return M3TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **overrides).recipe()

    flagm3, bge = recipe(), recipe(loss_preset="bge-m3")
    assert (flagm3.preset, flagm3.sparse_learning_rate, flagm3.head_learning_rate) == (
        "flagm3", RECIPE_SPARSE_LEARNING_RATE, None)
    assert flagm3.attention_dropout == 0.0 and flagm3.sparse_stop_gradient and flagm3.sparse_anchor_weight == 0
    assert flagm3.loss.head_temperature("sparse") == 0.05
    assert (bge.sparse_learning_rate, bge.attention_dropout, bge.sparse_stop_gradient) == (None, None, False)
    assert recipe(head_learning_rate=1e-3).sparse_learning_rate == 1e-3  # the heads' rate, the sparse head's too
    assert recipe(sparse_learning_rate=1e-2, attention_dropout=0.2, sparse_anchor_weight=5.0).card() == {
        **flagm3.card(), "sparse_learning_rate": 1e-2, "attention_dropout": 0.2, "sparse_anchor_weight": 5.0}
    assert recipe(loss_preset="bge-m3", sparse_stop_gradient=True).sparse_stop_gradient
    # the sparse head's initialisation: a fresh head (plain encoder) in the loss, unless asked otherwise
    assert flagm3.fits_sparse_idf("encoder") and not flagm3.fits_sparse_idf("flagm3")
    assert not recipe(heads="dense,colbert").fits_sparse_idf("encoder")
    assert Recipe.from_args(M3TrainingArguments(output_dir=str(tmp_path), report_to="none"),
                            sparse_init="idf").fits_sparse_idf("flagm3")
    with pytest.raises(ValueError, match="sparse_init"):
        Recipe(sparse_init="bm25")


def test_parameter_groups_come_from_the_recipe(tiny_model, tmp_path):
    from flagm3 import M3TrainingArguments

    args = M3TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, head_learning_rate=1e-3,
                               sparse_learning_rate=1e-2, weight_decay=0.1)
    groups = args.recipe().parameter_groups(tiny_model, 0.1, [n for n, _ in tiny_model.named_parameters()
                                                                if not n.endswith("bias")])
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    by_name = {names[id(p)]: (g.get("lr"), g["weight_decay"]) for g in groups for p in g["params"]}
    assert by_name["sparse_linear.weight"] == (1e-2, 0.1) and by_name["sparse_linear.bias"] == (1e-2, 0.0)
    assert by_name["colbert_linear.weight"] == (1e-3, 0.1)
    assert {v for n, v in by_name.items() if n.startswith("encoder.")} == {(None, 0.1), (None, 0.0)}
    assert set(by_name) == {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert M3TrainingArguments(output_dir=str(tmp_path), report_to="none",
                               loss_preset="bge-m3").recipe().parameter_groups(tiny_model, 0.0, []) is None


def test_flagm3_train_prepares_the_model_once(tiny_encoder_dir, train_file, tmp_path, monkeypatch):
    """flagm3 train used to prepare the model twice (in train.py and in the trainer)."""
    from flagm3 import recipe

    calls = []
    freeze = recipe.freeze_untrained
    monkeypatch.setattr(recipe, "freeze_untrained", lambda *a, **k: calls.append(1) or freeze(*a, **k))
    trainer = build(tiny_encoder_dir, train_file, tmp_path / "once")
    assert len(calls) == 1
    assert trainer.recipe.sparse_init == "auto" and trainer.m3_loss.config == trainer.recipe.loss
