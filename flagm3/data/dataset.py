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
import json
import math
import os
import random
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from torch.utils.data import Dataset

from ..texts import format_instruction, unescape_newlines
from .mapped_pages import PageReleaser
from .prepared import PreparedSource, prepare_training_data, record_from_row
from .validation import DataInput, Record, ValidationReport, mean_passage_lengths

# Passages whose IDF a fresh sparse head is fitted to (flagm3.sparse_init): all of them up to this many.
IDF_MAX_TEXTS = 20_000
# Mapped pages of the prepared files are given back (flagm3.data.mapped_pages) every this many records read at
# random (about 0.1 MB of pages each), or read in order.
RELEASE_EVERY_RANDOM = 128
RELEASE_EVERY_SCAN = 65_536


class M3TrainDataset(Dataset):
    """Query/passage-group dataset over one or more training datasets (files).

    Items are ``{"query": str, "passages": list[str] (G: positive first), "teacher_scores": list[float]
    (G) or None, "dataset_index": int, "no_in_batch_neg": bool}``.

    The records live in memory-mapped Arrow files (:mod:`flagm3.data.prepared`, validated once and cached by
    the files' fingerprint in ``cache_dir``); an item is read from them when asked for, and tokenised only by the
    collator. The mapped pages it reads are given back as it goes (:mod:`flagm3.data.mapped_pages`), so the
    process' RSS does not grow with the files.

    Attributes: ``dataset_names``, ``dataset_sizes``, ``dataset_offsets`` (first global index of each
    dataset), ``no_in_batch_neg`` (one flag per dataset), ``lengths`` (per item: mean passage length in
    tokens, capped at ``passage_max_len``; exact with a tokenizer, else estimated; computed on first use, which
    only length grouping asks for), ``validation_report``, ``prepared_dir`` (the Arrow files).
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
        cache_dir: Optional[str] = None,
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
        self.max_example_num_per_dataset = max_example_num_per_dataset
        self.epoch = 0
        self.tokenizer = tokenizer
        self.passage_max_len = passage_max_len

        prepared = prepare_training_data(
            data,
            cache_dir=cache_dir,
            sample_negatives_from_corpus=sample_negatives_from_corpus,
            knowledge_distillation=knowledge_distillation,
            train_group_size=train_group_size,
        )
        self.validation_report: ValidationReport = prepared.report
        self.prepared_dir = prepared.directory

        self._tables: List[Any] = []  # one memory-mapped datasets.Dataset per dataset
        self.dataset_names: List[str] = []
        self.dataset_sizes: List[int] = []
        self.dataset_offsets: List[int] = []
        self.no_in_batch_neg: List[bool] = []
        self._pools: Dict[int, np.ndarray] = {}  # dataset -> cumulative text counts of its records
        self._num_passages: Optional[int] = None  # positives + negatives of every record, counted once
        files = [f["filename"] for src in prepared.sources for f in src.data.cache_files]
        self._scan_pages = PageReleaser(files, RELEASE_EVERY_SCAN)
        self._random_pages = PageReleaser(files, RELEASE_EVERY_RANDOM)
        total, passages = 0, 0
        for d, src in enumerate(prepared.sources):
            table = self._subsample(src, max_example_num_per_dataset, seed)
            self.dataset_offsets.append(total)
            self.dataset_names.append(src.name)
            self.dataset_sizes.append(len(table))
            self.no_in_batch_neg.append(src.no_in_batch_neg)
            self._tables.append(table)
            total += len(table)
            if train_group_size > 1:
                n_pos, n_neg = _list_lengths(table, "pos", self._scan_pages), _list_lengths(table, "neg", self._scan_pages)
                passages += int((n_pos + n_neg).sum())
                if (n_neg == 0).any():
                    # negatives for records without any: every text of the other records (duplicates kept)
                    self._pools[d] = np.cumsum(n_pos + n_neg)
        self._length = total
        if train_group_size > 1:
            self._num_passages = passages
        self._lengths: Optional[np.ndarray] = None
        self._scan_pages.release()  # what opening the files and counting the lists mapped

    @staticmethod
    def _subsample(src: PreparedSource, limit: Optional[int], seed: int) -> Any:
        n = len(src.data)
        if limit is None or n <= limit:
            return src.data
        keep = sorted(random.Random(f"flagm3.subsample:{seed}:{src.name}").sample(range(n), limit))
        return src.data.select(keep)

    def _record(self, d: int, i: int) -> Record:
        return record_from_row(self._tables[d][i])

    def _iter_records(self, d: int, chunk: int = 1024):
        table = self._tables[d]
        for start in range(0, len(table), chunk):
            self._scan_pages.tick(chunk)
            rows = table[start : start + chunk]
            for j in range(len(rows["query"])):
                yield record_from_row({k: v[j] for k, v in rows.items()})

    @property
    def lengths(self) -> np.ndarray:
        """Per item: mean passage length in tokens, capped at ``passage_max_len`` (exact with the tokenizer given,
        else estimated). Computed on first use, 1,024 records at a time."""
        if self._lengths is None:
            cap = self.passage_max_len if self.passage_max_len is not None else math.inf
            out = np.zeros(self._length, dtype=np.int64)
            pos = 0
            for d in range(len(self._tables)):
                chunk: List[Record] = []
                for record in self._iter_records(d):
                    chunk.append(record)
                    if len(chunk) == 1024:
                        out[pos : pos + len(chunk)] = np.minimum(mean_passage_lengths(chunk, self.tokenizer), cap)
                        pos += len(chunk)
                        chunk = []
                if chunk:
                    out[pos : pos + len(chunk)] = np.minimum(mean_passage_lengths(chunk, self.tokenizer), cap)
                    pos += len(chunk)
            self._lengths = out
            self._scan_pages.release()
        return self._lengths

    def idf_corpus(self, max_texts: int = IDF_MAX_TEXTS, seed: int = 0) -> List[str]:
        """Distinct passages to fit a fresh sparse head's IDF to: all of them, in first-seen order, when the
        datasets hold at most ``max_texts`` passages; otherwise those of records drawn at random (seeded) until
        ``max_texts`` are collected. Reads only the records it uses."""
        pages = self._scan_pages
        if self._num_passages is None:  # not counted at start (train_group_size 1)
            self._num_passages = sum(int((_list_lengths(t, "pos", pages) + _list_lengths(t, "neg", pages)).sum())
                                     for t in self._tables)
            pages.release()
        total = self._num_passages
        seen: Dict[str, None] = {}
        if total <= max_texts:
            for d in range(len(self._tables)):
                for r in self._iter_records(d):
                    seen.update(dict.fromkeys((*r.pos, *r.neg)))
            pages.release()
            return list(seen)
        rng = random.Random(f"flagm3.idf:{seed}")
        drawn: set = set()
        while len(seen) < max_texts and len(drawn) < self._length:  # records drawn one at a time, no index list
            idx = rng.randrange(self._length)
            if idx in drawn:
                continue
            drawn.add(idx)
            d = self.dataset_index(idx)
            r = self._record(d, idx - self.dataset_offsets[d])
            seen.update(dict.fromkeys((*r.pos, *r.neg)))
            self._random_pages.tick()
        self._random_pages.release()
        return list(seen)[:max_texts]

    def idf_corpus_key(self, max_texts: int = IDF_MAX_TEXTS, seed: int = 0) -> Optional[str]:
        """What :meth:`idf_corpus` returns depends on, as a string (to key a cached fit by): the prepared data's
        fingerprint (its directory's name), the subsampling and the drawing options; ``None`` when the data has no
        fingerprint (an in-memory ``IterableDataset``)."""
        name = os.path.basename(os.path.normpath(self.prepared_dir))
        if name.startswith("flagm3-nofp-"):
            return None
        return json.dumps([name, self.max_example_num_per_dataset, self.seed, max_texts, seed])

    def passage_texts(self) -> List[str]:
        """Every distinct passage (positives and negatives) of the loaded records, in first-seen order (reads
        every record: :meth:`idf_corpus` bounds it)."""
        return self.idf_corpus(max_texts=math.inf)

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose groups ``__getitem__`` draws (called by :class:`M3BatchSampler`)."""
        self.epoch = int(epoch)

    def dataset_index(self, idx: int) -> int:
        """Which dataset the global item ``idx`` belongs to."""
        return bisect.bisect_right(self.dataset_offsets, idx) - 1

    def _format_query(self, record: Record) -> str:
        instruction = record.prompt if record.prompt is not None else self.query_instruction_for_retrieval
        return format_instruction(record.query, instruction, self.query_instruction_format)

    def _pool_text(self, d: int, j: int) -> str:
        """The ``j``-th text of dataset ``d``'s pool: every record's positives then negatives, in order."""
        cum = self._pools[d]
        i = int(np.searchsorted(cum, j, side="right"))
        r = self._record(d, i)
        return (*r.pos, *r.neg)[j - (int(cum[i - 1]) if i else 0)]

    def _corpus_negatives(self, record: Record, d: int, k: int, rng: random.Random) -> List[str]:
        """``k`` negatives drawn from the texts of dataset ``d``, never one of the record's positives; distinct
        while cheap to find, repeated otherwise (validation ensured a candidate exists)."""
        positives = set(record.pos)
        size = int(self._pools[d][-1])
        chosen: List[str] = []
        for _ in range(10 * k + 20):
            if len(chosen) == k:
                return chosen
            text = self._pool_text(d, rng.randrange(size))
            if text not in positives and text not in chosen:
                chosen.append(text)
        candidates = [t for r in self._iter_records(d) for t in (*r.pos, *r.neg) if t not in positives]
        chosen.extend(rng.choice(candidates) for _ in range(k - len(chosen)))
        return chosen

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        if idx < 0:
            idx += self._length
        if not 0 <= idx < self._length:
            raise IndexError(f"index {idx} out of range for {self._length} items")
        self._random_pages.tick()
        d = self.dataset_index(idx)
        record = self._record(d, idx - self.dataset_offsets[d])
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
            passages += self._corpus_negatives(record, d, k, rng)

        passages = [format_instruction(p, self.passage_instruction_for_retrieval, self.passage_instruction_format)
                    for p in passages]
        return {
            "query": self._format_query(record),
            "passages": passages,
            "teacher_scores": teacher,
            "dataset_index": d,
            "no_in_batch_neg": self.no_in_batch_neg[d],
        }


def _list_lengths(table: Any, column: str, pages: Optional[PageReleaser] = None) -> np.ndarray:
    """Lengths of a list column of a (possibly index-mapped) ``datasets.Dataset``, without reading its texts;
    record batch by record batch, ticking ``pages`` (the mapped offsets are given back as it goes)."""
    import pyarrow.compute as pc

    parts = []
    for chunk in table.data.column(column).chunks:
        parts.append(pc.list_value_length(chunk).to_numpy(zero_copy_only=False))
        if pages is not None:
            pages.tick(len(chunk))
    lengths = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    mapping = getattr(table, "_indices", None)
    if mapping is not None:  # a .select()ed dataset: rows through its index mapping
        lengths = lengths[mapping.column(0).to_numpy()]
    return lengths.astype(np.int64)
