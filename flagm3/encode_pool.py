"""Encode with one process per device, as FlagEmbedding's multi-device encoding does.

:class:`EncodePool` starts one worker process per entry of ``devices`` (``["cuda:0", "cuda:1"]``, or
``["cpu", "cpu"]`` to use several CPU processes), each holding its own :class:`~flagm3.inference.M3Embedder` on its
device. :meth:`EncodePool.encode` (and ``encode_queries`` / ``encode_corpus``) cuts the texts into chunks, lets the
workers encode them as they become free, and returns what ``M3Embedder.encode`` returns, in input order::

    with EncodePool("my-model", devices=["cuda:0", "cuda:1"], batch_size=256) as pool:
        out = pool.encode_corpus(passages, return_sparse=True)

Workers are started with the ``spawn`` method (CUDA cannot be shared with a forked child), so the model is loaded
once per worker from ``model_name_or_path`` (a directory or hub id, not an in-memory model).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

logger = logging.getLogger(__name__)

_STOP = None


def _worker(model_name_or_path: str, device: str, embedder_kwargs: Dict[str, Any], inbox: Any, outbox: Any) -> None:
    """Load the model on ``device``; encode each ``(chunk id, method, texts, kwargs)`` until told to stop."""
    import torch

    from .inference import M3Embedder

    if device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        embedder = M3Embedder(model_name_or_path, devices=device, **embedder_kwargs)
        outbox.put(("ready", device, None))
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
        outbox.put(("error", device, repr(err)))
        return
    while True:
        job = inbox.get()
        if job is _STOP:
            return
        chunk, method, texts, kwargs = job
        try:
            outbox.put(("done", chunk, getattr(embedder, method)(texts, show_progress=False, **kwargs)))
        except Exception as err:  # noqa: BLE001
            outbox.put(("error", chunk, repr(err)))


class EncodePool:
    """One :class:`~flagm3.inference.M3Embedder` process per device; see the module docstring.

    Args: ``model_name_or_path`` (what ``M3Embedder`` loads), ``devices`` (one worker each),
    ``chunk_size`` (texts per job: each worker sorts its chunk by length), ``embedder_kwargs`` (the other
    ``M3Embedder`` arguments: ``batch_size``, ``use_fp16``, instructions, lengths, ...).
    """

    def __init__(self, model_name_or_path: str, devices: Sequence[Union[str, int]], chunk_size: int = 8192,
                 **embedder_kwargs: Any):
        if not devices:
            raise ValueError("EncodePool needs at least one device")
        import torch.multiprocessing as mp

        self.devices = [f"cuda:{d}" if isinstance(d, int) else str(d) for d in devices]
        self.chunk_size = chunk_size
        context = mp.get_context("spawn")
        self._inbox, self._outbox = context.Queue(), context.Queue()
        self._workers = [context.Process(target=_worker, args=(str(model_name_or_path), device, embedder_kwargs,
                                                               self._inbox, self._outbox), daemon=True)
                         for device in self.devices]
        for worker in self._workers:
            worker.start()
        for _ in self._workers:
            kind, device, error = self._outbox.get()
            if kind == "error":
                self.close()
                raise RuntimeError(f"EncodePool: the worker on {device} failed to start: {error}")

    def __enter__(self) -> EncodePool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker (also on exit of a ``with`` block)."""
        for worker in self._workers:
            if worker.is_alive():
                self._inbox.put(_STOP)
        for worker in self._workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
        self._workers = []

    def _run(self, method: str, texts: Union[str, List[str]], kwargs: Dict[str, Any]) -> Dict[str, Any]:
        if not self._workers:
            raise RuntimeError("EncodePool is closed")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        starts = list(range(0, len(texts), self.chunk_size)) or [0]
        for chunk, start in enumerate(starts):
            self._inbox.put((chunk, method, texts[start : start + self.chunk_size], kwargs))
        results: Dict[int, Dict[str, Any]] = {}
        while len(results) < len(starts):
            kind, chunk, payload = self._outbox.get()
            if kind == "error":
                raise RuntimeError(f"EncodePool: chunk {chunk} failed: {payload}")
            results[chunk] = payload
        merged = merge_outputs([results[c] for c in range(len(starts))])
        if single:
            merged = {k: None if v is None else v[0] for k, v in merged.items()}
        return merged

    def encode(self, sentences: Union[str, List[str]], **kwargs: Any) -> Dict[str, Any]:
        """``M3Embedder.encode`` over the workers (same arguments and result)."""
        return self._run("encode", sentences, kwargs)

    def encode_queries(self, queries: Union[str, List[str]], **kwargs: Any) -> Dict[str, Any]:
        """``M3Embedder.encode_queries`` over the workers."""
        return self._run("encode_queries", queries, kwargs)

    def encode_corpus(self, corpus: Union[str, List[str]], **kwargs: Any) -> Dict[str, Any]:
        """``M3Embedder.encode_corpus`` over the workers."""
        return self._run("encode_corpus", corpus, kwargs)


def merge_outputs(parts: Sequence[Dict[str, Any]]) -> Dict[str, Optional[Any]]:
    """``M3Embedder.encode`` results of consecutive chunks as one: dense rows stacked, lists concatenated."""
    merged: Dict[str, Optional[Any]] = {}
    for key in ("dense_vecs", "lexical_weights", "colbert_vecs"):
        values = [p[key] for p in parts]
        if any(v is None for v in values):
            merged[key] = None
        elif key == "dense_vecs":
            merged[key] = np.concatenate(values, axis=0)
        else:
            merged[key] = [item for v in values for item in v]
    return merged
