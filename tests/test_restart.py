"""Every restart path of ``flagm3 train`` has one clear outcome (issue 16, :mod:`flagm3.resume`).

The tiny dropout BERT of ``test_resume`` trains 2 epochs of 4 steps, saving every 2; its uninterrupted
per-step losses are the reference.

- ``--resume_from_checkpoint last`` on a fresh output directory starts from scratch with one INFO line;
- rerunning the finished run with ``last`` trains nothing and says the run is complete;
- a foreign checkpoint (another encoder; full weights under ``--use_lora``) is refused in one line naming both
  models, before the Trainer loads any of its weights;
- SIGTERM and SIGINT stop at the next step boundary with a checkpoint and one line saying how to resume; the
  resumed run's losses equal the uninterrupted run's;
- a disk that fills while a checkpoint is written (ENOSPC from a patched writer) ends in one line naming the
  path; the previous checkpoint stays complete and ``last`` resumes from it exactly.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_bert_config, train_tokenizer
from test_resume import (
    STEPS,
    LossRecorder,
    assert_same_losses,
    make_dropout_encoder,
    read_losses,
    run_training,
    train_argv,
    write_train_jsonl,
)

import flagm3.train
from flagm3.trainer import M3Trainer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("restart")
    return make_dropout_encoder(root / "encoder"), write_train_jsonl(root / "train.jsonl"), root


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run: trainer, per-step losses, output directory (checkpoints 2, 4, 6, 8)."""
    encoder, data, root = setup
    out = root / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the numerics of the one-thread subprocesses
    try:
        trainer, losses = run_training(train_argv(encoder, data, out))
    finally:
        torch.set_num_threads(threads)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return trainer, losses, out


def run_main(argv: list[str], monkeypatch) -> tuple[object, dict[int, float]]:
    """``flagm3.train.main`` in this process; returns its result and the per-step losses it trained."""
    recorder = LossRecorder()
    build = flagm3.train.build_trainer

    def build_and_record(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(recorder)
        return trainer

    monkeypatch.setattr(flagm3.train, "build_trainer", build_and_record)
    return flagm3.train.main(argv), recorder.losses


def test_last_on_a_fresh_directory_then_rerun_of_the_finished_run(setup, reference, tmp_path, monkeypatch, caplog,
                                                                  capsys):
    encoder, data, _ = setup
    _, want, _ = reference
    out = tmp_path / "run"
    argv = train_argv(encoder, data, out, "--resume_from_checkpoint", "last")
    with caplog.at_level(logging.INFO, logger="flagm3.train"):
        trainer, got = run_main(argv, monkeypatch)
    fresh = [r.getMessage() for r in caplog.records if "starting from scratch" in r.getMessage()]
    assert len(fresh) == 1 and str(out) in fresh[0]
    assert_same_losses(got, want, range(1, STEPS + 1))

    before = sorted(os.listdir(out))
    stamp = os.stat(out / "model.safetensors").st_mtime_ns
    capsys.readouterr()
    result, got = run_main(argv, monkeypatch)  # what a resubmitted job script does
    err = capsys.readouterr().err.strip()
    assert result is None and got == {}
    assert err.count("\n") == 0 and f"checkpoint-{STEPS} is at step {STEPS} of {STEPS}" in err
    assert "the run is complete" in err
    assert sorted(os.listdir(out)) == before and os.stat(out / "model.safetensors").st_mtime_ns == stamp


@pytest.fixture(scope="module")
def other_encoder(tmp_path_factory) -> Path:
    """Another model: the same tokenizer, a hidden size of 48."""
    from transformers import BertModel

    directory = tmp_path_factory.mktemp("other_encoder")
    tokenizer = train_tokenizer(directory)
    torch.manual_seed(1)
    BertModel(tiny_bert_config(len(tokenizer), hidden_size=48)).save_pretrained(str(directory))
    return directory


def _no_weight_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint's weights were loaded")

    monkeypatch.setattr(M3Trainer, "_load_from_checkpoint", refuse)


@pytest.mark.parametrize("case", ["other_encoder", "lora_on_full"])
def test_a_foreign_checkpoint_is_refused_before_any_weight_loads(case, setup, reference, other_encoder, tmp_path,
                                                                 monkeypatch, capsys):
    encoder, data, _ = setup
    _, _, ref_out = reference
    checkpoint = ref_out / "checkpoint-4"
    model, extra = (other_encoder, []) if case == "other_encoder" else (encoder, ["--use_lora", "True"])
    _no_weight_load(monkeypatch)
    argv = train_argv(model, data, tmp_path / "run", "--resume_from_checkpoint", str(checkpoint), *extra)
    with pytest.raises(SystemExit) as exit_info:
        flagm3.train.main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("flagm3 train: --resume_from_checkpoint") and "\n" not in message
    assert str(checkpoint) in message and str(model) in message  # both models named
    assert "bert, hidden 32" in message
    assert ("hidden 48" in message) if case == "other_encoder" else ("LoRA" in message)
    assert not (tmp_path / "run" / "checkpoint-5").exists()


# A separate process: ``flagm3 train`` that signals itself at the start of step SIGNAL_STEP (as a scheduler's
# preemption notice would arrive mid-step), recording the losses it trains.
DRIVER = r"""
import json, os, signal, sys
from transformers import TrainerCallback
import flagm3.train

losses, signum, at_step, argv = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]

class SignalAndRecord(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == at_step:
            os.kill(os.getpid(), signum)
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            with open(losses, "a") as f:
                f.write(json.dumps([state.global_step, logs["loss"]]) + "\n")

build = flagm3.train.build_trainer
def build_with_signal(*args, **kwargs):
    trainer = build(*args, **kwargs)
    trainer.add_callback(SignalAndRecord())
    return trainer
flagm3.train.build_trainer = build_with_signal
flagm3.train.main(argv)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_at_the_step_boundary_and_last_resumes_exactly(signum, setup, reference, tmp_path,
                                                                      monkeypatch):
    encoder, data, _ = setup
    _, want, _ = reference
    out = tmp_path / "run"
    argv = train_argv(encoder, data, out, "--resume_from_checkpoint", "last")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "losses.jsonl"), str(int(signum)), "3",
                           *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert last == (f"flagm3 train: stopped by {name} at step 3, checkpoint saved in {out / 'checkpoint-3'}; "
                    "rerun the same command with --resume_from_checkpoint last to continue")
    assert_same_losses(read_losses(tmp_path / "losses.jsonl"), want, range(1, 4))
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-3"]  # no final model: the run is not over

    _, got = run_main(argv, monkeypatch)  # the same command again
    assert_same_losses(got, want, range(4, STEPS + 1))


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(setup, reference, tmp_path, monkeypatch):
    encoder, data, _ = setup
    _, want, _ = reference
    out = tmp_path / "run"
    argv = train_argv(encoder, data, out, "--resume_from_checkpoint", "last")
    write = M3Trainer._save_optimizer_and_scheduler

    def full_disk(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(output_dir, "optimizer.pt"))
        return write(self, output_dir)

    monkeypatch.setattr(M3Trainer, "_save_optimizer_and_scheduler", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        run_main(argv, monkeypatch)
    message = str(exit_info.value.code)
    staging = out / "checkpoint-4"  # left incomplete: skipped, and removed at the next start
    assert message == (f"flagm3 train: writing checkpoint {staging} failed ({staging / 'optimizer.pt'}: No space "
                       f"left on device); the last complete checkpoint {out / 'checkpoint-2'} is intact; rerun the "
                       "same command with --resume_from_checkpoint last to continue once there is room")
    from flagm3 import M3Model
    from flagm3.checkpointing import is_complete_checkpoint, last_checkpoint

    M3Model.from_pretrained(str(out / "checkpoint-2"))
    assert last_checkpoint(str(out)) == str(out / "checkpoint-2")
    monkeypatch.setattr(M3Trainer, "_save_optimizer_and_scheduler", write)
    _, got = run_main(argv, monkeypatch)
    assert_same_losses(got, want, range(3, STEPS + 1))
    assert is_complete_checkpoint(str(staging))  # written again, whole
