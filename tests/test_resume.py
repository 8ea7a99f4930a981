"""Complete checkpoints and exact resumption.

A tiny BERT with dropout on trains for two epochs of 4 steps (7 records, batch 2, groups of 3 with sampled
negatives; some records draw theirs from the corpus), saving every 2 steps. The uninterrupted run's per-step
losses are the reference: a run killed (SIGKILL) in the middle of writing checkpoint-6 must leave
checkpoint-4 intact and the only complete one, and resuming from the last checkpoint must reproduce steps 5-8
exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, SENTENCES, tiny_bert_config, train_tokenizer
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

from flagm3.checkpointing import (
    MANIFEST_NAME,
    IncompleteCheckpointError,
    is_complete_checkpoint,
    last_checkpoint,
    remove_incomplete_checkpoints,
    write_manifest,
)

STEPS = 8  # 2 epochs x 4 steps
SAVE_STEPS = 2


def make_dropout_encoder(directory: Path) -> Path:
    """A tiny random BERT with dropout on (so resuming must restore the RNG state)."""
    from transformers import BertModel

    tokenizer = train_tokenizer(directory)
    torch.manual_seed(0)
    config = tiny_bert_config(len(tokenizer), hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    BertModel(config).save_pretrained(str(directory))
    return directory


def write_train_jsonl(path: Path, n: int = 7) -> Path:
    """``n`` records; every third has no negatives (drawn from the corpus), the others 2-4 to sample from."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            record = {"query": SENTENCES[i % 10].split(" of ")[0], "pos": [SENTENCES[(i + 1) % 10]]}
            if i % 3:
                record["neg"] = [SENTENCES[(i + k) % 10] for k in range(2, 3 + i % 3 + 1)]
            f.write(json.dumps(record) + "\n")
    return path


def train_argv(encoder: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(encoder), "--train_data", str(data), "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "2", "--train_group_size", "3", "--num_train_epochs", "2",
        "--query_max_len", "16", "--passage_max_len", "16", "--learning_rate", "1e-3", "--seed", "7",
        "--logging_steps", "1", "--save_steps", str(SAVE_STEPS), "--use_cpu", "True", "--report_to", "none",
        "--disable_tqdm", "True", *extra,
    ]  # fmt: skip


class LossRecorder(TrainerCallback):
    """Per-step losses logged by this process (not the log history restored from a checkpoint)."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def run_training(argv: list[str]):
    """Train in this process; returns the trainer and its per-step losses."""
    from flagm3.train import build_trainer, parse_args

    model_args, data_args, training_args = parse_args(argv)
    trainer = build_trainer(model_args, data_args, training_args)
    recorder = LossRecorder()
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    return trainer, recorder.losses


# A separate process: records losses to LOSSES, and with CRASH_STEP > 0 kills itself (SIGKILL, as the OOM killer
# or a preempted node would) in the middle of saving that step's checkpoint, after the model and optimizer are
# written and before the RNG and trainer states are.
DRIVER = r"""
import json, os, signal, sys
from transformers import TrainerCallback
from flagm3.train import build_trainer, parse_args
from flagm3.trainer import M3Trainer

losses, crash_step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
write_optimizer = M3Trainer._save_optimizer_and_scheduler

def dying_save(self, output_dir):
    write_optimizer(self, output_dir)
    if self.state.global_step == crash_step:
        os.kill(os.getpid(), signal.SIGKILL)

class Record(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            with open(losses, "a") as f:
                f.write(json.dumps([state.global_step, logs["loss"]]) + "\n")

M3Trainer._save_optimizer_and_scheduler = dying_save
model_args, data_args, training_args = parse_args(argv)
trainer = build_trainer(model_args, data_args, training_args)
trainer.add_callback(Record())
trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
"""


def run_process(losses: Path, crash_step: int, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", DRIVER, str(losses), str(crash_step), *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def read_losses(file: Path) -> dict[int, float]:
    return {step: loss for step, loss in map(json.loads, file.read_text().splitlines())}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread (the subprocesses get OMP_NUM_THREADS=1): the same numerics in and out of process,
    and on a busy 2-core machine 30x faster than two threads contending for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return make_dropout_encoder(root / "encoder"), write_train_jsonl(root / "train.jsonl"), root


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run: trainer, per-step losses, output directory (checkpoints 2, 4, 6, 8)."""
    encoder, data, root = setup
    out = root / "reference"
    trainer, losses = run_training(train_argv(encoder, data, out))
    assert sorted(losses) == list(range(1, STEPS + 1))
    return trainer, losses, out


def assert_same_losses(got: dict[int, float], want: dict[int, float], steps: range) -> None:
    assert sorted(got) == list(steps)
    for step in steps:
        assert got[step] == pytest.approx(want[step], abs=1e-6, rel=0), f"step {step}"


def test_kill_during_save_keeps_previous_checkpoint_and_resume_finishes_exactly(setup, reference):
    encoder, data, root = setup
    _, want, _ = reference
    out = root / "killed"
    crashed = run_process(root / "crashed.jsonl", 6, train_argv(encoder, data, out))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert_same_losses(read_losses(root / "crashed.jsonl"), want, range(1, 7))  # same numbers in any process

    # The interrupted save left checkpoint-6 without its manifest: checkpoint-4 is the last complete one, loadable.
    names = sorted(os.listdir(out))
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert {"model.safetensors", "optimizer.pt"} <= set(os.listdir(out / "checkpoint-6"))
    assert MANIFEST_NAME not in os.listdir(out / "checkpoint-6")
    assert all(is_complete_checkpoint(str(out / f"checkpoint-{s}")) for s in (2, 4))
    assert last_checkpoint(str(out)) == str(out / "checkpoint-4")
    from flagm3 import M3Model

    M3Model.from_pretrained(str(out / "checkpoint-4"))

    # This (another) process resumes from the last complete checkpoint, at the epoch boundary, and reproduces
    # steps 5-8; the incomplete checkpoint-6 was removed and written again, completely.
    trainer, got = run_training(train_argv(encoder, data, out, "--resume_from_checkpoint", "last"))
    assert_same_losses(got, want, range(5, STEPS + 1))
    assert sorted(os.listdir(out)) == [f"checkpoint-{s}" for s in (2, 4, 6, 8)]
    assert all(is_complete_checkpoint(str(out / f"checkpoint-{s}"), require_manifest=True) for s in (2, 4, 6, 8))
    ref = load_file(str(root / "reference" / f"checkpoint-{STEPS}" / "model.safetensors"))
    got_params = load_file(str(out / f"checkpoint-{STEPS}" / "model.safetensors"))
    assert max((ref[k] - got_params[k]).abs().max().item() for k in ref) < 1e-6


def test_resume_in_second_epoch_reproduces_every_later_step(setup, reference):
    """Mid-epoch resume in epoch 2: batch order, sampled negatives and dropout all continue as uninterrupted."""
    encoder, data, root = setup
    _, want, ref_out = reference
    checkpoint = ref_out / "checkpoint-6"
    trainer, got = run_training(train_argv(encoder, data, root / "resumed-6", "--resume_from_checkpoint", str(checkpoint)))
    assert_same_losses(got, want, range(7, STEPS + 1))
    final = load_file(str(ref_out / f"checkpoint-{STEPS}" / "model.safetensors"))
    params = dict(trainer.model.named_parameters())
    assert max((params[k].detach() - final[k]).abs().max().item() for k in final) < 1e-6


def test_resume_with_the_sparse_anchor_keeps_its_reference(setup, tmp_path):
    """With ``sparse_anchor_weight`` the head's reference at the first batch is saved with each checkpoint, so the
    resumed run pulls towards the same point and continues exactly (it would otherwise anchor at checkpoint-6)."""
    encoder, data, _ = setup
    extra = ("--sparse_anchor_weight", "10", "--sparse_learning_rate", "1e-2")
    full, want = run_training(train_argv(encoder, data, tmp_path / "full", *extra))
    reference = load_file(str(tmp_path / "full" / "checkpoint-6" / "sparse_anchor.safetensors"))
    assert reference["weight"].shape == full.model.sparse_linear.weight.shape
    assert not torch.equal(reference["weight"], full.model.sparse_linear.weight.detach())  # the head moved
    checkpoint = str(tmp_path / "full" / "checkpoint-6")
    _, got = run_training(train_argv(encoder, data, tmp_path / "resumed", *extra, "--resume_from_checkpoint", checkpoint))
    assert_same_losses(got, want, range(7, STEPS + 1))


def test_checkpoints_are_the_trainers_own_with_a_manifest(reference):
    """A checkpoint is what ``Trainer._save_checkpoint`` writes plus the manifest, which lists every file with its
    size; M3Trainer overrides no private Trainer member that saves or iterates (at most 3 private ones in all)."""
    from flagm3.trainer import M3Trainer

    _, _, out = reference
    checkpoint = out / f"checkpoint-{STEPS}"
    manifest = json.loads((checkpoint / MANIFEST_NAME).read_text())
    files = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert manifest["global_step"] == STEPS and set(manifest["files"]) == files
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= files
    assert all(manifest["files"][f] == (checkpoint / f).stat().st_size for f in files)
    private = [name for cls in M3Trainer.__mro__ if cls is not Trainer and issubclass(cls, Trainer)
               for name in vars(cls) if name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)]
    assert private == ["_save"], private


def test_resume_resolution_and_cleanup(tmp_path):
    """'last' skips incomplete directories (a manifest that does not match its files, or no manifest where the
    run writes them); starting to train removes them and older flagm3 versions' staging directories."""
    run = tmp_path / "run"
    for step in (2, 4, 6, 8):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (run / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"x" * 100)
    assert last_checkpoint(str(run)) == str(run / "checkpoint-8")  # no manifests: trainer_state.json decides
    for step in (2, 4, 6):
        write_manifest(str(run / f"checkpoint-{step}"), step)
    assert last_checkpoint(str(run)) == str(run / "checkpoint-6")  # checkpoint-8: interrupted before its manifest
    (run / "checkpoint-6" / "model.safetensors").write_bytes(b"x" * 50)  # truncated after the manifest vouched
    assert not is_complete_checkpoint(str(run / "checkpoint-6"))
    assert last_checkpoint(str(run)) == str(run / "checkpoint-4")
    (run / "tmp-checkpoint-10").mkdir()  # a staging directory of flagm3 before manifests
    removed = remove_incomplete_checkpoints(str(run))
    assert sorted(Path(p).name for p in removed) == ["checkpoint-6", "checkpoint-8", "tmp-checkpoint-10"]
    assert sorted(os.listdir(run)) == ["checkpoint-2", "checkpoint-4"]


def test_a_checkpoint_saved_again_is_incomplete_until_its_new_manifest(setup, reference, tmp_path):
    """Resuming from checkpoint-4 of a directory that still holds a complete checkpoint-6: when step 6 is saved
    again its old manifest goes first, so a kill during that save leaves checkpoint-4 as the last complete one."""
    import shutil

    encoder, data, root = setup
    _, _, ref_out = reference
    out = tmp_path / "again"
    out.mkdir()
    for step in (4, 6):
        shutil.copytree(ref_out / f"checkpoint-{step}", out / f"checkpoint-{step}")
    crashed = run_process(tmp_path / "losses.jsonl", 6, train_argv(encoder, data, out, "--resume_from_checkpoint",
                                                                     str(out / "checkpoint-4")))
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert MANIFEST_NAME not in os.listdir(out / "checkpoint-6")
    assert last_checkpoint(str(out)) == str(out / "checkpoint-4")


def test_resume_from_incomplete_or_missing_checkpoint_is_a_clear_error(setup, tmp_path):
    from flagm3.train import build_trainer, parse_args

    encoder, data, _ = setup
    out = tmp_path / "out"
    (out / "checkpoint-5").mkdir(parents=True)  # written by a non-atomic save that died
    trainer = build_trainer(*parse_args(train_argv(encoder, data, out)))
    with pytest.raises(IncompleteCheckpointError, match=r"checkpoint-5: has no readable trainer_state.json"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-5"))
    with pytest.raises(IncompleteCheckpointError, match=r"'last'.*no complete checkpoint-N directory in"):
        trainer.train(resume_from_checkpoint="last")


# Under torchrun: every rank trains (two ranks x batch 2, checkpoint every step), then resumes from checkpoint-3
# of that run into another directory; each rank writes its logged losses of both runs.
TWO_RANK_DRIVER = r"""
import json, sys
try:  # DeepSpeed compiles a shared-memory op on first use (30 s): not needed on CPU
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
except ImportError:
    pass
from transformers import TrainerCallback
from flagm3.distributed import shutdown_process_group
from flagm3.train import build_trainer, parse_args

class Record(TrainerCallback):
    def __init__(self):
        self.losses = {}
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]

result, argv = sys.argv[1], sys.argv[2:]
runs = {}
for name, extra in (("full", []), ("resumed", ["--resume_from_checkpoint", "CHECKPOINT"])):
    args = [a.replace("OUT", name) for a in argv] + extra
    args = [a.replace("CHECKPOINT", args[args.index("--output_dir") + 1].replace(name, "full") + "/checkpoint-3")
            for a in args]
    model_args, data_args, training_args = parse_args(args)
    trainer = build_trainer(model_args, data_args, training_args)
    record = Record()
    trainer.add_callback(record)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    runs[name] = record.losses
with open(f"{result}/rank{trainer.args.process_index}.json", "w") as f:
    json.dump(runs, f)
shutdown_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", [False, True], ids=["ddp", "zero2"])
def test_two_ranks_write_complete_checkpoints_and_resume_exactly(setup, tmp_path, deepspeed):
    """Every rank's files (RNG states; DeepSpeed's optimizer partitions) are in the renamed checkpoint, and
    resuming on two ranks continues exactly."""
    import shutil

    encoder, data, _ = setup
    driver = tmp_path / "driver.py"
    driver.write_text(TWO_RANK_DRIVER)
    extra = ["--deepspeed", str(REPO / "deepspeed_configs" / "ds_stage2.json")] if deepspeed else []
    if deepspeed:
        pytest.importorskip("deepspeed")
    argv = train_argv(encoder, data, tmp_path / "OUT", "--save_steps", "1", *extra)
    torchrun = shutil.which("torchrun") or "torchrun"
    command = [torchrun, "--standalone", "--nproc_per_node=2", str(driver), str(tmp_path), *argv]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    # 7 records, global batch 4: 2 steps per epoch, 4 in all, a checkpoint after each
    full = tmp_path / "full"
    assert sorted(n for n in os.listdir(full) if "checkpoint" in n) == [f"checkpoint-{s}" for s in range(1, 5)]
    for step in range(1, 5):
        files = set(os.listdir(full / f"checkpoint-{step}"))
        assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "model.safetensors"} <= files
        if deepspeed:
            assert (full / f"checkpoint-{step}" / "latest").read_text() == f"global_step{step}"
            partitions = set(os.listdir(full / f"checkpoint-{step}" / f"global_step{step}"))
            assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= partitions
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for record in records:
        assert sorted(record["full"]) == ["1", "2", "3", "4"] and sorted(record["resumed"]) == ["4"]
        assert record["resumed"]["4"] == pytest.approx(record["full"]["4"], abs=1e-6, rel=0)
