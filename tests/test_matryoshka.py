"""Matryoshka terms and the FLOPS regulariser of the M3 objective: exact values on hand-made tensors, the
full-size ensemble and self-distillation untouched, and the same gradients with cached gradients (GradCache)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from test_gradcache import SUB, collate, grads, load_model, make_items

from flagm3.arguments import M3ArgumentParser
from flagm3.losses import M3Loss, M3LossConfig, M3TrainingLoss
from flagm3.losses.flops import flops, flops_penalty
from flagm3.losses.matryoshka import nested_dims
from flagm3.modeling_m3 import M3Output

pytestmark = pytest.mark.usefixtures("one_thread")
T = torch.float64


def softplus(x: float) -> float:
    """``log(1 + e^x)``: InfoNCE of a positive against one negative scoring ``x`` above it."""
    return math.log1p(math.exp(x))


def test_nested_dims_are_capped_and_exclude_the_full_size():
    assert nested_dims([96, 192, 384], 1024) == (96, 192, 384)
    assert nested_dims([384, 96, 2048], 256) == (96,)
    assert nested_dims([4, 8], 4) == ()


def dense_case() -> tuple[M3Output, torch.Tensor, M3Output, torch.Tensor]:
    q = torch.tensor([[0.6, 0, 0.8, 0], [0, 0.6, 0, 0.8]], dtype=T)
    p = torch.tensor([[0.6, 0.8, 0, 0], [0, 0.6, 0, 0.8]], dtype=T)
    ids = torch.ones(2, 1, dtype=torch.long)
    return M3Output(dense=q), ids, M3Output(dense=p), ids


def test_dense_nested_term_by_hand():
    """Full scores q.p: [[.36, 0], [.48, 1]]; first 2 dims renormalised: q -> e1, e2, p -> [.6, .8], e2:
    [[.6, 0], [.8, 1]]. Each InfoNCE row is softplus(negative - positive)."""
    full = (softplus(-0.36) + softplus(0.48 - 1.0)) / 2
    nested = (softplus(-0.6) + softplus(0.8 - 1.0)) / 2
    base = dict(heads=("dense",), use_self_distill=False, head_temperatures={"dense": 1.0})
    for dims, weights, want in [((), (), full), ((2,), (0.5,), full + 0.5 * nested), ((2, 8), (1.0, 3.0), full + nested)]:
        loss = M3Loss(M3LossConfig(mrl_dims=dims, mrl_weights=weights, **base))
        out = loss(*dense_case(), group_size=1)
        assert float(out.loss) == pytest.approx(want, abs=1e-12)
        if dims:
            assert float(out.logs["loss_dense@2"]) == pytest.approx(nested, abs=1e-12)
            assert "loss_dense@4" not in out.logs  # 8 is capped at the head's 4: the full term, not twice


def test_colbert_nested_term_by_hand():
    """Query tokens a=[.6,0,.8,0], b=e2; passage 1: [.6,.8,0,0], e3; passage 2: e4 and a pad. Full MaxSim means:
    .8 and 0. On 2 dims (renormalised): a -> e1, b -> e2, passage 1 -> [.6,.8], 0; passage 2 -> 0: .7 and 0."""
    q = M3Output(colbert=torch.tensor([[[0.6, 0, 0.8, 0], [0, 1, 0, 0]]], dtype=T),
                 colbert_mask=torch.ones(1, 2, dtype=torch.long))
    p = M3Output(colbert=torch.tensor([[[0.6, 0.8, 0, 0], [0, 0, 1, 0]], [[0, 0, 0, 1], [0, 0, 0, 0]]], dtype=T),
                 colbert_mask=torch.tensor([[1, 1], [1, 0]]))
    ids = torch.ones(2, 3, dtype=torch.long)
    loss = M3Loss(M3LossConfig(heads=("colbert",), use_self_distill=False, head_temperatures={"colbert": 1.0},
                               mrl_dims=(2,)))
    out = loss(q, ids[:1], p, ids, group_size=2)
    assert float(out.logs["loss_colbert"]) == pytest.approx(softplus(-0.8), abs=1e-12)
    assert float(out.logs["loss_colbert@2"]) == pytest.approx(softplus(-0.7), abs=1e-12)
    assert float(out.loss) == pytest.approx(softplus(-0.8) + softplus(-0.7), abs=1e-12)


def random_outputs(n: int, length: int, seed: int) -> tuple[M3Output, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, length // 2:] = 0
    colbert = torch.nn.functional.normalize(torch.randn(n, length, 8, generator=gen, dtype=T), dim=-1)
    out = M3Output(dense=torch.nn.functional.normalize(torch.randn(n, 8, generator=gen, dtype=T), dim=-1),
                   sparse=torch.rand(n, length + 1, generator=gen, dtype=T),
                   colbert=colbert * mask[..., None], colbert_mask=mask)
    return out, torch.randint(3, 20, (n, length + 1), generator=gen)


def test_ensemble_and_self_distillation_stay_at_full_size():
    """With every head, the ensemble and self-distillation: only the nested dense/ColBERT terms are added,
    ``(sum_h w_h m_d L_h@d) / n_terms`` in the contrastive half of the loss."""
    q, q_ids = random_outputs(2, 5, 0)
    p, p_ids = random_outputs(6, 7, 1)
    plain = M3Loss(M3LossConfig.preset("bge-m3"))(q, q_ids, p, p_ids, group_size=3)
    config = M3LossConfig.preset("bge-m3", mrl_dims=(2, 4), mrl_weights=(0.5, 2.0))
    nested = M3Loss(config)(q, q_ids, p, p_ids, group_size=3)
    for key, value in plain.logs.items():
        if key != "loss":
            assert float(nested.logs[key]) == pytest.approx(float(value), abs=1e-12), key
    added = sum(config.head_weight(h) * w * float(nested.logs[f"loss_{h}@{d}"])
                for h in ("dense", "colbert") for d, w in ((2, 0.5), (4, 2.0)))
    assert "loss_sparse@2" not in nested.logs
    n_terms = len(config.contrastive_terms())
    assert float(nested.loss) == pytest.approx(float(plain.loss) + added / n_terms / 2, abs=1e-12)


def test_flops_by_hand():
    """Texts {5: .5, 7: 1 (max of .2 and 1)} and {5: .3}: token means .4 and .5 -> .16 + .25."""
    ids = torch.tensor([[5, 7, 7], [5, 9, 1]])
    weights = torch.tensor([[0.5, 0.2, 1.0], [0.3, 0.0, 0.0]], dtype=T, requires_grad=True)
    value = flops(ids, weights)
    assert float(value.detach()) == pytest.approx(0.41, abs=1e-12)
    value.backward()  # d/dw of (mean)^2: 2 * mean / N at each token's max position
    torch.testing.assert_close(weights.grad, torch.tensor([[0.4, 0.0, 0.5], [0.4, 0.0, 0.0]], dtype=T))
    weights = weights.detach()
    assert float(flops_penalty(ids, weights, 2.0, target=None)) == pytest.approx(0.82)
    assert float(flops_penalty(ids, weights, 2.0, target=1.5)) == pytest.approx(0.82)  # 2 active on average
    assert float(flops_penalty(ids, weights, 2.0, target=2.0)) == 0.0


def test_flops_in_the_objective_is_logged_with_sparse_health():
    q, q_ids = random_outputs(2, 5, 0)
    p, p_ids = random_outputs(6, 7, 1)
    plain = M3Loss(M3LossConfig.preset("flagm3"))(q, q_ids, p, p_ids, group_size=3)
    out = M3Loss(M3LossConfig.preset("flagm3", sparse_flops_weight=0.1))(q, q_ids, p, p_ids, group_size=3)
    want = 0.1 * float(flops(p_ids, p.sparse))
    assert float(out.stats["sparse_flops"]) == pytest.approx(want)
    assert float(out.loss) == pytest.approx(float(plain.loss) + want)
    assert "sparse_active_passage" in out.stats


@pytest.mark.parametrize("heads", [("dense", "sparse", "colbert"), ("dense",)])
def test_gradcache_gives_the_same_gradients(tiny_encoder_dir, tiny_tokenizer, heads):
    inputs = collate(tiny_tokenizer, make_items(False))
    model = load_model(tiny_encoder_dir)
    config = M3LossConfig.preset("bge-m3", heads=heads, mrl_dims=(4, 8), sparse_flops_weight=0.01)
    results = []
    for sub in (None, SUB):
        model.zero_grad(set_to_none=True)
        out = M3TrainingLoss(M3Loss(config), sub_batch_size=sub)(model, inputs)
        out.loss.backward()
        results.append((float(out.loss), grads(model), out.logs, out.stats))
    (loss_plain, grads_plain, logs, stats), (loss_cached, grads_cached, _, cached_stats) = results
    if "sparse" in heads:  # the FLOPS value is logged with sparse health, with cached gradients too
        assert float(cached_stats["sparse_flops"]) == pytest.approx(float(stats["sparse_flops"]), rel=1e-9)
    assert "loss_dense@4" in logs and ("loss_colbert@8" in logs) == ("colbert" in heads)
    assert loss_cached == pytest.approx(loss_plain, rel=1e-9)
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_cached[name], g, rtol=1e-6, atol=1e-9, msg=name)
    assert grads_plain["encoder.embeddings.word_embeddings.weight"].abs().sum() > 0


def test_mrl_dims_flag_trains_and_logs_no_not_implemented(caplog):
    parser = M3ArgumentParser()
    with caplog.at_level(logging.INFO):
        _, _, args = parser.parse_args_into_dataclasses(
            ["--model_name_or_path", "m", "--output_dir", "/tmp/unused", "--mrl_dims", "96", "192", "384",
             "--mrl_weights", "0.5", "1", "1"])
    config = args.loss_config()
    assert tuple(config.mrl_dims) == (96, 192, 384) and config.mrl_weight(96) == 0.5
    assert "not implemented" not in caplog.text
    assert "mrl_dims" not in parser.legacy and "use_mrl" not in parser.legacy
    _, _, args = parser.parse_args_into_dataclasses(["--model_name_or_path", "m", "--output_dir", "/tmp/unused",
                                                     "--use_mrl"])
    assert tuple(args.loss_config().mrl_dims) == (256, 512)
    with pytest.raises(ValueError, match="one weight per mrl_dims"):
        M3LossConfig(mrl_dims=(2, 4), mrl_weights=(1.0,)).validate()


def test_pooling_aware_training_scores_the_pooled_passages():
    """colbert_pool_factor 2: the ColBERT term equals the one on passages pooled by flagm3.compression, and the
    gradient reaches the (unpooled) passage vectors through the cluster means."""
    from flagm3.compression import pool_colbert_batch

    q, q_ids = random_outputs(2, 5, 0)
    p, p_ids = random_outputs(6, 7, 1)
    p.colbert.requires_grad_(True)
    config = dict(heads=("colbert",), use_self_distill=False)
    out = M3Loss(M3LossConfig(colbert_pool_factor=2, **config))(q, q_ids, p, p_ids, group_size=3)
    vecs, mask = pool_colbert_batch(p.colbert.detach(), p.colbert_mask, 2)
    assert mask.sum(1).tolist() == [1, 3, 3, 3, 3, 3]  # 3 real tokens (row 0) -> 1, 7 -> 3
    pooled = M3Output(dense=p.dense, sparse=p.sparse, colbert=vecs, colbert_mask=mask)
    want = M3Loss(M3LossConfig(**config))(q, q_ids, pooled, p_ids, group_size=3)
    assert float(out.loss) == pytest.approx(float(want.loss), abs=1e-12)
    plain = M3Loss(M3LossConfig(**config))(q, q_ids, p, p_ids, group_size=3)
    assert float(out.loss) != pytest.approx(float(plain.loss))
    out.loss.backward()
    assert p.colbert.grad.abs().sum() > 0


def test_pooling_aware_nested_colbert_term_cuts_then_pools_as_encode_does():
    """colbert_pool_factor 2 with mrl_dims (4,): the nested ColBERT term is the one on passages cut to 4 dimensions
    and then pooled (M3Embedder.encode's order: colbert_dim, then pool_factor), not the pooled full-size vectors
    cut afterwards (clustering on 8 dimensions groups other tokens than on 4)."""
    from flagm3.compression import pool_colbert_batch, truncate

    q, q_ids = random_outputs(2, 5, 0)
    p, p_ids = random_outputs(6, 7, 1)
    config = dict(heads=("colbert",), use_self_distill=False)
    out = M3Loss(M3LossConfig(colbert_pool_factor=2, mrl_dims=(4,), **config))(q, q_ids, p, p_ids, group_size=3)

    def term(q_vecs, p_vecs, p_mask):
        q_d = M3Output(colbert=q_vecs, colbert_mask=q.colbert_mask)
        p_d = M3Output(colbert=p_vecs, colbert_mask=p_mask)
        return float(M3Loss(M3LossConfig(**config))(q_d, q_ids, p_d, p_ids, group_size=3).loss)

    cut_then_pool = pool_colbert_batch(truncate(p.colbert, 4, True), p.colbert_mask, 2)
    pooled = pool_colbert_batch(p.colbert, p.colbert_mask, 2)
    assert float(out.logs["loss_colbert@4"]) == pytest.approx(term(truncate(q.colbert, 4, True), *cut_then_pool),
                                                               abs=1e-12)
    assert float(out.logs["loss_colbert"]) == pytest.approx(term(q.colbert, *pooled), abs=1e-12)
    pool_then_cut = term(truncate(q.colbert, 4, True), truncate(pooled[0], 4, True), pooled[1])
    assert float(out.logs["loss_colbert@4"]) != pytest.approx(pool_then_cut, abs=1e-9)


@pytest.mark.slow
def test_two_ranks_with_cross_device_negatives_give_the_single_process_step(tmp_path, tiny_encoder_dir):
    """--mrl_dims with negatives gathered from 2 gloo ranks: the nested terms score the gathered passages, so the
    loss and the gradients after DDP are those of one process holding the global batch."""
    from dist_scripts.common import (
        assert_close,
        launch,
        losses,
        ranks,
        run_in_process,
        tensors,
        train_args,
        write_train_data,
    )

    data = write_train_data(tmp_path / "four.jsonl", 4)
    args = train_args(tiny_encoder_dir, data, tmp_path / "out", optim="sgd", learning_rate=0.5, max_grad_norm=0,
                      negatives_cross_device=True) + ["--mrl_dims", "4", "8", "--mrl_weights", "0.5", "1"]
    launch([[tmp_path / "two", *args]], timeout=240)
    run_in_process(tmp_path / "one", args + ["--per_device_train_batch_size", "4",
                                             "--output_dir", str(tmp_path / "out1")])
    (single,) = ranks(tmp_path / "one")
    rank0, _ = ranks(tmp_path / "two")
    assert losses(rank0) == pytest.approx(losses(single), rel=1e-5)
    grads_2, grads_1 = tensors(tmp_path / "two", "grads"), tensors(tmp_path / "one", "grads")
    scale = max(g.abs().max() for g in grads_1.values())
    for name in grads_1:
        assert_close(grads_2[name], grads_1[name], name, rtol=1e-4, atol=5e-5 * scale)
