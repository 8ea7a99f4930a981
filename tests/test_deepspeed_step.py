"""The loss-owned training step under DeepSpeed ZeRO-2 on two CPU ranks (gloo), in one ``torchrun`` launch:

- cached gradients (``--sub_batch_size``) give the loss and the SGD update (hence the gradients) of the plain
  step: the replay from the loss's backward hook reduces each gradient once (``ds_grad_is_ready``);
- with gradient accumulation, a micro-batch with a non-finite loss skips the step, and DeepSpeed's own counters
  (``global_steps``, ``micro_steps``, driven by accelerate from inside ``backward``) stay equal to the Trainer's
  step after every step, the poisoned one included;
- a NaN gradient behind a finite loss (on one rank) skips the step under ZeRO-0 (the engine steps the torch
  optimizer itself) and ZeRO-2 (its partitioned gradients): no parameter changes, and the step is reported.
"""

from __future__ import annotations

import json

import pytest
import torch
from dist_scripts.common import (
    REPO,
    assert_close,
    launch,
    losses,
    ranks,
    tensors,
    train_args,
    write_train_data,
)

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_encoder_dir):
    root = tmp_path_factory.mktemp("deepspeed_step")
    data = write_train_data(root / "eight.jsonl", 8)
    config = json.loads((REPO / "deepspeed_configs" / "ds_stage2.json").read_text())
    config["zero_allow_untested_optimizer"] = True  # torch SGD: the update is -lr * gradient
    (root / "ds_stage2_sgd.json").write_text(json.dumps(config))
    config["zero_optimization"]["stage"] = 0
    (root / "ds_stage0.json").write_text(json.dumps(config))
    sgd = dict(optim="sgd", learning_rate=0.5, max_grad_norm=0, negatives_cross_device=True,
               deepspeed=root / "ds_stage2_sgd.json", max_steps=1)
    specs = {
        "plain": train_args(tiny_encoder_dir, data, root / "out_plain", **sgd),
        "cached": train_args(tiny_encoder_dir, data, root / "out_cached", sub_batch_size=2, **sgd),
        "poisoned": train_args(tiny_encoder_dir, data, root / "out_poisoned", max_steps=3, gradient_accumulation_steps=2,
                               per_device_train_batch_size=1, max_length_chunks=1, learning_rate=1e-3,
                               deepspeed=root / "ds_stage2_sgd.json") + ["--test_poison", "2:1"],
        **{f"nan_zero{stage}": train_args(tiny_encoder_dir, data, root / f"out_nan_zero{stage}", max_steps=3,
                                          learning_rate=1e-2, deepspeed=root / f"ds_stage{stage}{suffix}.json")
           + ["--test_nan_gradient", "2"] for stage, suffix in ((0, ""), (2, "_sgd"))},
    }
    launch([[root / name, *args] for name, args in specs.items()], timeout=400)
    return root


def test_cached_gradients_under_zero2_equal_the_plain_step(runs):
    plain, cached = ranks(runs / "plain"), ranks(runs / "cached")
    assert all(r["engine_steps"] for r in plain + cached)  # DeepSpeed ran the step
    for p, c in zip(plain, cached):
        assert losses(c) == pytest.approx(losses(p), rel=1e-5)
    after_plain, after_cached = tensors(runs / "plain", "params"), tensors(runs / "cached", "params")
    assert after_plain.keys() == after_cached.keys()
    scale = max(float(t.abs().max()) for t in after_plain.values())
    for name in after_plain:
        assert_close(after_cached[name], after_plain[name], name, rtol=1e-4, atol=1e-6 * scale)


def test_a_skipped_micro_batch_keeps_deepspeed_steps_in_line(runs):
    for record in ranks(runs / "poisoned"):
        assert record["global_step"] == 3
        steps = record["engine_steps"]
        assert [s["trainer"] for s in steps] == [1, 2, 3]
        for s in steps:
            assert s["engine_global_steps"] == s["trainer"] and s["engine_micro_steps"] == s["trainer"], steps
        assert all(torch.isfinite(torch.tensor(losses(record))))
    params = tensors(runs / "poisoned", "params")
    assert all(torch.isfinite(t).all() for t in params.values())


@pytest.mark.parametrize("stage", [0, 2])
def test_a_nan_gradient_behind_a_finite_loss_skips_the_step_under_deepspeed(runs, stage):
    """Regression (issue 16): under DeepSpeed only a non-finite loss was caught; a NaN gradient with a finite loss
    stepped through ZeRO-0 (NaN parameters) and went unreported under ZeRO-2."""
    for record in ranks(runs / f"nan_zero{stage}"):
        assert record["changed"] == {"1": True, "2": False, "3": True}, record["changed"]
        assert all(torch.isfinite(torch.tensor(losses(record))))
        (warning,) = [w for w in record["warnings"] if "non-finite" in w]
        assert warning.startswith("step 2: non-finite gradient") and "step skipped (1 in a row)" in warning
    params = tensors(runs / f"nan_zero{stage}", "params")
    assert all(torch.isfinite(t).all() for t in params.values())
