"""Dense vectors of a corpus too large for memory: written to disk as they are encoded, searched chunk by chunk.

``flagm3 mine --index-dir DIR`` (and :func:`flagm3.mining.mine_hard_negatives`'s ``index_dir``) encodes the
candidate pool window by window (``M3Embedder.iter_outputs`` tokenises 16,384 texts at a time) and appends each
window's dense vectors to ``DIR/dense.f32`` (float32, row-major ``[N, H]``, with ``DIR/dense.json`` giving
``N`` and ``H``): one window ``[window, H]`` is held at a time. The vectors are then searched by every query
with one of three backends, each exact (inner product) and each returning the same passages as the in-memory
search:

- ``"faiss"`` (the default when faiss is importable): ``chunk_rows`` rows at a time are read from the file into
  a faiss ``IndexFlatIP`` and searched; the per-chunk top-k are merged into a running top-k
  (:class:`flagm3.evaluation.retrieval.RunningTopK`), so memory is bounded by the chunk, not the corpus.
- ``"torch"`` (the default on an accelerator, and without faiss or Qdrant): the same chunks scored by
  :func:`flagm3.scoring.dense_scores` on ``device``, merged into the running top-k there.
- ``"qdrant"`` (the default without faiss): a local on-disk Qdrant collection ``DIR/qdrant`` filled from the
  file chunk by chunk and searched exactly. Qdrant's embedded local mode holds the collection's vectors in
  memory while it is open (a Qdrant server keeps them on disk): bounded by the index, not by Python objects.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .evaluation.retrieval import RunningTopK
from .scoring import dense_scores

logger = logging.getLogger(__name__)

BACKENDS = ("faiss", "qdrant", "torch")
DEFAULT_CHUNK_ROWS = 65536  # rows read and searched at a time
VECTORS, META = "dense.f32", "dense.json"
QDRANT_DIR, QDRANT_COLLECTION = "qdrant", "dense"


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def default_backend(device: Optional[torch.device] = None) -> str:
    """``"torch"`` on an accelerator; else ``"faiss"`` where it is importable, ``"qdrant"`` otherwise, and
    ``"torch"`` without either."""
    if device is not None and torch.device(device).type != "cpu":
        return "torch"
    if _importable("faiss"):
        return "faiss"
    return "qdrant" if _importable("qdrant_client") else "torch"


class DenseStore:
    """``[rows, dim]`` float32 vectors in ``directory/dense.f32``; :meth:`chunks` reads them, :meth:`rows_at`
    reads some rows (a memory map: only the pages of those rows are read)."""

    def __init__(self, directory: Union[str, os.PathLike]) -> None:
        self.directory = Path(directory)
        meta = json.loads((self.directory / META).read_text())
        self.rows, self.dim = int(meta["rows"]), int(meta["dim"])
        size = (self.directory / VECTORS).stat().st_size
        if size != self.rows * self.dim * 4:
            raise ValueError(f"{self.directory / VECTORS}: {size} bytes, expected {self.rows} x {self.dim} float32")

    @property
    def path(self) -> Path:
        return self.directory / VECTORS

    def chunks(self, chunk_rows: int = DEFAULT_CHUNK_ROWS, limit: Optional[int] = None):
        """``(start, [c, dim] float32 array)`` of the first ``limit`` rows (default all), ``chunk_rows`` at a time;
        each chunk is read into a fresh array (no mapping stays resident)."""
        limit = self.rows if limit is None else min(limit, self.rows)
        with open(self.path, "rb") as f:
            for start in range(0, limit, chunk_rows):
                count = min(chunk_rows, limit - start)
                f.seek(start * self.dim * 4)
                block = np.fromfile(f, dtype=np.float32, count=count * self.dim)
                yield start, block.reshape(count, self.dim)

    def rows_at(self, rows: Sequence[int]) -> Tensor:
        """The vectors of ``rows``: ``[len(rows), dim]``."""
        mapped = np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.rows, self.dim))
        return torch.from_numpy(np.array(mapped[np.asarray(rows, dtype=np.int64)]))


def write_dense_store(
    embedder: Any,
    texts: Sequence[str],
    directory: Union[str, os.PathLike],
    max_length: int,
    batch_size: Optional[int] = None,
    show_progress: bool = False,
    desc: str = "Encoding to disk",
) -> DenseStore:
    """Encode ``texts`` (passages: the embedder's passage compression applies) and write their dense vectors to
    ``directory`` window by window; returns the :class:`DenseStore`. Rows are in the order of ``texts``."""
    from .inference import _ENCODE_WINDOW

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    window = max(_ENCODE_WINDOW, batch_size or 0)
    bar = tqdm(total=len(texts), desc=desc, unit="text", disable=not show_progress)
    dim = None
    tmp = directory / (VECTORS + ".tmp")
    try:
        with open(tmp, "wb") as f:
            for start in range(0, len(texts), window):
                part = texts[start : start + window]
                block: Optional[np.ndarray] = None
                for indices, out in embedder.iter_outputs(part, max_length=max_length, batch_size=batch_size,
                                                          heads=("dense",), show_progress=False, passage=True):
                    vecs = out["dense"].float().cpu().numpy()
                    if block is None:
                        block = np.empty((len(part), vecs.shape[1]), dtype=np.float32)
                    block[indices] = vecs
                    bar.update(len(indices))
                if block is not None:
                    dim = block.shape[1]
                    block.tofile(f)
    finally:
        bar.close()
    os.replace(tmp, directory / VECTORS)
    (directory / META).write_text(json.dumps({"rows": len(texts), "dim": dim or 0}))
    return DenseStore(directory)


def search_store(
    store: DenseStore,
    queries: Tensor,
    k: int,
    backend: Optional[str] = None,
    limit: Optional[int] = None,
    chunk_rows: Optional[int] = None,
    device: Optional[torch.device] = None,
    show_progress: bool = False,
) -> tuple[Tensor, str]:
    """Indices ``[Q, k]`` (host, long) of the best of the first ``limit`` rows (default all) of ``store`` per query
    ``queries`` [Q, H] (inner product, best first; ties to the smaller row, except within one faiss chunk), and
    the backend used (``backend`` default: :func:`default_backend`). ``chunk_rows`` (default
    :data:`DEFAULT_CHUNK_ROWS`) rows are read and searched at a time. ``device``: where ``"torch"`` scores."""
    backend = backend or default_backend(device if device is not None else queries.device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    limit = store.rows if limit is None else min(limit, store.rows)
    k = min(k, limit)
    chunk_rows = chunk_rows or DEFAULT_CHUNK_ROWS
    if backend == "qdrant":
        return _search_qdrant(store, queries, k, limit, chunk_rows, show_progress), backend
    device = queries.device if device is None else torch.device(device)
    if backend == "faiss":
        import faiss

        host_queries = np.ascontiguousarray(queries.detach().float().cpu().numpy())
    else:
        queries = queries.to(device).float()
    keeper = RunningTopK(queries.shape[0], k, device=None if backend == "faiss" else device)
    bar = tqdm(total=limit, desc=f"Search ({backend})", unit="passage", disable=not show_progress)
    for start, block in store.chunks(chunk_rows, limit):
        if backend == "faiss":
            index = faiss.IndexFlatIP(store.dim)
            index.add(block)
            scores, found = index.search(host_queries, min(k, block.shape[0]))
            keeper.update(torch.from_numpy(scores), torch.from_numpy(found).long() + start)
        else:
            scores = dense_scores(queries, torch.from_numpy(block).to(device))
            keeper.update(scores, torch.arange(start, start + block.shape[0], device=device))
        bar.update(block.shape[0])
    bar.close()
    return keeper.indices.cpu(), backend


def _search_qdrant(store: DenseStore, queries: Tensor, k: int, limit: int, chunk_rows: int,
                   show_progress: bool) -> Tensor:
    """Fill the local collection ``store.directory/qdrant`` from the store (once) and search it exactly."""
    from .qdrant import _models, connect

    models = _models()
    client = connect(str(store.directory / QDRANT_DIR))
    try:
        existing = client.count(QDRANT_COLLECTION).count if client.collection_exists(QDRANT_COLLECTION) else -1
        if existing != limit:
            if existing >= 0:
                client.delete_collection(QDRANT_COLLECTION)
            client.create_collection(QDRANT_COLLECTION, vectors_config=models.VectorParams(
                size=store.dim, distance=models.Distance.DOT, on_disk=True))
            bar = tqdm(total=limit, desc="Qdrant index", unit="passage", disable=not show_progress)
            for start, block in store.chunks(chunk_rows, limit):
                for s in range(0, block.shape[0], 1024):
                    part = block[s : s + 1024]
                    client.upload_collection(QDRANT_COLLECTION, vectors=part,
                                             ids=list(range(start + s, start + s + part.shape[0])))
                bar.update(block.shape[0])
            bar.close()
        params = models.SearchParams(exact=True)
        found = []
        q = queries.detach().float().cpu().numpy()
        for s in range(0, q.shape[0], 64):
            requests = [models.QueryRequest(query=row.tolist(), limit=k, params=params) for row in q[s : s + 64]]
            for response in client.query_batch_points(QDRANT_COLLECTION, requests):
                # ties to the smaller row, as the other backends
                points = sorted(response.points, key=lambda p: (-p.score, int(p.id)))
                found.append([int(p.id) for p in points])
        return torch.tensor(found, dtype=torch.long).view(q.shape[0], k)
    finally:
        client.close()
