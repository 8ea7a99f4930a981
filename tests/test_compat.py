"""flagm3.compat: the transformers 4.57 / 5.x differences, each on the case it exists for."""

from __future__ import annotations

import pytest
import torch

from flagm3 import compat


def test_tokenizer_config_for_v4_moves_a_list_of_extra_special_tokens():
    written = {"tokenizer_class": "XLMRobertaTokenizer", "extra_special_tokens": [], "eos_token": "</s>"}
    assert compat.tokenizer_config_for_v4(written) == {"tokenizer_class": "XLMRobertaTokenizer", "eos_token": "</s>"}
    written = {"extra_special_tokens": ["<q>", "<d>"], "additional_special_tokens": ["<d>"]}
    assert compat.tokenizer_config_for_v4(written) == {"additional_special_tokens": ["<d>", "<q>"]}
    mapping = {"extra_special_tokens": {"image_token": "<img>"}}  # 4.x's own form stays
    assert compat.tokenizer_config_for_v4(mapping) is mapping


@pytest.mark.parametrize("warmup", [0.1, 0.0, 5])
def test_warmup_arguments_give_the_same_warmup_steps(tmp_path, warmup):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **compat.warmup_arguments(warmup))
    assert args.get_warmup_steps(200) == (20 if warmup == 0.1 else int(warmup))


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
