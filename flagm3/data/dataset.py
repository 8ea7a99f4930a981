"""Training dataset: one query, its positive and ``train_group_size - 1`` negatives per item.

Group sampling follows FlagEmbedding's ``AbsEmbedderTrainDataset.__getitem__``:

- the positive is ``pos[i]`` with ``i`` drawn uniformly;
- with at least ``G - 1`` negatives, ``G - 1`` distinct ones are drawn; with fewer, the negative indices are
  repeated ``ceil((G - 1) / len(neg))`` times and ``G - 1`` are drawn from that list (so repetition);
- teacher scores (``knowledge_distillation=True``) are ``pos_scores[i]`` then ``neg_scores[j]`` for the
  negatives drawn, in the same order as the passages;
- the passage instruction is ``passage_instruction_format.format(instruction, passage)`` on every passage.

Deviations, on purpose:

- randomness comes from a ``random.Random`` seeded from ``(seed, epoch, idx)``, not the global RNG, so a
  resumed run draws the same groups;
- a record's ``prompt`` is its query instruction even when ``query_instruction_for_retrieval`` is None
  (FlagEmbedding's plain dataset ignores prompts then, and its same-dataset variant formats ``None`` into
  the query); with neither, the query is left as is;
- records without negatives draw them from the other records of their dataset
  (``sample_negatives_from_corpus``; FlagEmbedding divides by zero); such groups have no teacher scores;
- ``max_example_num_per_dataset`` subsamples with ``seed``; directory files are read in sorted order.
"""

from __future__ import annotations

import bisect
import math
import random
from typing import Any, Dict, List, Optional, Sequence, Union

from torch.utils.data import Dataset

from ..texts import format_instruction, unescape_newlines
from .validation import DataInput, LoadedSource, Record, ValidationReport, load_and_validate


class M3TrainDataset(Dataset):
    """Query/passage-group dataset over one or more training datasets (files).

    Items are ``{"query": str, "passages": list[str] (G: positive first), "teacher_scores": list[float]
    (G) or None, "dataset_index": int, "no_in_batch_neg": bool}``.

    Attributes: ``dataset_names``, ``dataset_sizes``, ``dataset_offsets`` (first global index of each
    dataset), ``no_in_batch_neg`` (one flag per dataset), ``lengths`` (per item: mean passage length in
    tokens, capped at ``passage_max_len``; exact with a tokenizer, else estimated), ``validation_report``.
    """

    def __init__(
        self,
        data: Union[DataInput, Sequence[DataInput]],
        *,
        train_group_size: int = 8,
        query_instruction_for_retrieval: Optional[str] = None,
        query_instruction_format: str = "{}{}",
        passage_instruction_for_retrieval: Optional[str] = None,
        passage_instruction_format: str = "{}{}",
        knowledge_distillation: bool = False,
        max_example_num_per_dataset: Optional[int] = None,
        sample_negatives_from_corpus: bool = True,
        seed: int = 42,
        tokenizer: Any = None,
        query_max_len: Optional[int] = 32,
        passage_max_len: Optional[int] = 128,
    ):
        if train_group_size < 1:
            raise ValueError(f"train_group_size must be >= 1, got {train_group_size}")
        self.train_group_size = train_group_size
        self.query_instruction_for_retrieval = query_instruction_for_retrieval
        self.query_instruction_format = unescape_newlines(query_instruction_format)
        self.passage_instruction_for_retrieval = passage_instruction_for_retrieval
        self.passage_instruction_format = unescape_newlines(passage_instruction_format)
        self.knowledge_distillation = knowledge_distillation
        self.seed = seed
        self.epoch = 0

        sources, report = load_and_validate(
            data,
            tokenizer=tokenizer,
            query_max_len=query_max_len,
            passage_max_len=passage_max_len,
            sample_negatives_from_corpus=sample_negatives_from_corpus,
            knowledge_distillation=knowledge_distillation,
            train_group_size=train_group_size,
        )
        report.raise_if_errors()
        self.validation_report: ValidationReport = report

        self._records: List[Record] = []
        self.lengths: List[int] = []
        self.dataset_names: List[str] = []
        self.dataset_sizes: List[int] = []
        self.dataset_offsets: List[int] = []
        self.no_in_batch_neg: List[bool] = []
        self._pools: Dict[int, List[str]] = {}
        for d, src in enumerate(sources):
            keep = self._subsample(src, max_example_num_per_dataset, seed)
            records = [src.records[i] for i in keep]
            self.dataset_offsets.append(len(self._records))
            self.dataset_names.append(src.name)
            self.dataset_sizes.append(len(records))
            self.no_in_batch_neg.append(src.no_in_batch_neg)
            self._records.extend(records)
            cap = passage_max_len if passage_max_len is not None else math.inf
            self.lengths.extend(int(min(src.passage_lengths[i], cap)) for i in keep)
            if train_group_size > 1 and any(not r.neg for r in records):
                # negatives for records without any: every text of the other records (duplicates kept)
                self._pools[d] = [t for r in records for t in (*r.pos, *r.neg)]

    @staticmethod
    def _subsample(src: LoadedSource, limit: Optional[int], seed: int) -> List[int]:
        n = len(src.records)
        if limit is None or n <= limit:
            return list(range(n))
        return sorted(random.Random(f"flagm3.subsample:{seed}:{src.name}").sample(range(n), limit))

    def passage_texts(self) -> List[str]:
        """Every distinct passage (positives and negatives) of the loaded records, in first-seen order."""
        return list(dict.fromkeys(t for r in self._records for t in (*r.pos, *r.neg)))

    def __len__(self) -> int:
        return len(self._records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose groups ``__getitem__`` draws (called by :class:`M3BatchSampler`)."""
        self.epoch = int(epoch)

    def dataset_index(self, idx: int) -> int:
        """Which dataset the global item ``idx`` belongs to."""
        return bisect.bisect_right(self.dataset_offsets, idx) - 1

    def _format_query(self, record: Record) -> str:
        instruction = record.prompt if record.prompt is not None else self.query_instruction_for_retrieval
        return format_instruction(record.query, instruction, self.query_instruction_format)

    def _corpus_negatives(self, record: Record, pool: List[str], k: int, rng: random.Random) -> List[str]:
        """``k`` negatives drawn from ``pool`` (texts of the dataset), never one of the record's positives;
        distinct while cheap to find, repeated otherwise (validation ensured a candidate exists)."""
        positives = set(record.pos)
        chosen: List[str] = []
        for _ in range(10 * k + 20):
            if len(chosen) == k:
                return chosen
            text = pool[rng.randrange(len(pool))]
            if text not in positives and text not in chosen:
                chosen.append(text)
        candidates = [t for t in pool if t not in positives]
        chosen.extend(rng.choice(candidates) for _ in range(k - len(chosen)))
        return chosen

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        if idx < 0:
            idx += len(self._records)
        if not 0 <= idx < len(self._records):
            raise IndexError(f"index {idx} out of range for {len(self._records)} items")
        record = self._records[idx]
        d = self.dataset_index(idx)
        rng = random.Random(f"flagm3.group:{self.seed}:{self.epoch}:{idx}")
        k = self.train_group_size - 1

        pos_idx = rng.choice(range(len(record.pos)))
        passages = [record.pos[pos_idx]]
        teacher: Optional[List[float]] = None
        if record.neg or k == 0:
            neg_all = list(range(len(record.neg)))
            if len(record.neg) < k:
                neg_idxs = rng.sample(neg_all * math.ceil(k / len(record.neg)), k)
            else:
                neg_idxs = rng.sample(neg_all, k)
            passages += [record.neg[j] for j in neg_idxs]
            if self.knowledge_distillation:  # validation made sure the scores are there
                teacher = [record.pos_scores[pos_idx]] + [record.neg_scores[j] for j in neg_idxs]
        else:
            passages += self._corpus_negatives(record, self._pools[d], k, rng)

        passages = [format_instruction(p, self.passage_instruction_for_retrieval, self.passage_instruction_format)
                    for p in passages]
        return {
            "query": self._format_query(record),
            "passages": passages,
            "teacher_scores": teacher,
            "dataset_index": d,
            "no_in_batch_neg": self.no_in_batch_neg[d],
        }
