"""Atomic training checkpoints: ``checkpoint-N`` appears only once every file of it is written.

The Hugging Face Trainer writes ``checkpoint-N`` file by file (model, optimizer, scheduler, RNG states,
``trainer_state.json``), so a process killed during a save leaves a directory that ``get_last_checkpoint``
picks and ``resume_from_checkpoint`` then fails on. :class:`AtomicCheckpointMixin` makes every process
write into ``tmp-checkpoint-N`` in the same parent; after all processes finished (a barrier), the saving
process (rank 0, or each node's local rank 0 with ``save_on_each_node``) flushes the files to disk and
renames the directory to ``checkpoint-N`` (one ``rename``, atomic on POSIX filesystems). DeepSpeed's
per-rank files (``global_stepN/``, ``latest``) are written into the staging directory like the others;
their paths are relative, so the renamed checkpoint resumes.

Directory names: ``tmp-checkpoint-N`` (being written; deleted when training starts or saves step N
again) and ``tmp-checkpoint-N-replaced`` (the previous ``checkpoint-N`` while a new one of the same step
takes its place; put back if the new one did not arrive). Neither matches ``checkpoint-*``, so
transformers' ``get_last_checkpoint`` and checkpoint rotation never see them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any, Optional

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy

from .compat import rotate_checkpoints

logger = logging.getLogger(__name__)

STAGING_PREFIX = "tmp-"
REPLACED_SUFFIX = "-replaced"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_STAGING_RE = re.compile(rf"^{STAGING_PREFIX}({PREFIX_CHECKPOINT_DIR}-\d+)({REPLACED_SUFFIX})?$")
RESUME_LAST = ("last", "latest", "true")


class IncompleteCheckpointError(ValueError):
    """``resume_from_checkpoint`` names a directory that is not a complete checkpoint."""


def staging_path(final: str) -> str:
    """``.../tmp-checkpoint-N`` for ``.../checkpoint-N`` (same parent, so the rename stays on one filesystem)."""
    parent, name = os.path.split(os.path.normpath(final))
    return os.path.join(parent, STAGING_PREFIX + name)


def is_complete_checkpoint(path: str) -> bool:
    """True if ``path`` holds a readable ``trainer_state.json`` (the Trainer writes it last)."""
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return False
    return True


def last_checkpoint(run_dir: str) -> Optional[str]:
    """The complete ``checkpoint-N`` with the largest ``N`` in ``run_dir`` (``None`` if there is none).

    Unlike ``transformers.trainer_utils.get_last_checkpoint`` it skips directories without a readable
    ``trainer_state.json`` (written by a non-atomic save that was interrupted).
    """
    if not os.path.isdir(run_dir):
        return None
    found = []
    for name in os.listdir(run_dir):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(run_dir, name)
        if match and os.path.isdir(path):
            if is_complete_checkpoint(path):
                found.append((int(match.group(1)), path))
            else:
                logger.warning("%s: incomplete checkpoint (no readable %s), skipped", path, TRAINER_STATE_NAME)
    return max(found)[1] if found else None


def clean_staging(run_dir: str) -> list[str]:
    """Delete staging directories left by an interrupted save; put back a replaced checkpoint whose
    replacement never arrived. Returns the paths deleted."""
    removed: list[str] = []
    if not os.path.isdir(run_dir):
        return removed
    for name in sorted(os.listdir(run_dir)):
        match = _STAGING_RE.match(name)
        path = os.path.join(run_dir, name)
        if not match or not os.path.isdir(path):
            continue
        final = os.path.join(run_dir, match.group(1))
        if match.group(2) and not os.path.exists(final):
            os.rename(path, final)
            logger.warning("%s: restored from %s (its replacement was not completed)", final, path)
            continue
        shutil.rmtree(path)
        removed.append(path)
        logger.warning("%s: removed an incomplete checkpoint (a save was interrupted)", path)
    return removed


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """Flush every file and directory under ``path`` to disk (so a rename never publishes unwritten data)."""
    for root, _, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root, directory=True)


def publish_checkpoint(staging: str, final: str) -> None:
    """Make the fully written ``staging`` directory visible as ``final`` in one rename."""
    if not os.path.isdir(staging):  # save_on_each_node on a shared filesystem: another node published it
        return
    fsync_tree(staging)
    replaced = None
    if os.path.exists(final):  # saving the same step again (e.g. a restarted run): keep the old one until done
        replaced = staging + REPLACED_SUFFIX
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(staging, final)
    _fsync(os.path.dirname(os.path.abspath(final)), directory=True)
    if replaced is not None:
        shutil.rmtree(replaced)


def set_sampler_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on every sampler and batch sampler inside ``loader``'s wrappers.

    Resuming mid-epoch, the Trainer wraps the loader with accelerate's ``skip_first_batches``; with several
    processes the batch sampler then sits one wrapper deeper (skip -> shard -> sampler) than where the
    Trainer calls ``set_epoch``, and the resumed epoch would replay epoch 0's order.
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


class AtomicCheckpointMixin:
    """Mixin for a ``transformers.Trainer`` subclass (put it first): atomic ``checkpoint-N`` directories,
    staging directories cleaned when training starts, ``resume_from_checkpoint`` resolved to the last
    *complete* checkpoint (``True`` or the strings ``"last"``/``"latest"``/``"true"``), and the sampler's
    epoch set before every epoch (see :func:`set_sampler_epoch`)."""

    def train(self, resume_from_checkpoint: Any = None, trial: Any = None, **kwargs: Any):
        resume_from_checkpoint = self.resolve_resume_checkpoint(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _run_epoch(self, *args: Any, **kwargs: Any):
        if kwargs.get("train_dataloader") is not None and kwargs.get("epoch") is not None:
            set_sampler_epoch(kwargs["train_dataloader"], kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def resolve_resume_checkpoint(self, resume: Any) -> Optional[str]:
        """Clean interrupted saves in ``output_dir``, then turn ``resume`` into a complete checkpoint path."""
        run_dir = self.args.output_dir
        if self.args.should_save and run_dir:
            clean_staging(run_dir)
        self.accelerator.wait_for_everyone()  # no process looks for checkpoints while they are being cleaned
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
        if not is_complete_checkpoint(resume):
            what = "does not exist" if not os.path.isdir(resume) else f"has no readable {TRAINER_STATE_NAME}"
            raise IncompleteCheckpointError(
                f"resume_from_checkpoint={resume}: {what}, so it is not a complete checkpoint "
                f"(resume_from_checkpoint='last' picks the last complete one in output_dir)"
            )
        return resume

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """transformers 5.24's ``Trainer._save_checkpoint``, writing into a staging directory first."""
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        staging = staging_path(final)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()

        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(staging, _internal_call=True)
        best_step = self.state.best_global_step
        strategies = (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
        if self.args.save_strategy in strategies and best_step:
            best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
            if best_step == self.state.global_step or os.path.exists(best_dir):
                self.state.best_model_checkpoint = best_dir
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staging)
            self._save_scaler(staging)
            self._save_rng_state(staging)
        if self.args.should_save:
            for cb in self.callback_handler.callbacks + [self.control]:
                if isinstance(cb, ExportableState):
                    name = cb.__class__.__name__
                    if isinstance(self.state.stateful_callbacks[name], list):
                        self.state.stateful_callbacks[name].append(cb.state())
                    else:
                        self.state.stateful_callbacks[name] = cb.state()
            self.state.save_to_json(os.path.join(staging, TRAINER_STATE_NAME))

        self.accelerator.wait_for_everyone()  # every rank's files (DeepSpeed partitions, RNG states) are written
        if self.args.should_save:
            publish_checkpoint(staging, final)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)
        if self.args.should_save:
            rotate_checkpoints(self, run_dir, use_mtime=True)
