"""flagm3.compat: the transformers 4.57 / 5.x differences, each on the case it exists for."""

from __future__ import annotations

import pytest
import torch

from flagm3 import compat
from flagm3.training_args import M3TrainingArguments


def test_tokenizer_config_for_v4_moves_a_list_of_extra_special_tokens():
    written = {"tokenizer_class": "XLMRobertaTokenizer", "extra_special_tokens": [], "eos_token": "</s>"}
    assert compat.tokenizer_config_for_v4(written) == {"tokenizer_class": "XLMRobertaTokenizer", "eos_token": "</s>"}
    written = {"extra_special_tokens": ["<q>", "<d>"], "additional_special_tokens": ["<d>"]}
    assert compat.tokenizer_config_for_v4(written) == {"additional_special_tokens": ["<d>", "<q>"]}
    mapping = {"extra_special_tokens": {"image_token": "<img>"}}  # 4.x's own form stays
    assert compat.tokenizer_config_for_v4(mapping) is mapping


@pytest.mark.parametrize("warmup", ["0.1", "0", "5"])
def test_warmup_steps_below_one_is_a_fraction_on_every_version(tmp_path, warmup):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(M3TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "True", "--report_to", "none", "--warmup_steps", warmup])
    assert args.get_warmup_steps(200) == (20 if warmup == "0.1" else int(warmup))


def test_mixed_precision_of_one_run_does_not_leak_into_the_next(tmp_path, monkeypatch):
    """transformers 4.x's TrainingArguments wrote bf16 into $ACCELERATE_MIXED_PRECISION, and the next arguments
    of the process (and its Trainer's Accelerator) read it back: a later fp32 run trained in bf16."""
    from transformers import Trainer

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    model = torch.nn.Linear(2, 2)
    common = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    bf16 = Trainer(model=model, args=M3TrainingArguments(bf16=True, **common))
    assert bf16.accelerator.mixed_precision == "bf16"
    plain = Trainer(model=model, args=M3TrainingArguments(**common))
    assert plain.accelerator.mixed_precision == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # a launcher's setting is kept
    assert Trainer(model=model, args=M3TrainingArguments(**common)).accelerator.mixed_precision == "bf16"


def test_mismatched_shapes_from_either_loading_info(tmp_path):
    from safetensors.torch import save_file

    model = torch.nn.Linear(4, 3)
    save_file({"weight": torch.zeros(5, 4), "bias": torch.zeros(5)}, str(tmp_path / "model.safetensors"))
    v4 = {"mismatched_keys": ["weight", "bias"]}
    v5 = {"mismatched_keys": [("weight", (5, 4), (3, 4)), ("bias", (5,), (3,))]}
    want = [("weight", (5, 4), (3, 4)), ("bias", (5,), (3,))]
    assert compat.mismatched_shapes(v4, model, str(tmp_path / "model.safetensors")) == want
    assert compat.mismatched_shapes(v5, model, str(tmp_path / "model.safetensors")) == want


def test_init_copy_fills_a_buffer():
    buffer = torch.zeros(3, dtype=torch.long)
    compat.init_copy_(buffer, torch.tensor([1, 2, 3]))
    assert buffer.tolist() == [1, 2, 3]
