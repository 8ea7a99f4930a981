"""Training data prepared once into memory-mapped Arrow files, cached by the inputs' fingerprint.

:func:`prepare_training_data` validates every source in one streaming pass (:func:`~flagm3.data.validation.
stream_validate`: file:line:field errors, the documented fixes counted) and writes each source's valid, fixed
records to an Arrow file as it goes, so no source is ever held in memory as Python objects. The files are then
opened memory-mapped through ``datasets.Dataset.from_file``: every process of a run shares the operating
system's page cache instead of holding its own copy.

Cache: ``<cache_dir>/flagm3-<fingerprint>/`` (``source-<k>.arrow``, ``report.json``, ``meta.json``). The
fingerprint covers the validation options and, per source, a file's absolute path, size and modification time
(each data file of a directory), a ``datasets.Dataset``'s own fingerprint, or a hub id. A second run on unchanged
files skips validation and opens the Arrow files directly (FlagEmbedding's ``--cache_path``). Without
``cache_dir`` the cache lives under the system's temporary directory. An in-memory ``IterableDataset`` has no
fingerprint: it is prepared into a fresh directory every time.

Several processes: rank 0 prepares; the others wait for it (one object broadcast carrying the report and the
directory) and open the same files. A validation error on rank 0 is raised on every rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .validation import DataInput, Record, ValidationReport, _Source, hub_dataset_id, stream_validate

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the report as JSON (was a pickle)
WRITE_BATCH = 1024  # records per Arrow record batch


@dataclass
class PreparedSource:
    """One prepared dataset: its name, ``no_in_batch_neg`` flag and memory-mapped ``datasets.Dataset``."""

    name: str
    no_in_batch_neg: bool
    data: Any


@dataclass
class PreparedData:
    """Every non-empty valid source, memory-mapped, the validation report, and where the cache lives."""

    sources: List[PreparedSource]
    report: ValidationReport
    directory: str
    from_cache: bool


def _schema() -> Any:
    import pyarrow as pa

    texts = pa.list_(pa.string())
    scores = pa.list_(pa.float64())
    return pa.schema([("query", pa.string()), ("pos", texts), ("neg", texts), ("pos_scores", scores),
                      ("neg_scores", scores), ("prompt", pa.string()), ("line", pa.int64())])


def record_from_row(row: Dict[str, Any]) -> Record:
    """The :class:`Record` a prepared row holds."""
    return Record(row["query"], row["pos"], row["neg"], row["pos_scores"], row["neg_scores"], row["prompt"],
                  row["line"])


# ----------------------------------------------------------------------------------------------------
# fingerprint


def _file_key(path: str) -> List[Any]:
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def fingerprint(inputs: Union[DataInput, Sequence[DataInput]], options: Dict[str, Any]) -> Optional[str]:
    """A hex digest naming the prepared form of ``inputs`` under ``options``; ``None`` when some input cannot be
    fingerprinted (an in-memory ``IterableDataset``, a ``Dataset`` without a fingerprint)."""
    from .validation import DATA_FILE_SUFFIXES

    items = [inputs] if isinstance(inputs, (str, os.PathLike)) or not isinstance(inputs, (list, tuple)) else inputs
    parts: List[Any] = [FORMAT_VERSION, sorted(options.items())]
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            if os.path.isdir(path):
                names = sorted(n for n in os.listdir(path) if n.endswith(DATA_FILE_SUFFIXES))
                parts.append(["dir", os.path.abspath(path), [_file_key(os.path.join(path, n)) for n in names]])
            elif os.path.isfile(path):
                parts.append(["file", *_file_key(path)])
            elif hub_dataset_id(path) is not None:
                local = hub_dataset_id(path)
                parts.append(["hub", path, _file_key(local) if os.path.exists(local) else None])
            else:
                parts.append(["missing", path])
        elif getattr(item, "_fingerprint", None):  # datasets.Dataset
            parts.append(["dataset", item._fingerprint])
        else:
            return None
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------------------------
# writing and reading


class _ArrowSinks:
    """One Arrow stream file per source, written in batches of :data:`WRITE_BATCH` records."""

    def __init__(self, directory: str):
        self.directory = directory
        self.writers: Dict[int, Any] = {}
        self.pending: Dict[int, List[Record]] = {}
        self.names: Dict[int, Tuple[str, bool]] = {}

    def __call__(self, k: int, src: _Source, record: Record, mean: Optional[int]) -> None:
        if k not in self.writers:
            import pyarrow as pa

            self.writers[k] = pa.ipc.new_stream(os.path.join(self.directory, f"source-{k}.arrow"), _schema())
            self.pending[k] = []
            self.names[k] = (src.name, src.no_in_batch_neg)
        self.pending[k].append(record)
        if len(self.pending[k]) >= WRITE_BATCH:
            self._flush(k)

    def _flush(self, k: int) -> None:
        import pyarrow as pa

        records = self.pending[k]
        if records:
            columns = {name: [getattr(r, name) for r in records] for name in _schema().names}
            self.writers[k].write_batch(pa.RecordBatch.from_pydict(columns, schema=_schema()))
        records.clear()

    def close(self) -> List[Tuple[int, str, bool]]:
        for k in self.writers:
            self._flush(k)
            self.writers[k].close()
        return [(k, *self.names[k]) for k in sorted(self.writers)]


def _read_report(directory: str) -> ValidationReport:
    with open(os.path.join(directory, "report.json"), encoding="utf-8") as f:
        return ValidationReport.from_json(json.load(f))


def _open(directory: str) -> List[PreparedSource]:
    import datasets

    with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    return [PreparedSource(name, flag, datasets.Dataset.from_file(os.path.join(directory, f"source-{k}.arrow")))
            for k, name, flag in meta["sources"]]


def _prepare(inputs: Any, options: Dict[str, Any], target: str) -> ValidationReport:
    """Validate and write into ``target`` (through a temporary sibling, renamed when complete); nothing is kept
    when the data has errors."""
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        sinks = _ArrowSinks(scratch)
        try:
            report = stream_validate(inputs, check_lengths=False, sink=sinks, **options)
        finally:
            written = sinks.close()
        if not report.ok:
            return report
        with open(os.path.join(scratch, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report.to_json(), f)
        # only sources without errors reach here; an empty one wrote no file
        with open(os.path.join(scratch, "meta.json"), "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT_VERSION, "sources": written, "options": options}, f)
        try:
            os.replace(scratch, target)
        except OSError:  # another run prepared the same data meanwhile: keep theirs
            if not os.path.isfile(os.path.join(target, "meta.json")):
                raise
        return report
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def default_cache_dir() -> str:
    """Where prepared data goes without ``--cache_path``: ``flagm3-prepared`` in the ``datasets`` cache
    (``$HF_DATASETS_CACHE``, by default ``~/.cache/huggingface/datasets``), where ``load_dataset`` keeps its Arrow
    files too: a home directory, not a node's small ``/tmp``, so other nodes' ranks can usually map it."""
    from datasets import config

    return os.path.join(str(config.HF_DATASETS_CACHE), "flagm3-prepared")


def _world() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def prepare_training_data(
    inputs: Union[DataInput, Sequence[DataInput]],
    *,
    cache_dir: Optional[str] = None,
    sample_negatives_from_corpus: bool = True,
    knowledge_distillation: bool = False,
    train_group_size: Optional[int] = None,
) -> PreparedData:
    """Validate ``inputs`` once (rank 0) into memory-mapped Arrow files, or open them from the cache; raises
    :class:`~flagm3.data.validation.DataValidationError` (on every rank) when the data has errors."""
    options = {"sample_negatives_from_corpus": sample_negatives_from_corpus,
               "knowledge_distillation": knowledge_distillation, "train_group_size": train_group_size}
    root = os.path.expanduser(cache_dir) if cache_dir else default_cache_dir()
    rank, world_size = _world()
    message: List[Any] = [None]
    if rank == 0:
        try:
            message[0] = _prepare_or_reuse(inputs, options, root)
        except BaseException as err:
            message[0] = err
            if world_size == 1:
                raise
    if world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(message, src=0)
    result = message[0]
    if isinstance(result, BaseException):
        if rank == 0:
            raise result
        raise RuntimeError(f"preparing the training data failed on rank 0: {result}")
    report, directory, from_cache = result
    report.raise_if_errors()
    return PreparedData(_open(directory), report, directory, from_cache)


def _prepare_or_reuse(inputs: Any, options: Dict[str, Any], root: str) -> Tuple[ValidationReport, str, bool]:
    digest = fingerprint(inputs, options)
    directory = os.path.join(root, f"flagm3-{digest or 'nofp-' + uuid.uuid4().hex[:12]}")
    if digest is not None and os.path.isfile(os.path.join(directory, "meta.json")):
        logger.info("training data: prepared copy found in %s (validation skipped)", directory)
        return _read_report(directory), directory, True
    report = _prepare(inputs, options, directory)
    if report.ok:
        logger.info("training data: %d record(s) validated and prepared in %s", report.num_records, directory)
    return report, directory, False
