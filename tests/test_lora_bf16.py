"""Training paths in one CPU process: bf16 autocast, SDPA attention, gradient checkpointing, LoRA.

Every run is ``flagm3 train`` (``build_trainer`` + ``M3Trainer``) on 4 records = one batch of 4, tiny BERT
with dropout 0, so the first step of two runs sees the same inputs and weights.
"""

from __future__ import annotations

import pytest
import torch
from dist_scripts.common import assert_close, losses, tensors, train_args, train_in_process, write_train_data

from flagm3 import M3Model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_train_data(tmp_path_factory.mktemp("lora_bf16") / "four.jsonl", 4)


@pytest.fixture(scope="module")
def m3_checkpoint(tmp_path_factory, tiny_encoder_dir):
    """A flagm3 checkpoint (encoder + fresh heads) to start LoRA from and to reload as its base."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("m3_base")
    torch.manual_seed(5)
    M3Model.from_encoder(str(tiny_encoder_dir), colbert_dim=16).save_pretrained(str(path))
    AutoTokenizer.from_pretrained(str(tiny_encoder_dir)).save_pretrained(str(path))
    return path


def one_step(tmp_path, name: str, model, data, **overrides):
    """Train with ``per_device_train_batch_size=4`` (the whole data) and return (trainer, record, grads)."""
    out = tmp_path / name
    args = train_args(model, data, out / "model", per_device_train_batch_size=4, **overrides)
    trainer, record = train_in_process(out, args)
    grads = tensors(out, "grads") if (out / "grads.pt").exists() else None
    return trainer, record, grads


def assert_same_grads(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert_close(a[name], b[name], name, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def eager_fp32(tmp_path_factory, tiny_encoder_dir, data):
    return one_step(tmp_path_factory.mktemp("eager"), "eager", tiny_encoder_dir, data, attn_implementation="eager")


# ---------------------------------------------------------------------------------------------- bf16
def test_bf16_on_cpu_trains_and_starts_at_the_fp32_loss(tmp_path, tiny_encoder_dir, data, eager_fp32):
    _, fp32, _ = eager_fp32
    trainer, bf16, _ = one_step(tmp_path, "bf16", tiny_encoder_dir, data, attn_implementation="eager",
                                bf16=True, max_steps=3, learning_rate=2e-3)
    assert trainer.args.bf16 and trainer.accelerator.mixed_precision == "bf16"
    curve = losses(bf16)
    assert len(curve) == 3 and all(torch.isfinite(torch.tensor(curve)))
    first, reference = curve[0], losses(fp32)[0]
    assert first != reference  # autocast really ran the encoder in bf16 ...
    assert first == pytest.approx(reference, rel=2e-2)  # ... and scores/losses stay close in fp32
    assert curve[-1] < curve[0]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast: fp32 master weights


# ----------------------------------------------------------------------------------------------- SDPA
def test_sdpa_attention_gives_the_eager_loss_and_gradients(tmp_path, tiny_encoder_dir, data, eager_fp32):
    _, eager, eager_grads = eager_fp32
    _, sdpa, sdpa_grads = one_step(tmp_path, "sdpa", tiny_encoder_dir, data, attn_implementation="sdpa")
    assert eager["attn_implementation"] == "eager" and sdpa["attn_implementation"] == "sdpa"
    # transformers 4.57 logs the loss rounded to 4 decimals: equal up to that rounding (the gradients, exact)
    assert losses(sdpa)[0] == pytest.approx(losses(eager)[0], rel=1e-5, abs=1.01e-4)
    assert_same_grads(sdpa_grads, eager_grads, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_gives_the_same_first_step_gradients(tmp_path, tiny_encoder_dir, data, eager_fp32):
    _, plain, plain_grads = eager_fp32
    _, ckpt, ckpt_grads = one_step(tmp_path, "ckpt", tiny_encoder_dir, data, attn_implementation="eager",
                                   gradient_checkpointing=True)
    assert ckpt["gradient_checkpointing"] and not plain["gradient_checkpointing"]
    assert losses(ckpt)[0] == pytest.approx(losses(plain)[0], rel=1e-6)
    assert_same_grads(ckpt_grads, plain_grads, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------- LoRA
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, m3_checkpoint, data):
    root = tmp_path_factory.mktemp("lora")
    trainer, record, _ = one_step(root, "lora", m3_checkpoint, data, use_lora=True, lora_rank=4, lora_alpha=8,
                                  max_steps=3, learning_rate=5e-3, warmup_steps=0)
    return trainer, record, root / "lora" / "model"


TEXTS = ("wing lift drag flow at supersonic speed over a cone", "laminar boundary layer heat transfer in the wake")


def encode(model, tokenizer, texts=TEXTS) -> dict:
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return {k: out[k] for k in ("dense", "sparse", "colbert")}


def assert_same_outputs(a: dict, b: dict, atol: float = 1e-6) -> None:
    """Equal up to float rounding (the same weights; kernels may round differently run to run)."""
    for head in a:
        assert_close(a[head], b[head], head, rtol=1e-5, atol=atol)


def test_lora_adapts_the_encoder_and_trains_the_heads_fully(lora_run, m3_checkpoint):
    from safetensors import safe_open

    trainer, record, out = lora_run
    assert all(torch.isfinite(torch.tensor(losses(record))))
    names = dict(trainer.model.named_parameters())
    trainable = {n for n, p in names.items() if p.requires_grad}
    assert any(".attention.self.query.lora_A." in n for n in trainable)
    assert any(".intermediate.dense.lora_B." in n for n in trainable)
    assert {n for n in trainable if "lora_" not in n} == {
        f"base_model.model.{head}.modules_to_save.default.{p}"
        for head in ("sparse_linear", "colbert_linear") for p in ("weight", "bias")
    }
    assert (out / "adapter_config.json").is_file()
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert any("lora_A" in k for k in saved) and not any(".attention.self.query.weight" in k for k in saved)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    base = M3Model.from_pretrained(str(m3_checkpoint))
    for head in ("sparse_linear", "colbert_linear"):  # the heads are trained fully and saved beside the adapter
        trained = names[f"base_model.model.{head}.modules_to_save.default.weight"]
        assert id(trained) in optimized
        key = next(k for k in saved if k.endswith(f"{head}.weight"))
        torch.testing.assert_close(saved[key], trained.detach(), rtol=0, atol=0)
    # ColBERT's gradients are never zero here (a fresh sparse head's ReLU may be off on every token)
    assert not torch.equal(saved["base_model.model.colbert_linear.weight"], base.colbert_linear.weight.detach())


def test_lora_reloads_onto_the_base_and_merges_into_a_plain_model(lora_run, m3_checkpoint, tmp_path):
    from peft import PeftModel

    trainer, _, out = lora_run
    tokenizer = trainer.processing_class
    trained = encode(trainer.model, tokenizer)

    reloaded = PeftModel.from_pretrained(M3Model.from_pretrained(str(m3_checkpoint)), str(out))
    assert_same_outputs(encode(reloaded, tokenizer), trained)
    untouched = encode(M3Model.from_pretrained(str(m3_checkpoint)), tokenizer)
    assert not torch.allclose(untouched["dense"], trained["dense"])  # the adapter changed the model

    merged = reloaded.merge_and_unload()
    assert type(merged) is M3Model
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    merged_out = encode(merged, tokenizer)
    assert_same_outputs(merged_out, trained, atol=1e-5)
    merged.save_pretrained(str(tmp_path / "merged"))
    assert_same_outputs(encode(M3Model.from_pretrained(str(tmp_path / "merged")), tokenizer), merged_out)
