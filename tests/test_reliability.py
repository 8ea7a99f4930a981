"""Reliability of long runs: non-finite steps are skipped without touching the model, optimizer or schedule;
broken checkpoints fail at load with the file named; weights load only safely."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import SENTENCES
from transformers import TrainerCallback

from flagm3.trainer import NonFiniteLossError, unwrap_m3

NAN = float("nan")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reliability") / "train.jsonl"
    records = [{"query": SENTENCES[i][:30], "pos": [SENTENCES[(i + 1) % 10]], "neg": [SENTENCES[(i + 2) % 10]]}
               for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def build(encoder: Path, data: Path, out: Path, *extra: str):
    from flagm3.train import build_trainer, parse_args

    argv = [
        "--model_name_or_path", str(encoder), "--train_data", str(data), "--output_dir", str(out),
        "--per_device_train_batch_size", "2", "--train_group_size", "2", "--query_max_len", "16",
        "--passage_max_len", "16", "--learning_rate", "1e-2", "--max_steps", "4", "--logging_steps", "1",
        "--save_strategy", "no", "--use_cpu", "True", "--report_to", "none", "--disable_tqdm", "True",
        "--seed", "3", *extra,
    ]  # fmt: skip
    return build_trainer(*parse_args(argv))


class ParameterWatch(TrainerCallback):
    """Which optimizer steps changed the parameters (1-based, as the logs number steps)."""

    def __init__(self) -> None:
        self.changed: dict[int, bool] = {}
        self.lrs: dict[int, float] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = [p.detach().clone() for p in model.parameters()]

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        after = list(model.parameters())
        self.changed[state.global_step] = any(not torch.equal(a, b) for a, b in zip(after, self.before))
        self.lrs[state.global_step] = optimizer.param_groups[0]["lr"]


def poison_sparse_head(trainer, value: float, steps: set[int], micro_batches: set[int] | None = None) -> None:
    """Multiply the sparse head's output by ``value`` on the given (1-based) steps (and micro-batches)."""
    calls = [0]

    def hook(module, inputs, output):
        micro = calls[0] // 2 % trainer.args.gradient_accumulation_steps  # 2 forwards: queries, passages
        calls[0] += 1
        if trainer.state.global_step + 1 in steps and (micro_batches is None or micro in micro_batches):
            return output * value
        return None

    unwrap_m3(trainer.model).sparse_linear.register_forward_hook(hook)


def adam_is_finite(trainer) -> bool:
    return all(torch.isfinite(v).all() for state in trainer.optimizer.state.values()
               for v in state.values() if torch.is_tensor(v))


def adam_steps(trainer) -> set[float]:
    return {float(s["step"]) for s in trainer.optimizer.state.values() if "step" in s}


def test_nonfinite_loss_skips_the_step_and_training_continues(tiny_encoder_dir, train_file, tmp_path, caplog):
    trainer = build(tiny_encoder_dir, train_file, tmp_path)
    watch = ParameterWatch()
    trainer.add_callback(watch)
    poison_sparse_head(trainer, math.inf, steps={2})  # infinite lexical scores: a NaN loss
    with caplog.at_level(logging.WARNING, logger="flagm3.trainer"):
        trainer.train()
    assert trainer.state.global_step == 4
    assert watch.changed == {1: True, 2: False, 3: True, 4: True}  # the skipped step leaves every weight alone
    assert adam_is_finite(trainer) and adam_steps(trainer) == {3.0}  # Adam saw 3 updates, no NaN moments
    assert watch.lrs[2] == watch.lrs[1]  # the schedule does not advance on a skipped step
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("step 2: non-finite loss nan") and "loss_sparse" in warnings[0]
    assert "step skipped (1 in a row)" in warnings[0]


def test_nonfinite_gradient_skips_the_step_naming_the_parameter(tiny_encoder_dir, train_file, tmp_path, caplog):
    """NaN sparse weights are dropped by the lexical pooling (NaN > 0 is false): the loss stays finite, but
    the gradient is NaN from the sparse head down."""
    trainer = build(tiny_encoder_dir, train_file, tmp_path)
    watch = ParameterWatch()
    trainer.add_callback(watch)
    poison_sparse_head(trainer, NAN, steps={3})
    with caplog.at_level(logging.WARNING, logger="flagm3.trainer"):
        trainer.train()
    assert watch.changed == {1: True, 2: True, 3: False, 4: True}
    assert adam_is_finite(trainer) and adam_steps(trainer) == {3.0}
    (warning,) = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert warning.startswith("step 3: non-finite gradient of sparse_linear.weight, sparse_linear.bias, encoder.")
    assert "more; step skipped (1 in a row)" in warning


def test_a_bad_micro_batch_skips_the_whole_accumulated_step(tiny_encoder_dir, train_file, tmp_path):
    """With gradient accumulation, NaN in one micro-batch drops the step's other micro-batches too (no update
    from a partial gradient)."""
    trainer = build(tiny_encoder_dir, train_file, tmp_path, "--gradient_accumulation_steps", "2",
                    "--max_steps", "3", "--per_device_train_batch_size", "1")
    watch = ParameterWatch()
    trainer.add_callback(watch)
    poison_sparse_head(trainer, math.inf, steps={2}, micro_batches={0})
    trainer.train()
    assert watch.changed == {1: True, 2: False, 3: True}
    assert adam_is_finite(trainer) and adam_steps(trainer) == {2.0}


def test_consecutive_nonfinite_steps_stop_training_with_a_clear_error(tiny_encoder_dir, train_file, tmp_path):
    trainer = build(tiny_encoder_dir, train_file, tmp_path, "--max_consecutive_nonfinite_steps", "2")
    watch = ParameterWatch()
    trainer.add_callback(watch)
    poison_sparse_head(trainer, math.inf, steps={2, 3, 4})
    with pytest.raises(NonFiniteLossError) as err:
        trainer.train()
    message = str(err.value)
    assert message.startswith("2 consecutive steps with a non-finite loss nan at step 3")
    assert "'loss_sparse': nan" in message and "Lower the learning rate" in message
    assert watch.changed == {1: True, 2: False}
    assert adam_is_finite(trainer)


def test_isolated_nonfinite_steps_do_not_add_up(tiny_encoder_dir, train_file, tmp_path):
    """Steps 1 and 3 bad with a limit of 2: not consecutive, so training finishes."""
    trainer = build(tiny_encoder_dir, train_file, tmp_path, "--max_consecutive_nonfinite_steps", "2")
    watch = ParameterWatch()
    trainer.add_callback(watch)
    poison_sparse_head(trainer, math.inf, steps={1, 3})
    trainer.train()
    assert watch.changed == {1: False, 2: True, 3: False, 4: True}
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
