"""Training checkpoints that are complete or ignored: the Trainer saves, flagm3 marks and checks.

The Hugging Face Trainer writes ``checkpoint-N`` file by file (model, optimizer, scheduler, RNG states,
``trainer_state.json``), so a process killed during a save leaves a directory that
``resume_from_checkpoint`` then fails on. flagm3 lets the Trainer save as it does, and:

- :class:`CheckpointCallback` (``on_save``, called after the Trainer wrote the whole checkpoint) waits for every
  process, flushes the files to disk and writes a manifest, ``flagm3_checkpoint.json`` (every file with its
  size), last and atomically (a temporary file renamed). A checkpoint whose step is about to be written again
  loses its manifest first (``on_step_end``/``on_epoch_end`` with ``should_save``).
- :func:`is_complete_checkpoint` accepts a directory whose manifest lists files that are all there with their
  sizes. A directory without a manifest (written by transformers alone, or by flagm3 before manifests) counts
  as complete if its ``trainer_state.json`` (the Trainer's last file) reads, unless its run directory holds
  manifests: then it is a save that was interrupted before its manifest.
- When training starts, :func:`remove_incomplete_checkpoints` deletes the incomplete ``checkpoint-N``
  directories of ``output_dir`` (and ``tmp-checkpoint-N`` staging directories of older flagm3 versions), and
  ``resume_from_checkpoint`` ``"last"``/``True`` resolves to the last complete one (:func:`last_checkpoint`).

So a kill during a save leaves the previous checkpoint loadable, and ``last`` resumes from it.
:class:`CheckpointCallback` also sets the epoch of the batch sampler inside the loader's wrappers
(:func:`set_sampler_epoch`) at each epoch's start, so a resumed epoch replays the uninterrupted run's order.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any, Callable, Optional

import torch
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

MANIFEST_NAME = "flagm3_checkpoint.json"
RESUME_LAST = ("last", "latest", "true")
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_LEGACY_STAGING_RE = re.compile(rf"^tmp-({PREFIX_CHECKPOINT_DIR}-\d+)(-replaced)?$")  # flagm3 < manifests


class IncompleteCheckpointError(ValueError):
    """``resume_from_checkpoint`` names a directory that is not a complete checkpoint."""


# ------------------------------------------------------------------------------------------ manifest
def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """Flush every file and directory under ``path`` to disk (so a manifest never vouches for unwritten data)."""
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root, directory=True)


def _files(path: str) -> dict[str, int]:
    """Every file under ``path`` (relative, ``/``-separated) with its size, the manifest left out."""
    sizes = {}
    for root, _, files in os.walk(path):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), path).replace(os.sep, "/")
            if rel != MANIFEST_NAME and not rel.startswith(MANIFEST_NAME):
                sizes[rel] = os.path.getsize(os.path.join(root, name))
    return sizes


def write_manifest(path: str, global_step: int) -> None:
    """Flush ``path`` to disk, then write its manifest atomically: the checkpoint is complete from here on."""
    fsync_tree(path)
    tmp = os.path.join(path, MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"global_step": global_step, "files": _files(path)}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MANIFEST_NAME))
    _fsync(path, directory=True)


def _manifest_problem(path: str) -> Optional[str]:
    """Why the manifest of ``path`` does not vouch for it (``None`` when it does)."""
    try:
        with open(os.path.join(path, MANIFEST_NAME), encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {MANIFEST_NAME}"
    for rel, size in files.items():
        file = os.path.join(path, *rel.split("/"))
        if not os.path.isfile(file) or os.path.getsize(file) != size:
            return f"{rel} is missing or has another size than {MANIFEST_NAME} lists"
    return None


def checkpoint_problem(path: str, require_manifest: bool = False) -> Optional[str]:
    """Why ``path`` is not a complete checkpoint (``None`` when it is); see the module docstring."""
    if not os.path.isdir(path):
        return "does not exist"
    if os.path.exists(os.path.join(path, MANIFEST_NAME)):
        return _manifest_problem(path)
    if require_manifest:
        return f"has no {MANIFEST_NAME} (its save was interrupted)"
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return f"has no readable {TRAINER_STATE_NAME}"
    return None


def is_complete_checkpoint(path: str, require_manifest: bool = False) -> bool:
    """True if ``path`` is a complete checkpoint (see :func:`checkpoint_problem`)."""
    return checkpoint_problem(path, require_manifest) is None


def _checkpoints(run_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), os.path.join(run_dir, name))
             for name in os.listdir(run_dir) if (m := _CHECKPOINT_RE.match(name))]
    return sorted((step, path) for step, path in found if os.path.isdir(path))


def _uses_manifests(checkpoints: list[tuple[int, str]]) -> bool:
    return any(os.path.exists(os.path.join(path, MANIFEST_NAME)) for _, path in checkpoints)


def last_checkpoint(run_dir: str) -> Optional[str]:
    """The complete ``checkpoint-N`` with the largest ``N`` in ``run_dir`` (``None`` if there is none);
    incomplete ones are skipped with a WARNING (``transformers.trainer_utils.get_last_checkpoint`` would pick
    them)."""
    checkpoints = _checkpoints(run_dir)
    strict = _uses_manifests(checkpoints)
    for _, path in reversed(checkpoints):
        problem = checkpoint_problem(path, strict)
        if problem is None:
            return path
        logger.warning("%s: incomplete checkpoint (%s), skipped", path, problem)
    return None


def remove_incomplete_checkpoints(run_dir: str) -> list[str]:
    """Delete the incomplete ``checkpoint-N`` directories of ``run_dir`` and older flagm3 versions' staging
    directories (putting back a checkpoint whose replacement never arrived). Returns the paths deleted."""
    removed: list[str] = []
    if not os.path.isdir(run_dir):
        return removed
    for name in sorted(os.listdir(run_dir)):  # staging directories of flagm3 versions before manifests
        match, path = _LEGACY_STAGING_RE.match(name), os.path.join(run_dir, name)
        if match and os.path.isdir(path):
            final = os.path.join(run_dir, match.group(1))
            if match.group(2) and not os.path.exists(final):
                os.rename(path, final)
                logger.warning("%s: restored from %s (its replacement was not completed)", final, path)
                continue
            shutil.rmtree(path)
            removed.append(path)
    checkpoints = _checkpoints(run_dir)
    strict = _uses_manifests(checkpoints)
    for _, path in checkpoints:
        problem = checkpoint_problem(path, strict)
        if problem is not None:
            shutil.rmtree(path)
            removed.append(path)
            logger.warning("%s: removed an incomplete checkpoint (%s; a save was interrupted)", path, problem)
    return removed


clean_staging = remove_incomplete_checkpoints  # the name before manifests


def resolve_resume(resume: Any, run_dir: str) -> Optional[str]:
    """``resume_from_checkpoint`` as a complete checkpoint path: ``None``/``False`` -> ``None``; ``True``,
    ``"last"``, ``"latest"``, ``"true"`` -> :func:`last_checkpoint` of ``run_dir``; a path -> itself if complete.
    Raises :class:`IncompleteCheckpointError` otherwise."""
    if resume is None or resume is False:
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() in RESUME_LAST and not os.path.isdir(resume)):
        path = last_checkpoint(run_dir)
        if path is None:
            raise IncompleteCheckpointError(
                f"resume_from_checkpoint={resume!r}: no complete checkpoint-N directory in {run_dir}"
            )
        logger.info("resuming from %s", path)
        return path
    resume = os.fspath(resume)
    parent = os.path.dirname(os.path.normpath(resume))
    problem = checkpoint_problem(resume, require_manifest=_uses_manifests(_checkpoints(parent)))
    if problem is not None:
        raise IncompleteCheckpointError(
            f"resume_from_checkpoint={resume}: {problem}, so it is not a complete checkpoint "
            f"(resume_from_checkpoint='last' picks the last complete one in output_dir)"
        )
    return resume


# ----------------------------------------------------------------------------------------- callback
def set_sampler_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on every sampler and batch sampler inside ``loader``'s wrappers.

    Resuming mid-epoch, the Trainer wraps the loader with accelerate's ``skip_first_batches``; with several
    processes the batch sampler then sits deeper (skip -> shard -> sampler) than where the Trainer calls
    ``set_epoch``. The wrappers share the sampler objects, so setting them through ``loader`` reaches them.
    """
    seen: set[int] = set()
    stack = [getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch)
        stack += [getattr(obj, "batch_sampler", None), getattr(obj, "sampler", None)]


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class CheckpointCallback(TrainerCallback):
    """Marks each checkpoint complete once every process wrote it (see the module docstring), and sets the
    sampler's epoch before every epoch. ``run_dir``: the directory checkpoints go to (``args.output_dir``)."""

    def __init__(self, run_dir: Optional[Callable[[Any], str]] = None) -> None:
        self.run_dir = run_dir or (lambda args: args.output_dir)

    def _path(self, args: Any, state: Any) -> str:
        return os.path.join(self.run_dir(args), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if train_dataloader is not None:
            set_sampler_epoch(train_dataloader, int(state.epoch + 1e-6))

    def on_step_end(self, args, state, control, **kwargs):
        self._before_save(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._before_save(args, state, control)

    def _before_save(self, args, state, control) -> None:
        """A checkpoint of this step already there is about to be rewritten: not complete until marked again."""
        if control.should_save and args.should_save:
            manifest = os.path.join(self._path(args, state), MANIFEST_NAME)
            if os.path.exists(manifest):
                os.remove(manifest)

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every process's files (RNG states, DeepSpeed partitions) are written
        path = self._path(args, state)
        if args.should_save and os.path.isdir(path):
            write_manifest(path, state.global_step)
        _barrier()
