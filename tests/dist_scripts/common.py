"""Helpers shared by the multi-process and training-path tests: data, arguments, launching, results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUN_TRAIN = HERE / "run_train.py"

WORDS = (
    "wing lift drag flow shock boundary layer heat transfer pressure cone cylinder flutter buckling shell "
    "plate supersonic hypersonic laminar turbulent wake aircraft model theory speed"
).split()


def write_train_data(path: Path, n: int, negatives: int = 2) -> Path:
    """``n`` records of varied lengths (so ranks pad to different lengths), each with ``negatives`` negatives."""
    lines = []
    for i in range(n):
        def text(k: int, length: int) -> str:
            return " ".join(WORDS[(k * 7 + j * 3) % len(WORDS)] for j in range(length))

        record = {
            "query": text(i, 2 + i % 5),
            "pos": [text(i + 1, 4 + (3 * i) % 9)],
            "neg": [text(i + 2 + j, 3 + (5 * i + j) % 11) for j in range(negatives)],
        }
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


def train_args(model: Path, data: Path, output_dir: Path, **overrides) -> list[str]:
    """``flagm3 train`` arguments for a tiny, deterministic CPU run; ``overrides`` as ``name=value``."""
    values = dict(
        model_name_or_path=model,
        train_data=data,
        output_dir=output_dir,
        train_group_size=3,
        query_max_len=16,
        passage_max_len=32,
        per_device_train_batch_size=2,
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=7,
        colbert_dim=16,
        disable_tqdm=True,
        dataloader_num_workers=0,
        loss_preset="bge-m3",  # FlagEmbedding's objective: every head in every term
    )
    values.update(overrides)
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def launch(runs: Sequence[Sequence[str]], nproc: int = 2, timeout: int = 300, env: Optional[dict] = None) -> None:
    """Run ``run_train.py`` under ``torchrun --standalone`` with several runs (``[result_dir, *args]``) in one
    launch; fail with the output's tail on a non-zero exit or after ``timeout`` seconds (a hang)."""
    torchrun = shutil.which("torchrun") or "torchrun"
    argv: list[str] = []
    for i, run in enumerate(runs):
        argv += (["::"] if i else []) + [str(a) for a in run]
    child_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                 "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    command = [torchrun, "--standalone", f"--nproc_per_node={nproc}", str(RUN_TRAIN), *argv]
    try:
        proc = subprocess.run(command, cwd=REPO, env=child_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-3000:] if isinstance(err.stdout, bytes) else (err.stdout or "")[-3000:]
        raise AssertionError(f"torchrun did not finish in {timeout} s (hang?):\n{tail}") from err
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        first_error = output.find("Traceback")
        shown = output[first_error : first_error + 6000] if first_error >= 0 else output[-6000:]
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{shown}")


def train_in_process(result_dir: Path, args: Sequence[str]) -> tuple[Any, dict]:
    """One process, no launcher: ``run_train.train`` in this interpreter; the trainer and this run's record."""
    sys.path.insert(0, str(HERE))
    try:
        import run_train
    finally:
        sys.path.remove(str(HERE))
    return run_train.train(str(result_dir), [str(a) for a in args])


def run_in_process(result_dir: Path, args: Sequence[str]) -> dict:
    """:func:`train_in_process`, keeping only the record."""
    return train_in_process(result_dir, args)[1]


def ranks(result_dir: Path) -> list[dict]:
    """Every rank's record, by rank."""
    files = sorted(result_dir.glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    return [json.loads(f.read_text()) for f in files]


def losses(record: dict) -> list[float]:
    """The logged training losses (averaged over ranks by the Trainer), in step order."""
    return [entry["loss"] for entry in record["log_history"] if "loss" in entry]


def tensors(result_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(result_dir / f"{name}.pt")


def unpadded(batch: list[list[int]], pad_id: int = 0) -> list[list[int]]:
    """Token ids of each row without trailing padding."""
    rows = []
    for row in batch:
        while row and row[-1] == pad_id:
            row = row[:-1]
        rows.append(row)
    return rows


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, **tolerances) -> None:
    """``torch.testing.assert_close`` whose failure message starts with ``name``."""
    torch.testing.assert_close(actual, expected, msg=lambda message: f"{name}: {message}", **tolerances)
