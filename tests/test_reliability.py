"""Reliability of long runs: non-finite steps are skipped without touching the model, optimizer or schedule;
broken checkpoints fail at load with the file named; weights load only safely."""

from __future__ import annotations

import ast
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from conftest import REPO, build_cli_trainer, write_train_file
from transformers import TrainerCallback

from flagm3.trainer import NonFiniteLossError, unwrap_m3

NAN = float("nan")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_train_file(tmp_path_factory.mktemp("reliability") / "train.jsonl", 8)


def build(encoder: Path, data: Path, out: Path, *extra: str):
    """Four steps at a high learning rate, logging every step."""
    return build_cli_trainer(encoder, data, out, "--learning_rate", "1e-2", "--max_steps", "4", "--logging_steps",
                             "1", "--seed", "3", "--loss_preset", "bge-m3", *extra)


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
    """Multiply the sparse head's output by ``value`` on the given (1-based) steps (and micro-batches); the
    output's sign is dropped first, so every token passes the ReLU whatever the head's random init."""
    calls = [0]

    def hook(module, inputs, output):
        micro = calls[0] // 2 % trainer.args.gradient_accumulation_steps  # 2 forwards: queries, passages
        calls[0] += 1
        if trainer.state.global_step + 1 in steps and (micro_batches is None or micro in micro_batches):
            return output.abs() * value
        return None

    unwrap_m3(trainer.model).sparse_linear.register_forward_hook(hook)


def adam_is_finite(trainer) -> bool:
    return all(torch.isfinite(v).all() for state in trainer.optimizer.state.values()
               for v in state.values() if torch.is_tensor(v))


def adam_steps(trainer) -> set[float]:
    return {float(s["step"]) for s in trainer.optimizer.state.values() if "step" in s}


@pytest.mark.parametrize("extra", [[], ["--sub_batch_size", "2"]], ids=["plain", "gradcache"])
def test_nonfinite_loss_skips_the_step_and_training_continues(tiny_encoder_dir, train_file, tmp_path, caplog, extra):
    trainer = build(tiny_encoder_dir, train_file, tmp_path, *extra)
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


# ------------------------------------------------------------------------------------------ checkpoint errors
@pytest.fixture(scope="module")
def big_tokenizer_dir(tiny_encoder_dir, tmp_path_factory) -> Path:
    """The tiny encoder's tokenizer plus 40 added tokens: more ids than the embedding matrix has rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_encoder_dir))
    tokenizer.add_tokens([f"newtoken{i}" for i in range(40)])
    directory = tmp_path_factory.mktemp("big_tokenizer")
    tokenizer.save_pretrained(str(directory))
    return directory


def test_tokenizer_larger_than_the_embeddings_is_refused_at_load(tiny_encoder_dir, big_tokenizer_dir, train_file,
                                                                 tmp_path):
    from transformers import AutoTokenizer

    from flagm3 import CheckpointError, M3Model

    big = AutoTokenizer.from_pretrained(str(big_tokenizer_dir))
    rows = len(big) - 40
    expected = rf"{big_tokenizer_dir}: the tokenizer has {len(big)} tokens but the encoder's embedding matrix in "
    with pytest.raises(CheckpointError, match=expected + rf"{tiny_encoder_dir} has {rows} rows"):
        M3Model.from_encoder(str(tiny_encoder_dir), tokenizer=big)
    # flagm3 train, from a flagm3 checkpoint (whose loader has no tokenizer) with --tokenizer_name
    M3Model.from_encoder(str(tiny_encoder_dir)).save_pretrained(str(tmp_path / "m3"))
    with pytest.raises(CheckpointError, match=expected + rf"{tmp_path / 'm3'} has {rows} rows"):
        build(tmp_path / "m3", train_file, tmp_path / "out", "--tokenizer_name", str(big_tokenizer_dir))
    # inference: M3Embedder refuses it before encoding anything
    from flagm3 import M3Embedder

    with pytest.raises(CheckpointError, match=expected + rf"{tmp_path / 'm3'} has {rows} rows"):
        M3Embedder(str(tmp_path / "m3"), tokenizer=big, use_fp16=False)


def test_colbert_dim_disagreeing_with_the_weights_names_file_and_field(tiny_model, tiny_tokenizer, tmp_path):
    from flagm3 import CheckpointError, M3Embedder, M3Model

    tiny_model.save_pretrained(str(tmp_path))
    tiny_tokenizer.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["colbert_dim"] = 8  # the saved head has 16 outputs
    (tmp_path / "config.json").write_text(json.dumps(config))
    expected = (rf"{tmp_path / 'model.safetensors'}: weights do not match {tmp_path / 'config.json'}: "
                r"config.json has colbert_dim=8 \(ColBERT size 8\) but the weights hold a ColBERT head of size 16 "
                r"\(colbert_linear.bias is \(16,\) in the file, config.json implies \(8,\); colbert_linear.weight is "
                r"\(16, 32\) in the file, config.json implies \(8, 32\)\)")
    with pytest.raises(CheckpointError, match=expected):
        M3Model.from_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match=expected):
        M3Embedder(str(tmp_path), use_fp16=False)


# ---------------------------------------------------------------------------------------------- safe loading
def _package_calls(name: str):
    """(file, line, call) for every call of a function named ``name`` (``torch.load``, ``load``...) in flagm3."""
    for file in sorted((REPO / "flagm3").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    yield file.relative_to(REPO), node.lineno, node


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_weights_load_only_through_safe_paths():
    """Every ``torch.load`` passes ``weights_only=True``; nothing unpickles; safetensors is never turned off."""
    loads = [(f, line, c) for f, line, c in _package_calls("load")
             if isinstance(c.func, ast.Attribute) and getattr(c.func.value, "id", None) in ("torch", "pickle")]
    assert loads, "expected the BGE-M3 head loader's torch.load"
    for file, line, call in loads:
        assert getattr(call.func.value, "id", None) == "torch", f"{file}:{line}: pickle.load"
        value = _keyword(call, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, f"{file}:{line}: torch.load without weights_only"
    assert not list(_package_calls("loads")) or all(
        getattr(c.func.value, "id", None) != "pickle" for _, _, c in _package_calls("loads"))
    for name in ("from_pretrained", "save_pretrained"):
        for file, line, call in _package_calls(name):
            for flag in ("use_safetensors", "safe_serialization"):
                value = _keyword(call, flag)
                assert not (isinstance(value, ast.Constant) and value.value is False), f"{file}:{line}: {flag}=False"


def test_trust_remote_code_is_off_unless_asked():
    """Every ``trust_remote_code`` parameter or field defaults to False and no call passes a literal True."""
    import inspect

    from flagm3.inference import M3Embedder
    from flagm3.training_args import M3ModelArguments

    assert M3ModelArguments.__dataclass_fields__["trust_remote_code"].default is False
    assert inspect.signature(M3Embedder).parameters["trust_remote_code"].default is False
    seen = 0
    for file in sorted((REPO / "flagm3").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
                defaults += node.args.kw_defaults
                for arg, default in zip(args, defaults):
                    if arg.arg == "trust_remote_code":
                        seen += 1
                        assert isinstance(default, ast.Constant) and default.value is False, f"{file}:{node.lineno}"
            elif isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                seen += 1
                assert not (isinstance(node.value, ast.Constant) and node.value.value is True), f"{file}"
            elif isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "trust_remote_code":
                seen += 1
                assert "default=False" in ast.unparse(node.value), f"{file}:{node.lineno}"
    assert seen >= 3
