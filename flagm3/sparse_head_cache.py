"""The fitted sparse head, cached beside the prepared training data so that a second run skips the IDF fit.

:func:`flagm3.sparse_init.init_sparse_head_from_idf` encodes up to 1,024 passages and tokenises up to 20,000: most
of ``flagm3 train``'s start-up on a small encoder. Its result depends only on the base encoder's weights, the
tokenizer, the IDF corpus (the prepared data and how the corpus is drawn from it), the fit options and where it
runs, so it is stored as ``<cache_dir>/flagm3-sparse-head-<key>.safetensors`` (``weight`` ``[1, H]``, ``bias``
``[1]``, the fit statistics as metadata), where ``cache_dir`` is the directory the prepared data lives in
(``--cache_path``) and ``key`` (:func:`head_cache_key`) hashes:

- the base model: its resolved directory, and each of its top-level files' name, size and modification time;
  the encoder's attention implementation, parameter dtype and the device type the fit runs on (they change the
  token states at float precision), the ignored token ids and the vocabulary size;
- the tokenizer: its class and vocabulary (a fast tokenizer's whole serialised pipeline);
- the data: the prepared data's fingerprint and the IDF corpus' drawing options
  (:meth:`flagm3.data.M3TrainDataset.idf_corpus_key`);
- the fit options (every argument of the fit, defaults included) and the library versions.

An entry is read with ``safetensors`` (no pickle); one that cannot be read, whose key or shapes disagree, or
whose values are not finite is never loaded: a warning is logged and the head is fitted again (and the entry
rewritten). Entries are written to a temporary file and renamed, so a reader never sees half an entry.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import tempfile
from typing import Any, Dict, Optional

import torch

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def model_files_fingerprint(path: str) -> Optional[list]:
    """``[absolute path, [[name, size, mtime_ns], ...]]`` of the top-level files of a model directory (weights,
    config); ``None`` when ``path`` is not a directory."""
    if not os.path.isdir(path):
        return None
    files = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            stat = os.stat(full)  # follows links: the linked weights' size and time
            files.append([name, stat.st_size, stat.st_mtime_ns])
    return [os.path.abspath(path), files]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of what the tokenizer does: a fast tokenizer's serialised pipeline (normaliser, pre-tokeniser,
    model, vocabulary), else its vocabulary; with its class and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # without the truncation and padding state: every call with truncation=/padding= rewrites it, so it
        # depends on what the tokenizer encoded before, not on what it does
        pipeline = json.loads(backend.to_str())
        pipeline.pop("truncation", None)
        pipeline.pop("padding", None)
        body = json.dumps(pipeline, sort_keys=True)
    else:
        body = sorted(tokenizer.get_vocab().items())
    return _sha([type(tokenizer).__name__, body, sorted(map(str, getattr(tokenizer, "all_special_tokens", [])))])


def fit_options(**overrides: Any) -> Dict[str, Any]:
    """Every option of :func:`~flagm3.sparse_init.init_sparse_head_from_idf`: its defaults, then ``overrides``."""
    from .sparse_init import init_sparse_head_from_idf

    params = inspect.signature(init_sparse_head_from_idf).parameters
    options = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    options.update(overrides)
    return options


def head_cache_key(model_path: str, model: Any, tokenizer: Any, data_key: str, options: Dict[str, Any],
                   device: Any = None) -> Optional[str]:
    """The cache key of a fit (see the module docstring); ``None`` when the model is not a local directory."""
    import tokenizers
    import transformers

    from .sparse_init import _vocab_size

    files = model_files_fingerprint(model_path)
    if files is None:
        return None
    encoder = model.encoder
    device_type = torch.device(device).type if device is not None else model.sparse_linear.weight.device.type
    parts = {
        "version": CACHE_VERSION,
        "model": files,
        "encoder": [type(encoder).__name__, getattr(encoder.config, "_attn_implementation", None),
                    str(next(encoder.parameters()).dtype), device_type],
        "ignore": model.sparse_ignore_ids.tolist(),
        "vocab": _vocab_size(model, tokenizer),
        "hidden": int(model.sparse_linear.weight.shape[1]),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": data_key,
        "options": options,
        "libraries": [torch.__version__, transformers.__version__, tokenizers.__version__],
    }
    return _sha(parts)[:24]


class SparseHeadCache:
    """One cache entry: ``<directory>/flagm3-sparse-head-<key>.safetensors``."""

    def __init__(self, directory: str, key: str):
        self.directory = directory
        self.key = key
        self.path = os.path.join(directory, f"flagm3-sparse-head-{key}.safetensors")

    def load(self, model: Any) -> Optional[Dict[str, float]]:
        """Copy the cached head into ``model.sparse_linear`` and return its fit statistics; ``None`` (head
        untouched) when there is no entry, or, with a warning, when the entry is unreadable or does not fit."""
        if not os.path.isfile(self.path):
            return None
        head = model.sparse_linear
        try:
            from safetensors import safe_open

            with safe_open(self.path, framework="pt") as f:
                metadata = f.metadata() or {}
                weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
            if metadata.get("key") != self.key:
                raise ValueError(f"its key is {metadata.get('key')!r}, not {self.key!r}")
            if weight.shape != head.weight.shape or bias.shape != head.bias.shape:
                raise ValueError(f"shapes {tuple(weight.shape)}/{tuple(bias.shape)}, the head's "
                                 f"{tuple(head.weight.shape)}/{tuple(head.bias.shape)}")
            if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
                raise ValueError("non-finite values")
            stats = {k: float(v) for k, v in json.loads(metadata["stats"]).items()}
        except Exception as err:  # a torn write, another version's file, a foreign file: refit, never load
            logger.warning("sparse head cache %s is unusable (%s: %s): fitting the head again",
                           self.path, type(err).__name__, err)
            return None
        with torch.no_grad():
            head.weight.copy_(weight.to(head.weight))
            head.bias.copy_(bias.to(head.bias))
        logger.info("sparse head loaded from the cache %s (IDF fit skipped): %s", self.path, stats)
        return stats

    def save(self, model: Any, stats: Dict[str, float]) -> None:
        """Write ``model.sparse_linear`` and ``stats`` (atomically: a temporary file, then a rename). A write
        that fails (read-only or full disk) only warns: the cache is an optimisation."""
        from safetensors.torch import save_file

        head = model.sparse_linear
        tensors = {"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()}
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-sparse-head-", dir=self.directory)
            os.close(fd)
            try:
                save_file(tensors, tmp, metadata={"key": self.key, "stats": json.dumps(stats)})
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        except OSError as err:
            logger.warning("could not cache the fitted sparse head in %s: %s", self.directory, err)
