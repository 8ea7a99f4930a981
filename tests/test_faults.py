"""Faults on two ranks (gloo, CPU): a rank killed mid-run (issue 16).

Two ``torchrun`` ranks train ``flagm3 train`` (DDP, cross-device negatives, a checkpoint every 2 steps) for 4
steps; rank 1 kills itself with SIGKILL at the start of step 3, as the OOM killer or a lost node would. The
survivor must exit within the timeout (no hang in a collective) with one line naming the step and the
checkpoint to resume from, and no traceback; then the same command with ``--resume_from_checkpoint last``
continues from ``checkpoint-2`` with the losses of an uninterrupted run. Also: SIGTERM to rank 1 only stops
both ranks at the same step with a checkpoint (the stop is all-reduced), and ``last`` resumes exactly. (A full
disk during a save is tested in one process in ``tests/test_restart.py``.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from dist_scripts.common import REPO, train_args, write_train_data

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

DRIVER = r"""
import json, os, signal, sys
from transformers import TrainerCallback
import flagm3.train

losses, kill_rank, kill_step, signum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
argv = sys.argv[5:]
rank = int(os.environ.get("RANK", "0"))

class KillAndRecord(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if rank == kill_rank and state.global_step + 1 == kill_step:
            os.kill(os.getpid(), signum)
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and rank == 0:
            with open(losses, "a") as f:
                f.write(json.dumps([state.global_step, logs["loss"]]) + "\n")

build = flagm3.train.build_trainer
def build_with_callback(*args, **kwargs):
    trainer = build(*args, **kwargs)
    trainer.add_callback(KillAndRecord())
    return trainer
flagm3.train.build_trainer = build_with_callback
flagm3.train.main(argv)
"""


def torchrun(driver, losses, kill_rank: int, kill_step: int, argv: list[str], log_dir, timeout: int = 240,
             signum: int = signal.SIGKILL):
    """One 2-rank launch; each rank's stdout/stderr go to ``log_dir/<attempt>/<rank>/``."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [shutil.which("torchrun") or "torchrun", "--standalone", "--nproc_per_node=2", "--log-dir",
               str(log_dir), "--redirects", "3", "--tee", "0", str(driver), str(losses), str(kill_rank),
               str(kill_step), str(int(signum)), *[str(a) for a in argv]]
    start = time.monotonic()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def rank_stderr(log_dir, rank: int) -> str:
    (file,) = [p for p in log_dir.rglob("stderr.log") if p.parent.name == str(rank)]
    return file.read_text()


def read_losses(file) -> dict[int, float]:
    return dict(map(json.loads, file.read_text().splitlines())) if file.exists() else {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_encoder_dir):
    """The data, the driver, the arguments, and the uninterrupted 2-rank run's losses."""
    root = tmp_path_factory.mktemp("faults")
    data = write_train_data(root / "train.jsonl", 12)  # 3 steps per epoch: a resume mid-epoch
    driver = root / "driver.py"
    driver.write_text(DRIVER)

    def argv(out, *extra):
        return train_args(tiny_encoder_dir, data, out, max_steps=4, save_strategy="steps", save_steps=2,
                          negatives_cross_device=True, learning_rate=1e-3) + list(extra)

    proc, _ = torchrun(driver, root / "uninterrupted.jsonl", -1, 0, argv(root / "uninterrupted"), root / "logs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = read_losses(root / "uninterrupted.jsonl")
    assert sorted(want) == list(range(1, 5))
    return driver, argv, want


def resume_and_compare(setup, out, tmp_path, losses) -> None:
    driver, argv, want = setup
    proc, _ = torchrun(driver, losses, -1, 0, argv(out, "--resume_from_checkpoint", "last"), tmp_path / "logs2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_losses(losses)
    assert sorted(got) == list(range(1, 5))
    for step in range(1, 5):
        assert got[step] == pytest.approx(want[step], rel=0, abs=1e-6), step


def test_a_killed_rank_ends_the_run_in_one_line_and_last_resumes_exactly(setup, tmp_path):
    driver, argv, _ = setup
    out, losses = tmp_path / "run", tmp_path / "killed.jsonl"
    proc, seconds = torchrun(driver, losses, 1, 3, argv(out, "--resume_from_checkpoint", "last"), tmp_path / "logs1")
    assert proc.returncode != 0
    survivor = rank_stderr(tmp_path / "logs1", 0)
    assert "Traceback" not in survivor, survivor[-3000:]
    ours = [line for line in survivor.splitlines() if line.startswith("flagm3 train:")]
    assert len(ours) == 1, survivor[-3000:]
    assert ours[0].startswith("flagm3 train: rank 0 stopped at step 2: another process stopped answering")
    assert f"the last complete checkpoint is {out / 'checkpoint-2'}" in ours[0]
    assert seconds < 120, f"the survivor took {seconds:.0f} s to exit"
    assert sorted(os.listdir(out)) == ["checkpoint-2"]
    resume_and_compare(setup, out, tmp_path, losses)
    print(f"survivor exited {seconds:.1f} s after the launch started")


def test_sigterm_to_one_rank_stops_both_at_the_same_step_and_last_resumes_exactly(setup, tmp_path):
    """Only rank 1 gets SIGTERM (at the start of step 3): the stop is agreed at the step end, both ranks save
    checkpoint-3 together and exit 143; rank 0 prints the one line."""
    driver, argv, _ = setup
    out, losses = tmp_path / "run", tmp_path / "stopped.jsonl"
    proc, _ = torchrun(driver, losses, 1, 3, argv(out, "--resume_from_checkpoint", "last"), tmp_path / "logs1",
                       signum=signal.SIGTERM)
    assert proc.returncode != 0
    first = rank_stderr(tmp_path / "logs1", 0)
    assert "Traceback" not in first and "Traceback" not in rank_stderr(tmp_path / "logs1", 1)
    ours = [line for line in first.splitlines() if line.startswith("flagm3 train:")]
    assert ours == [f"flagm3 train: stopped by SIGTERM at step 3, checkpoint saved in {out / 'checkpoint-3'}; "
                    "rerun the same command with --resume_from_checkpoint last to continue"]
    from flagm3.checkpointing import last_checkpoint

    assert last_checkpoint(str(out)) == str(out / "checkpoint-3")
    resume_and_compare(setup, out, tmp_path, losses)
