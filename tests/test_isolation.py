"""No test leaks process-wide state into the next (tests/conftest.py restores it after every test and module).

The first test changes everything conftest's ``_global_state`` covers; the second, run after it, finds none of it.
Without the restoring fixtures a leaked DeepSpeed config broke every later ``from_pretrained`` when deepspeed was
not installed (``'HfTrainerDeepSpeedConfig' object has no attribute 'is_zero3'``).
"""

from __future__ import annotations

import os

import torch

PROBE = "FLAGM3_ISOLATION_PROBE"


class _HalfBuiltDeepSpeedConfig:
    """What transformers leaves behind when deepspeed is missing: a registered config without ``is_zero3``."""


_kept_alive = []  # the weak reference stays valid, as it did through a failed test's traceback


def test_a_test_changes_process_state():
    from transformers import AttentionInterface
    from transformers.integrations import deepspeed as hf_deepspeed

    os.environ[PROBE] = "1"
    torch.set_num_threads(3 if torch.get_num_threads() != 3 else 2)
    config = _HalfBuiltDeepSpeedConfig()
    _kept_alive.append(config)
    hf_deepspeed.set_hf_deepspeed_config(config)
    AttentionInterface.register("flagm3_probe", lambda *args, **kwargs: None)
    torch.set_grad_enabled(False)


def test_the_next_test_sees_none_of_it(tiny_encoder_dir):
    from transformers import AttentionInterface
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    assert PROBE not in os.environ
    assert torch.get_num_threads() != 3 or os.cpu_count() == 3
    assert "flagm3_probe" not in AttentionInterface._global_mapping
    assert torch.is_grad_enabled()
    assert is_deepspeed_zero3_enabled() is False  # raised AttributeError while the probe config leaked
    from flagm3 import M3Model

    M3Model.from_encoder(str(tiny_encoder_dir))  # what every later test does
