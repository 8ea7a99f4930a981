"""Regression tests for the combination findings of issue 16: each failed on the code before its fix.

- cached gradients (``--sub_batch_size``) keep the loss's ``stats`` (sparse health), equal to the plain step's;
- LoRA with the sparse anchor: the anchor pulls the trained copy of the sparse head (not PEFT's frozen original)
  and a resumed run anchors exactly like the uninterrupted one;
- every contrastive weight 0 with self-distillation starting later is refused by ``validate()`` (it raised an
  ``IndexError`` in the first step);
- FlagEmbedding's ``ds_stage0.json`` as shipped (an ``optimizer`` and a ``WarmupDecayLR`` ``scheduler`` section)
  keeps the flagm3 recipe's sparse learning rate: the one-step update under DeepSpeed equals the plain run's.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import REPO
from dist_scripts.common import (
    assert_close,
    launch,
    ranks,
    run_in_process,
    tensors,
    train_args,
    write_train_data,
)
from test_gradcache import collate, load_model, make_items, make_trainer

from flagm3.losses import M3Loss, M3LossConfig, M3TrainingLoss

pytestmark = pytest.mark.usefixtures("one_thread")

FE_DEEPSPEED = REPO / "tests" / "fixtures" / "flagembedding"


def test_cached_gradients_keep_the_sparse_health_stats(tiny_encoder_dir, tiny_tokenizer, tmp_path):
    inputs = collate(tiny_tokenizer, make_items(teacher=False))
    model = load_model(tiny_encoder_dir)
    plain = make_trainer(model, tiny_tokenizer, tmp_path / "plain").training_loss(model, inputs)
    cached = make_trainer(model, tiny_tokenizer, tmp_path / "cached", sub_batch_size=3).training_loss(model, inputs)
    assert len(plain.stats) == 6 and all(k.startswith("sparse_") for k in plain.stats)
    assert cached.stats.keys() == plain.stats.keys()
    for key, value in plain.stats.items():
        assert_close(cached.stats[key], value, key, rtol=1e-9, atol=1e-12)


def test_cached_gradients_log_the_sparse_health(tiny_encoder_dir, tiny_tokenizer, tmp_path):
    """What the collapse WARNING and the model card read: the trainer's logged sums."""
    inputs = collate(tiny_tokenizer, make_items(teacher=False))
    model = load_model(tiny_encoder_dir)
    trainer = make_trainer(model, tiny_tokenizer, tmp_path, sub_batch_size=3)
    trainer.training_step(model, inputs)
    assert {f"sparse_{k}_{s}" for k in ("active", "zero", "weight") for s in ("query", "passage")} <= set(
        trainer.term_logs.sums)


# ------------------------------------------------------------------------------------- LoRA + sparse anchor
def _lora_model(encoder_dir):
    from peft import LoraConfig, get_peft_model

    from flagm3 import M3Model

    torch.manual_seed(0)
    model = M3Model.from_encoder(str(encoder_dir), colbert_dim=16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                        modules_to_save=["sparse_linear", "colbert_linear"])
    return get_peft_model(model, config)


def _anchor_loss(weight: float = 0.5) -> M3TrainingLoss:
    return M3TrainingLoss(M3Loss(M3LossConfig.preset("flagm3", sparse_anchor_weight=weight)))


def test_lora_sparse_anchor_pulls_the_trained_copy_and_survives_a_resume(tiny_encoder_dir):
    from flagm3.modeling_m3 import unwrap_m3

    model = _lora_model(tiny_encoder_dir)
    head = unwrap_m3(model).sparse_linear.modules_to_save["default"]  # PEFT's trained copy
    assert all(p.requires_grad for p in head.parameters())  # the adapter's copy, not the frozen original
    loss = _anchor_loss()
    assert float(loss.sparse_anchor(model).detach()) == 0.0  # the first batch records the reference
    theta0 = [p.detach().clone() for p in head.parameters()]
    with torch.no_grad():
        head.weight.add_(0.01)
        head.bias.sub_(0.2)
    uninterrupted = loss.sparse_anchor(model).detach()
    dist = sum(((p.detach() - p0) ** 2).sum() for p, p0 in zip(head.parameters(), theta0))
    expected = 0.5 * dist / sum((p0 ** 2).sum() for p0 in theta0)
    assert float(uninterrupted) == pytest.approx(float(expected), rel=1e-6) and float(expected) > 0

    reference = loss.sparse_anchor_reference()  # saved with the checkpoint
    assert set(reference) == {"weight", "bias"}
    torch.testing.assert_close(reference["weight"], theta0[0])
    resumed = _anchor_loss()
    resumed.load_sparse_anchor_reference(reference)
    assert float(resumed.sparse_anchor(model).detach()) == pytest.approx(float(uninterrupted), rel=1e-6)


# ------------------------------------------------------------------------- no term before self-distillation
def test_no_contrastive_term_before_self_distillation_starts_is_refused():
    zero = {"dense": 0.0, "sparse": 0.0, "colbert": 0.0, "ensemble": 0.0}
    with pytest.raises(ValueError, match="self_distill_start_step"):
        M3LossConfig.preset("bge-m3", head_weights=zero, self_distill_start_step=3)
    config = M3LossConfig.preset("bge-m3", head_weights=zero, self_distill_start_step=-1)  # distils from step 0
    assert config.distills(0)


def test_no_contrastive_term_is_one_line_from_flagm3_train(tiny_encoder_dir, tmp_path, capsys):
    from flagm3.cli import main

    data = write_train_data(tmp_path / "train.jsonl", 4)
    argv = ["train", *train_args(tiny_encoder_dir, data, tmp_path / "out", self_distill_start_step=3),
            "--head_loss_weights", "dense=0,sparse=0,colbert=0,ensemble=0"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value.code)
    assert "self_distill_start_step" in message and "\n" not in message and "Traceback" not in message


# --------------------------------------------------------------------- FlagEmbedding's DeepSpeed configs
def test_flagembedding_configs_hand_the_optimizer_to_the_trainer(caplog):
    pytest.importorskip("deepspeed")  # --deepspeed is refused without it
    from flagm3.arguments import M3ArgumentParser

    for name in ("ds_stage0.json", "ds_stage1.json"):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            _, notes = M3ArgumentParser().parse(["--model_name_or_path", "m", "--output_dir", "o", "--deepspeed", str(FE_DEEPSPEED / name)])
        warnings = [text for level, text in notes if level == logging.WARNING]
        assert len(warnings) == 1 and '"optimizer" (AdamW)' in warnings[0] and '"scheduler" (WarmupDecayLR)' in warnings[0]


@pytest.mark.slow
def test_update_under_flagembeddings_ds_stage0_and_ds_stage1_equals_the_plain_run(tmp_path, tiny_encoder_dir):
    """ds_stage0.json exactly as FlagEmbedding ships it; the flagm3 recipe trains the sparse head at 3e-4 and
    the encoder at --learning_rate: one AdamW step under DeepSpeed moves every parameter as the plain run does."""
    pytest.importorskip("deepspeed")
    data = write_train_data(tmp_path / "train.jsonl", 4)
    common = dict(loss_preset="flagm3", learning_rate=1e-5, per_device_train_batch_size=4)
    stages = ("ds_stage0", "ds_stage1")  # FlagEmbedding's, as shipped
    launch([[tmp_path / stage, *train_args(tiny_encoder_dir, data, tmp_path / f"out_{stage}", **common,
                                          deepspeed=FE_DEEPSPEED / f"{stage}.json")] for stage in stages],
           nproc=1, timeout=400)
    run_in_process(tmp_path / "plain", train_args(tiny_encoder_dir, data, tmp_path / "out_plain", **common))
    from flagm3 import M3Model

    start = {n: p.detach() for n, p in M3Model.from_encoder(str(tiny_encoder_dir), colbert_dim=16).named_parameters()
             if n.startswith("encoder.")}
    plain = tensors(tmp_path / "plain", "params")
    for stage in stages:
        (record,) = ranks(tmp_path / stage)
        assert record["engine_steps"] and record["global_step"] == 1, f"{stage}: DeepSpeed did not run the step"
        ds = tensors(tmp_path / stage, "params")
        assert plain.keys() == ds.keys()
        for name in plain:
            assert_close(ds[name], plain[name], f"{stage} {name}", rtol=1e-5, atol=1e-7)
    # the step is not vacuous: at 3e-4 the sparse head moves ~30x as far as an encoder weight at 1e-5
    word = "encoder.embeddings.word_embeddings.weight"
    encoder_move = (plain[word] - start[word]).abs().max()
    assert 0 < encoder_move < 2e-5
