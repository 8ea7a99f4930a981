"""Two gloo processes with cross-device negatives train exactly like one process holding the global batch.

One ``torchrun --nproc_per_node=2`` launch runs three trainings (see ``dist_scripts/run_train.py``):

- ``equal``: 4 records = one global batch (2 per rank x 2 ranks), one SGD step. Compared with the same run in
  one process at batch 4: same batch split (rank r holds the r-th half), same logged loss, same gradients
  after DDP, same parameters after the step.
- ``uneven``: 5 records (not a multiple of the global batch of 4), two epochs: the sampler completes the last
  global batch with items seen earlier in the epoch, so both ranks run the same number of steps (no hang).
- ``uneven_drop``: the same with ``--dataloader_drop_last``: the incomplete global batch is dropped on both.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

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
    unpadded,
    write_train_data,
)

from flagm3 import M3Model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory, tiny_encoder_dir):
    """Launch the three 2-rank runs once; return their directories and the data files."""
    root = tmp_path_factory.mktemp("dist")
    data4 = write_train_data(root / "four.jsonl", 4)
    data5 = write_train_data(root / "five.jsonl", 5)
    common = dict(optim="sgd", learning_rate=0.5, max_grad_norm=0, negatives_cross_device=True)
    runs = {
        "equal": train_args(tiny_encoder_dir, data4, root / "out_equal", **common),
        "uneven": train_args(tiny_encoder_dir, data5, root / "out_uneven", max_steps=-1, num_train_epochs=2,
                             **common),
        "uneven_drop": train_args(tiny_encoder_dir, data5, root / "out_drop", max_steps=-1, num_train_epochs=2,
                                  dataloader_drop_last=True, **common),
    }
    launch([[root / name, *args] for name, args in runs.items()], timeout=240)
    return root, runs


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_encoder_dir, two_rank_runs):
    """The ``equal`` run in one process with the whole global batch (4) on it."""
    root, runs = two_rank_runs
    args = runs["equal"] + ["--per_device_train_batch_size", "4", "--output_dir", str(root / "out_single")]
    run_in_process(root / "single", args)
    return root / "single"


def test_ranks_hold_the_halves_of_the_single_process_batch(two_rank_runs, one_process_run):
    root, _ = two_rank_runs
    (single,) = ranks(one_process_run)
    rank0, rank1 = ranks(root / "equal")
    assert rank0["world_size"] == rank1["world_size"] == 2 and single["world_size"] == 1
    assert len(single["batches"]) == len(rank0["batches"]) == len(rank1["batches"]) == 1
    whole = unpadded(single["batches"][0])
    assert len(whole) == 4
    assert unpadded(rank0["batches"][0]) == whole[:2]
    assert unpadded(rank1["batches"][0]) == whole[2:]


def test_two_ranks_give_the_single_process_loss(two_rank_runs, one_process_run):
    root, _ = two_rank_runs
    (single,) = ranks(one_process_run)
    rank0, rank1 = ranks(root / "equal")
    assert losses(rank0) == losses(rank1)  # the Trainer logs the mean over ranks on every rank
    assert losses(rank0) == pytest.approx(losses(single), rel=1e-5)


def test_two_ranks_give_the_single_process_gradients_and_update(two_rank_runs, one_process_run):
    """Each rank's loss is over its queries against all gathered passages; the gather's backward sums the
    gradients of every rank's loss into the passages' owner, DDP averages: the gradient of the global loss."""
    root, _ = two_rank_runs
    grads_2, grads_1 = tensors(root / "equal", "grads"), tensors(one_process_run, "grads")
    assert grads_2.keys() == grads_1.keys()
    assert {"sparse_linear.weight", "colbert_linear.weight", "encoder.embeddings.word_embeddings.weight"} <= set(
        grads_1
    )
    # Tolerances: float rounding of different padding lengths and matrix shapes; wrong gradient bookkeeping
    # (e.g. only the local loss reaching a rank's passages) is off by a sizeable part of the gradient.
    scale = max(g.abs().max() for g in grads_1.values())
    assert scale > 1e-3
    for name in grads_1:
        assert_close(grads_2[name], grads_1[name], name, rtol=1e-4, atol=5e-5 * scale)
    params_2, params_1 = tensors(root / "equal", "params"), tensors(one_process_run, "params")
    for name in params_1:
        assert_close(params_2[name], params_1[name], name, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("run, steps_per_epoch", [("uneven", 2), ("uneven_drop", 1)])
def test_uneven_data_gives_every_rank_the_same_steps(two_rank_runs, run, steps_per_epoch):
    """5 records, global batch 4: both ranks take the same number of steps (2 per epoch when the last batch is
    completed with earlier items, 1 when it is dropped), so no rank waits for the other in a collective."""
    root, _ = two_rank_runs
    rank0, rank1 = ranks(root / run)
    assert rank0["global_step"] == rank1["global_step"] == 2 * steps_per_epoch
    assert len(rank0["batches"]) == len(rank1["batches"]) == 2 * steps_per_epoch
    assert all(len(b) == 2 for r in (rank0, rank1) for b in r["batches"])
    if steps_per_epoch == 2:  # every record is trained on in each epoch
        for epoch in range(2):
            seen = {tuple(q) for r in (rank0, rank1) for b in r["batches"][2 * epoch : 2 * epoch + 2]
                    for q in unpadded(b)}
            assert len(seen) == 5
    assert all(torch.isfinite(torch.tensor(losses(rank0))))


# ------------------------------------------------------------------------------------- launch scripts
LAUNCH = REPO / "examples" / "launch"


def script_command(script: str, env: dict, *extra: str) -> list[str]:
    """The command a launch script runs (its ``DRY_RUN=1`` output), split like the shell would."""
    out = subprocess.run(["bash", str(LAUNCH / script), *extra], env={**os.environ, **env, "DRY_RUN": "1"},
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return shlex.split(out)


@pytest.mark.parametrize("script", ["train_single.sh", "train_torchrun.sh", "train_deepspeed.sh"])
def test_launch_scripts_pass_arguments_flagm3_accepts(script, tmp_path):
    from flagm3.train import parse_args

    if script == "train_deepspeed.sh":
        pytest.importorskip("deepspeed")  # without it --deepspeed is refused (tests/test_train_cli.py)

    env = {"MODEL": str(tmp_path / "model"), "TRAIN_DATA": str(tmp_path / "data.jsonl"),
           "OUTPUT_DIR": str(tmp_path / "out"), "PRECISION_ARGS": "--use_cpu True", "NPROC": "3"}
    command = script_command(script, env, "--max_steps", "7")
    module = command.index("flagm3.train")
    assert command[module - 1] == "-m"
    model_args, data_args, training_args = parse_args(command[module + 1 :])
    assert model_args.model_name_or_path == env["MODEL"] and data_args.train_data == [env["TRAIN_DATA"]]
    assert training_args.output_dir == env["OUTPUT_DIR"] and training_args.use_cpu
    assert training_args.max_steps == 7  # extra arguments come last and win
    assert training_args.unified_finetuning and training_args.use_self_distill
    if script == "train_single.sh":
        assert command[0].startswith("python") and not training_args.negatives_cross_device
    else:
        assert command[:4] == ["torchrun", "--standalone", "--nproc_per_node", "3"]
        assert training_args.negatives_cross_device
    if script == "train_deepspeed.sh":
        assert training_args.deepspeed == str(REPO / "flagm3" / "deepspeed_configs" / "ds_stage2.json")  # DS_CONFIG=stage2


def test_train_single_script_trains_and_saves(tmp_path, tiny_encoder_dir):
    data = write_train_data(tmp_path / "four.jsonl", 4)
    env = {**os.environ, "MODEL": str(tiny_encoder_dir), "TRAIN_DATA": str(data), "OUTPUT_DIR": str(tmp_path / "out"),
           "PRECISION_ARGS": "--use_cpu True", "MAX_STEPS": "1", "GROUP_SIZE": "3", "QUERY_MAX_LEN": "16",
           "PASSAGE_MAX_LEN": "32", "PYTHON": sys.executable, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(["bash", str(LAUNCH / "train_single.sh"), "--disable_tqdm", "True"], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    model = M3Model.from_pretrained(str(tmp_path / "out"))
    assert model.colbert_linear.weight.shape[1] == 32
