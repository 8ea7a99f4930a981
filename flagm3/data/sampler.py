"""Batch sampler: per-device batches forming same-dataset, length-grouped global batches.

One *global batch* is ``batch_size * num_replicas`` indices, cut into ``num_replicas`` consecutive
per-device batches (rank ``r`` gets slice ``r``). With several processes, accelerate (under the HF Trainer)
hands every ``num_replicas``-th batch of this sampler to each rank, so consecutive runs of ``num_replicas``
batches are the per-rank parts of one global batch.

Per epoch (deterministic in ``(seed, epoch)``):

1. Indices are split into *buckets* whose items may share a global batch: each dataset flagged
   ``no_in_batch_neg`` is its own bucket, and so is every dataset when ``same_dataset_within_batch``;
   the remaining datasets share one bucket.
2. Each bucket is shuffled; with ``group_by_length`` it is cut into mega-batches of
   ``mega_batch_size`` global batches, each sorted by ``dataset.lengths`` (longest first).
3. The bucket is cut into global batches. The last incomplete one is, with ``drop_last=False``,
   completed with the items just before it in that order (so every rank gets a full batch and the
   batch holds no duplicate while the bucket has at least one global batch of items; smaller buckets
   are cycled); with ``drop_last=True`` it is dropped.
4. Global batches of all buckets are shuffled together.

Every index therefore appears exactly once per epoch, except at most ``global_batch - 1`` repeated
indices per bucket completing its last batch. Sampler and dataset share the epoch: :meth:`set_epoch`
and ``__iter__`` call ``dataset.set_epoch``. (Dataloader workers get a copy of the dataset when the
iterator is created, so ``persistent_workers=True`` would keep drawing the first epoch's groups.)
"""

from __future__ import annotations

import math
import random
import warnings
from typing import Any, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


def padding_fraction(attention_mask: torch.Tensor) -> float:
    """Fraction of padded positions in an attention mask ``[B, L]`` (1 = token, 0 = padding)."""
    if attention_mask.numel() == 0:
        return 0.0
    return 1.0 - float(attention_mask.ne(0).sum()) / attention_mask.numel()


class M3BatchSampler(Sampler[List[int]]):
    """Yield per-device batches (lists of dataset indices); see the module docstring.

    ``dataset`` should expose ``dataset_sizes``, ``no_in_batch_neg`` and ``lengths`` (as
    :class:`~flagm3.data.dataset.M3TrainDataset` does); without them it is one dataset and
    length grouping is off.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        num_replicas: int = 1,
        seed: int = 42,
        same_dataset_within_batch: bool = False,
        group_by_length: bool = True,
        drop_last: bool = False,
        mega_batch_size: int = 50,
    ):
        if batch_size < 1 or num_replicas < 1 or mega_batch_size < 1:
            raise ValueError("batch_size, num_replicas and mega_batch_size must be >= 1")
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.seed = seed
        self.same_dataset_within_batch = same_dataset_within_batch
        self.drop_last = drop_last
        self.mega_batch_size = mega_batch_size
        self.epoch = 0

        sizes: Sequence[int] = getattr(dataset, "dataset_sizes", None) or [len(dataset)]
        flags: Sequence[bool] = getattr(dataset, "no_in_batch_neg", None) or [False] * len(sizes)
        # lengths are read (and, for M3TrainDataset, computed) only when grouping by length
        self.lengths: Optional[Sequence[int]] = getattr(dataset, "lengths", None) if group_by_length else None
        self.group_by_length = group_by_length and self.lengths is not None
        self.buckets = self._make_buckets(sizes, flags)

        global_size = self.global_batch_size
        small = [len(b) for b in self.buckets if len(b) < global_size]
        if len(self) == 0:
            raise ValueError(
                f"no batch to yield: every bucket has fewer than batch_size*num_replicas={global_size} items "
                f"(sizes {[len(b) for b in self.buckets]}) and drop_last=True"
            )
        if small and not drop_last:
            warnings.warn(
                f"{len(small)} bucket(s) smaller than one global batch ({global_size}): their batches repeat "
                "items, so some queries see their own positive as an in-batch negative",
                stacklevel=2,
            )

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def _make_buckets(self, sizes: Sequence[int], flags: Sequence[bool]) -> List[np.ndarray]:
        """Each bucket's indices, an int32 array (int64 past 2**31 items): no Python int per item."""
        shared: List[np.ndarray] = []
        buckets: List[np.ndarray] = []
        dtype = np.int32 if sum(sizes) < 2**31 else np.int64
        start = 0
        for size, flag in zip(sizes, flags):
            indices = np.arange(start, start + size, dtype=dtype)
            start += size
            if self.same_dataset_within_batch or flag:
                buckets.append(indices)
            else:
                shared.append(indices)
        if shared:
            buckets.insert(0, np.concatenate(shared))
        return [b for b in buckets if len(b)]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's batch order; also sets the dataset's epoch (its group sampling)."""
        self.epoch = int(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)

    def _order(self, bucket: np.ndarray, rng: random.Random) -> np.ndarray:
        order = bucket.copy()
        rng.shuffle(order)  # in place, the same swaps (and draws) as shuffling a list of these indices
        if not self.group_by_length:
            return order
        lengths = np.asarray(self.lengths)
        mega = self.mega_batch_size * self.global_batch_size
        for start in range(0, len(order), mega):  # longest first; ties keep their order (a stable sort)
            chunk = order[start : start + mega]
            order[start : start + mega] = chunk[np.argsort(-lengths[chunk], kind="stable")]
        return order

    def _cut(self, order: np.ndarray) -> np.ndarray:
        """Global batches ``[batches, global_batch_size]`` of ``order`` (see the module docstring, step 3)."""
        size = self.global_batch_size
        n = len(order)
        batches = [order[: n - n % size].reshape(-1, size)]
        if n % size and not self.drop_last:
            batches.append((order[n - size :] if n >= size else np.resize(order, size)).reshape(1, size))
        return np.concatenate(batches)

    def _global_batch_array(self) -> np.ndarray:
        """This epoch's global batches, in order: ``[batches, global_batch_size]`` (the buckets' dtype)."""
        rng = random.Random(f"flagm3.sampler:{self.seed}:{self.epoch}")
        batches = np.concatenate([self._cut(self._order(bucket, rng)) for bucket in self.buckets])
        permutation = np.arange(len(batches))
        rng.shuffle(permutation)  # the draws of shuffling the list of batches
        return batches[permutation]

    def global_batches(self) -> List[List[int]]:
        """This epoch's global batches, in order."""
        return self._global_batch_array().tolist()

    def __iter__(self) -> Iterator[List[int]]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        for batch in self._global_batch_array():
            for r in range(self.num_replicas):
                yield batch[r * self.batch_size : (r + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        size = self.global_batch_size
        rounding = math.floor if self.drop_last else math.ceil
        return sum(rounding(len(b) / size) for b in self.buckets) * self.num_replicas
