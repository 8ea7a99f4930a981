"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU ranks (gloo) with the shipped configs, under the HF Trainer.

One ``torchrun --nproc_per_node=2`` launch runs three trainings on the same 4 records (one global batch, so every
step sees the same queries and the loss should fall):

- ``zero2``: ``deepspeed_configs/ds_stage2.json``, bf16, from a plain encoder (fresh heads), 4 AdamW steps;
- ``zero3``: ``ds_stage3.json`` with every parameter partitioned (persistence threshold 0: the tiny model would
  otherwise stay whole), fp32, from a flagm3 checkpoint, with ``--save_bge_m3_layout``;
- ``zero3_encoder``: ZeRO-3 from a plain encoder (the model loads whole and DeepSpeed partitions it).

DeepSpeed's shared-memory op build is switched off in the runner; the configs have no ``optimizer`` section,
so the Trainer's torch AdamW is used and nothing compiles.
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
    run_in_process,
    tensors,
    train_args,
    write_train_data,
)

from flagm3 import M3Model

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")

CONFIGS = REPO / "deepspeed_configs"


def test_configs_are_hf_trainer_auto_configs():
    for stage in (1, 2, 3):
        config = json.loads((CONFIGS / f"ds_stage{stage}.json").read_text())
        assert config["zero_optimization"]["stage"] == stage
        assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping"):
            assert config[key] == "auto", key
        # the Trainer builds the optimizer: --head_learning_rate's parameter groups survive
        assert "optimizer" not in config and "scheduler" not in config
    stage3 = json.loads((CONFIGS / "ds_stage3.json").read_text())["zero_optimization"]
    assert stage3["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.fixture(scope="module")
def m3_checkpoint(tmp_path_factory, tiny_encoder_dir):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("m3_start")
    torch.manual_seed(3)
    M3Model.from_encoder(str(tiny_encoder_dir), colbert_dim=16).save_pretrained(str(path))
    AutoTokenizer.from_pretrained(str(tiny_encoder_dir)).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory, tiny_encoder_dir, m3_checkpoint):
    root = tmp_path_factory.mktemp("deepspeed")
    data = write_train_data(root / "four.jsonl", 4)
    stage3 = json.loads((CONFIGS / "ds_stage3.json").read_text())
    stage3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (root / "ds_stage3_partition_all.json").write_text(json.dumps(stage3))
    common = dict(negatives_cross_device=True, learning_rate=2e-3, warmup_steps=0, lr_scheduler_type="constant")
    runs = {
        "zero2": train_args(tiny_encoder_dir, data, root / "out_zero2", max_steps=4, bf16=True,
                            deepspeed=CONFIGS / "ds_stage2.json", **common),
        "zero3": train_args(m3_checkpoint, data, root / "out_zero3", max_steps=3, save_bge_m3_layout=True,
                            deepspeed=root / "ds_stage3_partition_all.json", **common),
        "zero3_encoder": train_args(tiny_encoder_dir, data, root / "out_zero3_encoder", max_steps=1,
                                    deepspeed=root / "ds_stage3_partition_all.json", **common),
    }
    launch([[root / name, *args] for name, args in runs.items()], timeout=300)
    return root, runs


def first_loss_in_one_process(root, args, name: str) -> float:
    """The first step's loss of the same run without DeepSpeed, in one process holding the global batch."""
    args = [a for a in args]
    cut = args.index("--deepspeed")
    args = args[:cut] + args[cut + 2 :] + ["--per_device_train_batch_size", "4", "--max_steps", "1",
                                           "--output_dir", str(root / f"out_{name}_single"), "--bf16", "False"]
    return losses(run_in_process(root / f"{name}_single", args))[0]


def reloaded(path) -> dict[str, torch.Tensor]:
    return {n: p.detach().float() for n, p in M3Model.from_pretrained(str(path)).named_parameters()}


def test_zero2_trains_and_saves_a_reloadable_safetensors_model(deepspeed_runs):
    root, runs = deepspeed_runs
    rank0, rank1 = ranks(root / "zero2")
    assert rank0["global_step"] == rank1["global_step"] == 4
    curve = losses(rank0)
    assert len(curve) == 4 and all(torch.isfinite(torch.tensor(curve)))
    assert curve[-1] < curve[0], curve
    # bf16 ZeRO-2 on 2 ranks starts from the fp32 single-process loss (up to bf16 rounding)
    assert curve[0] == pytest.approx(first_loss_in_one_process(root, runs["zero2"], "zero2"), rel=3e-2)
    out = root / "out_zero2"
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    saved, trained = reloaded(out), tensors(root / "zero2", "params")
    assert saved.keys() == trained.keys()
    for name in trained:
        assert_close(saved[name], trained[name], name, rtol=0, atol=0)


def test_zero3_saves_the_gathered_trained_weights_in_both_layouts(deepspeed_runs, m3_checkpoint):
    root, runs = deepspeed_runs
    rank0, rank1 = ranks(root / "zero3")
    curve = losses(rank0)
    assert rank0["global_step"] == rank1["global_step"] == 3
    assert all(torch.isfinite(torch.tensor(curve))) and curve[-1] < curve[0], curve
    # fp32 ZeRO-3 on 2 ranks: the single-process loss
    assert curve[0] == pytest.approx(first_loss_in_one_process(root, runs["zero3"], "zero3"), rel=1e-5)

    trained = tensors(root / "zero3", "params")  # gathered from the partitions after training
    start = reloaded(m3_checkpoint)
    assert all(trained[n].numel() == start[n].numel() for n in start)
    assert any(not torch.equal(trained[n], start[n]) for n in ("sparse_linear.weight", "colbert_linear.weight"))
    assert any(not torch.equal(trained[n], start[n]) for n in start if n.startswith("encoder."))

    out = root / "out_zero3"
    for layout in (out, out / "bge-m3"):  # flagm3 safetensors, and the BGE-M3 layout written by M3Trainer._save
        saved = reloaded(layout)
        assert saved.keys() == trained.keys()
        for name in trained:
            assert_close(saved[name], trained[name], f"{layout}: {name}", rtol=0, atol=0)
    # saved under the model's own parameter names (not transformers' legacy LayerNorm gamma/beta)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(trained)


def test_zero3_from_a_plain_encoder(deepspeed_runs, tiny_encoder_dir):
    root, _ = deepspeed_runs
    rank0, _ = ranks(root / "zero3_encoder")
    assert rank0["global_step"] == 1 and all(torch.isfinite(torch.tensor(losses(rank0))))
    saved, trained = reloaded(root / "out_zero3_encoder"), tensors(root / "zero3_encoder", "params")
    for name in trained:
        assert_close(saved[name], trained[name], name, rtol=0, atol=0)


def test_head_learning_rate_is_refused_with_a_deepspeed_optimizer():
    """A DeepSpeed "optimizer" section builds the optimizer from a flat parameter list: the heads' learning
    rate would be silently ignored, so build_trainer refuses the combination."""
    from types import SimpleNamespace

    from flagm3.distributed import check_deepspeed_config

    with_optimizer = {**json.loads((CONFIGS / "ds_stage2.json").read_text()),
                      "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}}}

    def args(config, head_lr):
        return SimpleNamespace(hf_deepspeed_config=SimpleNamespace(config=config), head_learning_rate=head_lr,
                               deepspeed="ds.json")

    with pytest.raises(ValueError, match="head_learning_rate.*optimizer"):
        check_deepspeed_config(args(with_optimizer, 1e-3))
    check_deepspeed_config(args(with_optimizer, None))
    check_deepspeed_config(args(json.loads((CONFIGS / "ds_stage2.json").read_text()), 1e-3))
    check_deepspeed_config(SimpleNamespace(hf_deepspeed_config=None, head_learning_rate=1e-3))
