"""``examples/train_custom.py``: its custom pooling and loss term compute what they claim, and a tiny training run
through its ``main`` trains and saves the custom parts."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from conftest import REPO, SENTENCES

from flagm3 import CheckpointError, M3Loss, M3LossConfig, M3Model, M3Output


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_custom", REPO / "examples" / "train_custom.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def flops_by_vocabulary(ids: torch.Tensor, weights: torch.Tensor, vocab: int) -> torch.Tensor:
    """The FLOPS term through a [N, vocab] matrix of max-pooled weights, by loops."""
    pooled = torch.zeros(ids.shape[0], vocab, dtype=weights.dtype)
    for i in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            t = int(ids[i, j])
            pooled[i, t] = torch.maximum(pooled[i, t], weights[i, j])
    return (pooled.mean(0) ** 2).sum()


def test_flops_regularizer_matches_the_vocabulary_formula(example):
    ids = torch.tensor([[1, 5, 5, 7, 0], [5, 2, 9, 0, 0], [3, 3, 3, 3, 3]])
    weights = torch.tensor([[0.0, 0.5, 1.5, 0.2, 0.0], [2.0, 0.3, 0.0, 0.0, 0.0], [0.1, 0.4, 0.2, 0.0, 0.3]],
                           dtype=torch.float64)
    # hand check: mean over 3 texts of id 5: (1.5 + 2.0 + 0) / 3; id 7: 0.2/3; id 2: 0.3/3; id 3: 0.4/3
    hand = ((3.5 / 3) ** 2 + (0.2 / 3) ** 2 + (0.3 / 3) ** 2 + (0.4 / 3) ** 2)
    got = example.flops_regularizer(ids, weights)
    assert float(got) == pytest.approx(hand, rel=1e-12)
    assert float(got) == pytest.approx(float(flops_by_vocabulary(ids, weights, 10)), rel=1e-12)
    assert float(example.flops_regularizer(ids, torch.zeros_like(weights))) == 0.0


def test_flops_loss_adds_the_weighted_term(example, tiny_model, tiny_tokenizer):
    q = tiny_tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    p = tiny_tokenizer(SENTENCES[2:6], padding=True, return_tensors="pt")
    with torch.no_grad():
        q_out, p_out = tiny_model(**q), tiny_model(**p)
    config = M3LossConfig.preset("flagm3")
    base = M3Loss(config)(q_out, q["input_ids"], p_out, p["input_ids"], group_size=2)
    loss = example.FlopsM3Loss(config, flops_weight=0.25)
    custom = loss(q_out, q["input_ids"], p_out, p["input_ids"], group_size=2)
    flops = example.flops_regularizer(q["input_ids"], q_out.sparse) + example.flops_regularizer(p["input_ids"],
                                                                                                p_out.sparse)
    assert float(flops) > 0
    assert float(custom.loss) == pytest.approx(float(base.loss) + 0.25 * float(flops), rel=1e-6)
    assert custom.logs["flops"] == pytest.approx(float(flops)) and custom.logs["loss"] == pytest.approx(float(custom.loss))
    assert loss.get_config_dict()["flops_weight"] == 0.25
    dense_only = example.FlopsM3Loss(M3LossConfig.preset("flagm3", heads=("dense",)), flops_weight=0.25)
    out = dense_only(M3Output(dense=q_out.dense), q["input_ids"], M3Output(dense=p_out.dense), p["input_ids"], 2)
    assert "flops" not in out.logs


def test_attention_pooling_starts_as_mean_pooling_and_follows_its_scorer(example, tiny_encoder_dir, tiny_tokenizer):
    torch.manual_seed(0)
    model = example.AttentionPoolingM3Model.from_encoder(str(tiny_encoder_dir), colbert_dim=16).eval()
    batch = tiny_tokenizer(SENTENCES[:3], padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    assert (mask == 0).any()  # padding present, so masking matters
    with torch.no_grad():
        hidden = model.encoder(**batch).last_hidden_state
        mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(model(**batch).dense, torch.nn.functional.normalize(mean, dim=-1))
        model.pool_scorer.weight.normal_()
        scores = hidden @ model.pool_scorer.weight[0]
        expected = []
        for b in range(hidden.shape[0]):
            real = mask[b].bool()
            w = torch.softmax(scores[b, real], dim=0)
            expected.append((w[:, None] * hidden[b, real]).sum(0))
        torch.testing.assert_close(model(**batch).dense, torch.nn.functional.normalize(torch.stack(expected), dim=-1))


def run_main(example, tmp_path, encoder_dir, flops_weight: float, name: str):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"query": " ".join(s.split()[:3]), "pos": [s]}) + "\n" for s in SENTENCES))
    return example.main([
        "--model_name_or_path", str(encoder_dir), "--train_data", str(data), "--output_dir", str(tmp_path / name),
        "--train_group_size", "2", "--per_device_train_batch_size", "2", "--max_steps", "3",
        "--learning_rate", "1e-2", "--head_learning_rate", "1e-2", "--colbert_dim", "16",
        "--flops_weight", str(flops_weight), "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
        "--use_cpu", "--seed", "1",
    ])


def sparse_flops(example, model, tokenizer) -> float:
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        return float(example.flops_regularizer(batch["input_ids"], model.eval()(**batch).sparse))


def test_main_trains_and_saves_the_custom_parts(example, tmp_path, tiny_encoder_dir, tiny_tokenizer):
    trainer = run_main(example, tmp_path, tiny_encoder_dir, 0.5, "flops")
    plain = run_main(example, tmp_path, tiny_encoder_dir, 0.0, "plain")
    model = trainer.model
    assert isinstance(model, example.AttentionPoolingM3Model)
    assert isinstance(trainer.m3_loss, example.FlopsM3Loss)
    assert model.pool_scorer.weight.abs().sum() > 0  # trained away from its zero start

    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all("flops" in h for h in logged) and logged[0]["flops"] > 0
    assert not any("flops" in h for h in plain.state.log_history)
    # the regulariser did its job: the same run without it ends with denser lexical weights
    assert sparse_flops(example, model, tiny_tokenizer) < sparse_flops(example, plain.model, tiny_tokenizer)

    out_dir = tmp_path / "flops"
    reloaded = example.AttentionPoolingM3Model.from_pretrained(str(out_dir)).eval()
    torch.testing.assert_close(reloaded.pool_scorer.weight, model.pool_scorer.weight.detach().cpu())
    batch = tiny_tokenizer(SENTENCES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).dense, model.eval()(**batch).dense)
    with pytest.raises(CheckpointError, match="pool_scorer"):
        M3Model.from_pretrained(str(out_dir))
