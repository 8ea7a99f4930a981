"""Inference with an M3 model: a drop-in for FlagEmbedding 1.4.2's ``BGEM3FlagModel``.

:class:`M3Embedder` encodes texts into dense vectors, lexical weights and ColBERT vectors with the same
meaning and numbers as ``BGEM3FlagModel`` (``encode``, ``encode_queries``, ``encode_corpus``,
``compute_score`` and the scoring helpers), and streams length-sorted batches of raw head outputs through
:meth:`M3Embedder.iter_outputs` for evaluation. All scores come from :mod:`flagm3.scoring`.

Lexical dicts are scored by one sparse matrix product (:func:`flagm3.scoring.lexical_matrix`,
:func:`flagm3.scoring.compute_lexical_matching_scores`, also importable from here).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from .compression import Compression, PassageStats, pool_colbert_batch, prune_lexical, truncate
from .convert_bge_m3 import resolve_checkpoint
from .defaults import COMPUTE_SCORE_WEIGHTS
from .export import is_onnx_export
from .hybrid_weights import read_hybrid_weights
from .modeling_m3 import M3Model, check_tokenizer_fits
from .scoring import (
    HEADS,
    PooledLexical,
    colbert_scores,
    colbert_scores_paired,
    compute_lexical_matching_scores,
    dense_scores_paired,
    hybrid_scores,
    pool_lexical,
    sparse_scores_paired,
)
from .scoring import (
    lexical_matrix as lexical_matrix,  # re-exported: flagm3.inference.lexical_matrix
)
from .texts import format_instruction

logger = logging.getLogger(__name__)

LexicalWeights = Dict[str, float]
SCORE_KEYS = ("colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense")
_TOKENIZE_CHUNK = 4096  # texts tokenised per call before length sorting
_ENCODE_WINDOW = 16384  # texts tokenised and length-sorted together: bounds the token lists held at once


def _drops_arrays(method: Any) -> Any:
    """A dict method that changes the dict, wrapped to drop :class:`LexicalDict`'s arrays first."""

    def changed(self: LexicalDict, *args: Any, **kwargs: Any) -> Any:
        self.arrays = None
        return method(self, *args, **kwargs)

    changed.__name__ = method.__name__
    return changed


class LexicalDict(dict):
    """``{str(token_id): weight}`` as FlagEmbedding returns it, carrying its token ids and weights as arrays too.

    :func:`lexical_matrix` then skips parsing the string keys, which is most of the time of scoring dicts. Any
    change to the dict drops the arrays, so they never disagree with its items; it pickles as a plain dict.
    """

    __slots__ = ("arrays",)

    def __init__(self, token_ids: np.ndarray, weights: np.ndarray) -> None:
        super().__init__(zip(map(str, token_ids.tolist()), weights.tolist()))
        self.arrays: Optional[Tuple[np.ndarray, np.ndarray]] = (token_ids.astype(np.int64), weights.astype(np.float64))

    __setitem__ = _drops_arrays(dict.__setitem__)
    __delitem__ = _drops_arrays(dict.__delitem__)
    __ior__ = _drops_arrays(dict.__ior__)
    clear = _drops_arrays(dict.clear)
    pop = _drops_arrays(dict.pop)
    popitem = _drops_arrays(dict.popitem)
    setdefault = _drops_arrays(dict.setdefault)
    update = _drops_arrays(dict.update)

    def __reduce__(self) -> Any:
        return (dict, (dict(self),))


def _lexical_dicts(pooled: PooledLexical) -> List[LexicalWeights]:
    """One ``{str(token_id): weight}`` dict per text (keys in token-id order) from pooled weights."""
    rows = pooled.rows.numpy()
    counts = np.bincount(rows, minlength=pooled.num_rows)
    splits = np.cumsum(counts)[:-1]
    ids = np.split(pooled.token_ids.numpy(), splits)
    weights = np.split(pooled.weights.numpy(), splits)
    return [LexicalDict(i, w) for i, w in zip(ids, weights)]


# ------------------------------------------------------------------------------------------- embedder
def _check_settings_agree(model: Any, what: str, normalize_embeddings: Optional[bool],
                          pooling_method: Optional[str]) -> None:
    """Refuse ``normalize_embeddings``/``pooling_method`` that differ from a fixed model's config."""
    for name, wanted, actual in (
        ("normalize_embeddings", normalize_embeddings, model.config.normalize_embeddings),
        ("pooling_method", pooling_method, model.config.pooling),
    ):
        if wanted is not None and wanted != actual:
            raise ValueError(f"{name}={wanted!r} but {what} has {actual!r}: change the config or leave {name} unset")


def _resolve_device(devices: Any, model: Optional[M3Model]) -> torch.device:
    """First device of FlagEmbedding's ``devices`` argument; ``None``: the model's device, else CPU."""
    if devices is None:
        return next(model.parameters()).device if model is not None else torch.device("cpu")
    if isinstance(devices, (list, tuple)):
        if not devices:
            raise ValueError("devices is an empty list")
        if len(devices) > 1:
            logger.warning("M3Embedder runs on one device; using %s of %s", devices[0], devices)
        devices = devices[0]
    if isinstance(devices, int):
        devices = f"cuda:{devices}"
    return torch.device(devices)


def _to_host(t: Tensor, device: Optional[torch.device] = None) -> Tensor:
    """One copy of ``t`` on the host (or on ``device``), outside inference mode (a transfer is that copy)."""
    moved = t.to("cpu" if device is None else device)
    return moved if moved is not t else t.clone()


class M3Embedder:
    """Dense, lexical and ColBERT encoding with an :class:`~flagm3.M3Model` (``BGEM3FlagModel`` drop-in).

    Args (as ``BGEM3FlagModel``, same order):
        model_name_or_path: a local directory or hub id loaded with :meth:`M3Model.from_pretrained`
            (flagm3 checkpoints and the BGE-M3 layout), a directory written by ``flagm3 export --format
            onnx`` (run with onnxruntime), or an ``M3Model`` instance (then pass ``tokenizer``).
        normalize_embeddings, pooling_method: ``None`` keeps the checkpoint's setting; with a path they
            override it; with a model instance they must agree with its config.
        use_fp16, use_bf16: compute under ``torch.autocast``. As FlagEmbedding, fp16 is ignored on CPU
            (fp32 there); bf16 is honoured on CPU too. Outputs are float32 in every case.
        query_instruction_for_retrieval, query_instruction_format: prefix for ``encode_queries``.
        devices: a device (``"cuda:0"``, ``0``, ``"cpu"``) or a list whose first entry is used. Default:
            CPU, or the device of a given model instance.
        trust_remote_code, cache_dir: passed to the model and tokenizer loaders.
        colbert_dim: accepted for compatibility; must match the checkpoint's ColBERT size when set.
        batch_size, query_max_length, passage_max_length, return_dense, return_sparse,
            return_colbert_vecs: defaults of the encode methods.
        truncate_dim: keep the first ``truncate_dim`` dense/ColBERT dimensions (renormalised).
        tokenizer: the tokenizer (required with a model instance; loaded from the path otherwise).
        passage_instruction_for_retrieval, passage_instruction_format: prefix for ``encode_corpus``.
        compression: :class:`flagm3.compression.Compression`: dense/ColBERT dimensions (both sides; overrides
            ``truncate_dim``), ColBERT token pooling and sparse pruning (passages: ``encode_corpus``,
            ``iter_outputs(passage=True)``). Default: the one an ONNX export was written with, else none.
    """

    def __init__(
        self,
        model_name_or_path: Union[str, M3Model],
        normalize_embeddings: Optional[bool] = None,
        use_fp16: bool = True,
        use_bf16: bool = False,
        query_instruction_for_retrieval: Optional[str] = None,
        query_instruction_format: str = "{}{}",
        devices: Optional[Union[str, int, List[str], List[int]]] = None,
        pooling_method: Optional[str] = None,
        trust_remote_code: bool = False,
        cache_dir: Optional[str] = None,
        colbert_dim: int = -1,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        truncate_dim: Optional[int] = None,
        *,
        tokenizer: Any = None,
        passage_instruction_for_retrieval: Optional[str] = None,
        passage_instruction_format: str = "{}{}",
        convert_to_numpy: bool = True,
        compression: Optional[Compression] = None,
    ) -> None:
        if isinstance(model_name_or_path, M3Model):
            if tokenizer is None:
                raise ValueError("M3Embedder(model, tokenizer=...): a model instance needs its tokenizer")
            model = model_name_or_path
            _check_settings_agree(model, "the given model's config", normalize_embeddings, pooling_method)
            self.model_name_or_path = getattr(model.config, "_name_or_path", "")
        elif is_onnx_export(model_name_or_path):  # flagm3 export --format onnx: run with onnxruntime
            from .onnx_model import OnnxM3Model

            model = OnnxM3Model(str(model_name_or_path))
            _check_settings_agree(model, f"the ONNX graph in {model_name_or_path}", normalize_embeddings,
                                  pooling_method)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(str(model_name_or_path))
            self.model_name_or_path = str(model_name_or_path)
        else:
            path = resolve_checkpoint(str(model_name_or_path), {"cache_dir": cache_dir})
            overrides: Dict[str, Any] = {"trust_remote_code": trust_remote_code}
            if normalize_embeddings is not None:
                overrides["normalize_embeddings"] = normalize_embeddings
            if pooling_method is not None:
                overrides["pooling"] = pooling_method
            model = M3Model.from_pretrained(path, **overrides)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.model_name_or_path = str(model_name_or_path)
        check_tokenizer_fits(model, tokenizer, self.model_name_or_path or None)  # before an id fails mid-corpus
        if colbert_dim > 0 and colbert_dim != model.config.colbert_output_dim:
            raise ValueError(
                f"colbert_dim={colbert_dim} but the model's ColBERT head gives {model.config.colbert_output_dim}"
            )
        self.device = _resolve_device(devices, model if isinstance(model_name_or_path, M3Model) else None)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.normalize_embeddings = bool(model.config.normalize_embeddings)
        self.pooling_method = model.config.pooling
        self.use_fp16, self.use_bf16 = use_fp16, use_bf16
        self.query_instruction_for_retrieval = query_instruction_for_retrieval
        self.query_instruction_format = query_instruction_format
        self.passage_instruction_for_retrieval = passage_instruction_for_retrieval
        self.passage_instruction_format = passage_instruction_format
        self.batch_size = batch_size
        self.query_max_length, self.passage_max_length = query_max_length, passage_max_length
        self.return_dense, self.return_sparse = return_dense, return_sparse
        self.return_colbert_vecs = return_colbert_vecs
        self.truncate_dim = truncate_dim
        if compression is None:
            from .onnx_model import read_export_compression

            compression = read_export_compression(self.model_name_or_path) or Compression()
        self.compression = compression
        self.passage_stats = PassageStats()  # what the passages encoded so far would store in an index
        self.convert_to_numpy = convert_to_numpy  # the default of encode*: numpy arrays, or torch tensors
        # weights fitted by `flagm3 eval --fit-weights` (hybrid_weights.json beside the model), else None
        self.hybrid_weights = (None if isinstance(model_name_or_path, M3Model)
                               else read_hybrid_weights(self.model_name_or_path))

    # ------------------------------------------------------------------------------------ internals
    @property
    def compute_dtype(self) -> Optional[torch.dtype]:
        """Autocast dtype: bf16 when asked, fp16 when asked and not on CPU, else ``None`` (fp32)."""
        if self.use_bf16:
            return torch.bfloat16
        if self.use_fp16 and self.device.type != "cpu":
            return torch.float16
        return None

    @property
    def max_model_length(self) -> int:
        """Longest input the model takes: the tokenizer's limit, else the encoder's position table."""
        limit = getattr(self.tokenizer, "model_max_length", None)
        if limit is not None and limit < 1_000_000:
            return int(limit)
        backbone = self.model.config.backbone_config
        return int(getattr(backbone, "max_position_embeddings", 1_000_000))

    def _tokenize(self, texts: Sequence[str], max_length: int, **kwargs: Any) -> Dict[str, List[List[int]]]:
        """Truncated, unpadded token features: ``{"input_ids": [ids per text], "attention_mask": ..., ...}``."""
        features: Dict[str, List[List[int]]] = {}
        max_length = min(max_length, self.max_model_length)
        for start in range(0, len(texts), _TOKENIZE_CHUNK):
            enc = self.tokenizer(list(texts[start : start + _TOKENIZE_CHUNK]), truncation=True,
                                 max_length=max_length, **kwargs)
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                if key in enc:
                    features.setdefault(key, []).extend(enc[key])
        return features

    def _forward(self, features: Dict[str, List[List[int]]], indices: Sequence[int],
                 heads: Sequence[str], compression: Optional[Compression] = None,
                 on_device: bool = False) -> Dict[str, Tensor]:
        """Pad the texts ``indices`` of ``features``, run the model, return float32 head outputs on the host (on
        :attr:`device` with ``on_device``), ``compression`` (default: the embedder's dimensions only) applied."""
        compression = self.compression_for(passage=False) if compression is None else compression
        batch = self.tokenizer.pad({k: [v[i] for i in indices] for k, v in features.items()},
                                   padding=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        dtype = self.compute_dtype
        was_training = self.model.training
        self.model.eval()
        try:
            amp = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()
            with torch.inference_mode(), amp:
                out = self.model(**inputs, heads=heads)
        finally:
            self.model.train(was_training)
        # copied outside inference mode, once: callers get ordinary tensors (host, or the device with on_device)
        result: Dict[str, Tensor] = {}
        normalize = self.normalize_embeddings
        where = self.device if on_device else None
        if out.dense is not None:
            result["dense"] = _to_host(truncate(out.dense.float(), compression.dense_dim, normalize), where)
        if out.token_weights is not None:
            result["sparse_ids"] = _to_host(inputs["input_ids"], where)
            weights = prune_lexical(inputs["input_ids"], out.token_weights.float(), compression.sparse_top_k,
                                    compression.sparse_threshold)
            result["sparse_weights"] = _to_host(weights, where)
        if out.colbert is not None:
            vecs, mask = truncate(out.colbert.float(), compression.colbert_dim, normalize), out.colbert_mask
            if compression.pool_factor > 1:  # clustering runs on the host
                vecs, mask = pool_colbert_batch(vecs.cpu(), mask.cpu(), compression.pool_factor, normalize)
            result["colbert"], result["colbert_mask"] = _to_host(vecs, where), _to_host(mask, where)
        return result

    def compression_for(self, passage: bool) -> Compression:
        """The compression applied to passages (``passage``) or queries (its dimensions only); ``truncate_dim``
        sets the dimensions :attr:`compression` leaves unset."""
        compression = self.compression if passage else self.compression.dims_only()
        if self.truncate_dim is None:
            return compression
        return Compression(dense_dim=self.truncate_dim, colbert_dim=self.truncate_dim).replace(**compression.to_dict())

    def vector_sizes(self) -> Tuple[int, int]:
        """The dense and ColBERT sizes this embedder gives (after truncation)."""
        config, compression = self.model.config, self.compression_for(passage=False)
        return (min(compression.dense_dim or config.encoder_hidden_size, config.encoder_hidden_size),
                min(compression.colbert_dim or config.colbert_output_dim, config.colbert_output_dim))

    @staticmethod
    def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
        """Indices grouped into batches, longest texts first (stable for ties)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist()
        return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]

    # ------------------------------------------------------------------------------------ streaming
    def iter_outputs(
        self,
        texts: Sequence[str],
        max_length: int,
        batch_size: Optional[int] = None,
        heads: Sequence[str] = HEADS,
        show_progress: bool = True,
        passage: bool = False,
        compression: Optional[Compression] = None,
        on_device: bool = False,
        **tokenizer_kwargs: Any,
    ) -> Iterator[Tuple[List[int], Dict[str, Tensor]]]:
        """Encode ``texts`` in length-sorted batches (longest first within each window of ``_ENCODE_WINDOW``
        texts, which are tokenised together just before they are encoded), yielding ``(indices, outputs)``.

        ``compression`` (default: the embedder's, its dimensions only unless ``passage``) is applied: ColBERT
        vectors pooled (``colbert_mask`` then marks the pooled vectors), lexical weights pruned. Passages are
        counted in :attr:`passage_stats`.

        ``indices``: positions in ``texts`` of the ``b`` texts of the batch. ``outputs`` (CPU tensors, or
        tensors on :attr:`device` with ``on_device``: scoring then runs there; keys of the requested ``heads`` only): ``dense`` [b, H] float32; ``sparse_ids`` [b, L] int64 token ids and
        ``sparse_weights`` [b, L] float32 (zero at padding and ignored ids); ``colbert`` [b, L-1, D] float32
        (zero at padding) and ``colbert_mask`` [b, L-1] int64 (1 for real tokens after CLS).
        """
        unknown = set(heads) - set(HEADS)
        if unknown or not heads:
            raise ValueError(f"heads must be a non-empty subset of {HEADS}, got {tuple(heads)}")
        batch_size = batch_size or self.batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        window = max(_ENCODE_WINDOW, batch_size)
        if compression is None:
            compression = self.compression_for(passage)
        bar = tqdm(total=len(texts), desc="Inference Embeddings", unit="text",
                   disable=not show_progress or len(texts) <= batch_size)
        try:
            for start in range(0, len(texts), window):
                features = self._tokenize(texts[start : start + window], max_length, **tokenizer_kwargs)
                lengths = [len(ids) for ids in features.get("input_ids", [])]
                for indices in self._length_sorted_batches(lengths, batch_size):
                    out = self._forward(features, indices, tuple(heads), compression, on_device)
                    if passage:
                        self.passage_stats.update(out)
                    bar.update(len(indices))
                    yield [start + i for i in indices], out
        finally:
            bar.close()

    # ------------------------------------------------------------------------------------- encoding
    @staticmethod
    def _with_instruction(sentences: Union[str, List[str]], instruction: Optional[str],
                          instruction_format: str) -> Union[str, List[str]]:
        if isinstance(sentences, str):
            return format_instruction(sentences, instruction, instruction_format)
        return [format_instruction(s, instruction, instruction_format) for s in sentences]

    def encode(
        self,
        sentences: Union[List[str], str],
        batch_size: Optional[int] = None,
        max_length: Optional[int] = None,
        return_dense: Optional[bool] = None,
        return_sparse: Optional[bool] = None,
        return_colbert_vecs: Optional[bool] = None,
        instruction: Optional[str] = None,
        instruction_format: str = "{}{}",
        convert_to_numpy: Optional[bool] = None,
        show_progress: bool = True,
        dense_dim: Optional[int] = None,
        colbert_dim: Optional[int] = None,
        pool_factor: Optional[int] = None,
        sparse_top_k: Optional[int] = None,
        sparse_threshold: Optional[float] = None,
        passage: bool = False,
        **tokenizer_kwargs: Any,
    ) -> Dict[str, Any]:
        """Encode texts (passage length by default) as ``BGEM3FlagModel.encode``.

        Returns ``{"dense_vecs": [N, H] float32 array, "lexical_weights": [{str(token_id): weight}],
        "colbert_vecs": [[n_tokens - 1, D] arrays]}`` in input order (``None`` for outputs not asked for);
        a single string gives a single vector / dict / array. ``convert_to_numpy=False`` (default: the
        constructor's, ``True``) gives the dense and ColBERT vectors as CPU ``torch.Tensor`` s instead
        (FlagEmbedding's M3 model ignores the flag and always returns numpy).

        Compression (:mod:`flagm3.compression`): ``dense_dim``/``colbert_dim`` keep the first dimensions
        (renormalised), ``pool_factor`` pools ColBERT token vectors, ``sparse_top_k``/``sparse_threshold`` prune
        lexical weights; unset, the embedder's ``compression`` applies (its dimensions only unless ``passage``,
        which ``encode_corpus`` sets).
        """
        convert_to_numpy = self.convert_to_numpy if convert_to_numpy is None else convert_to_numpy
        compression = self.compression_for(passage).replace(
            dense_dim=dense_dim, colbert_dim=colbert_dim, pool_factor=pool_factor, sparse_top_k=sparse_top_k,
            sparse_threshold=sparse_threshold)
        batch_size = batch_size or self.batch_size
        max_length = max_length or self.passage_max_length
        want = {
            "dense": self.return_dense if return_dense is None else return_dense,
            "sparse": self.return_sparse if return_sparse is None else return_sparse,
            "colbert": self.return_colbert_vecs if return_colbert_vecs is None else return_colbert_vecs,
        }
        heads = tuple(h for h in HEADS if want[h])
        if not heads:
            raise ValueError("choose at least one of return_dense, return_sparse, return_colbert_vecs")
        sentences = self._with_instruction(sentences, instruction, instruction_format)
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        n = len(texts)
        hidden = self.model.config.encoder_hidden_size
        dim = min(compression.dense_dim or hidden, hidden)
        dense = np.zeros((n, dim), dtype=np.float32) if want["dense"] else None
        lexical: Optional[List[Any]] = [None] * n if want["sparse"] else None
        colbert: Optional[List[Any]] = [None] * n if want["colbert"] else None
        for indices, out in self.iter_outputs(texts, max_length, batch_size, heads,
                                              show_progress=show_progress and n >= batch_size,
                                              passage=passage, compression=compression, **tokenizer_kwargs):
            if dense is not None:
                dense[indices] = out["dense"].numpy()
            if lexical is not None:
                for i, lw in zip(indices, _lexical_dicts(pool_lexical(out["sparse_ids"], out["sparse_weights"]))):
                    lexical[i] = lw
            if colbert is not None:
                vecs, lengths = out["colbert"].numpy(), out["colbert_mask"].sum(1).tolist()
                for row, (i, length) in enumerate(zip(indices, lengths)):
                    colbert[i] = vecs[row, :length].copy()
        if not convert_to_numpy:
            dense = None if dense is None else torch.from_numpy(dense)
            colbert = None if colbert is None else [torch.from_numpy(v) for v in colbert]
        result = {"dense_vecs": dense, "lexical_weights": lexical, "colbert_vecs": colbert}
        if single:
            result = {k: None if v is None else v[0] for k, v in result.items()}
        return result

    def encode_queries(
        self,
        queries: Union[List[str], str],
        batch_size: Optional[int] = None,
        max_length: Optional[int] = None,
        return_dense: Optional[bool] = None,
        return_sparse: Optional[bool] = None,
        return_colbert_vecs: Optional[bool] = None,
        **kwargs: Any,
    ) -> Dict[str, Any]:
        """:meth:`encode` at ``query_max_length`` with the query instruction (queries are never pooled)."""
        if (kwargs.get("pool_factor") or 1) > 1:
            raise ValueError("encode_queries: queries are never pooled (pool_factor applies to passages)")
        return self.encode(queries, batch_size, max_length or self.query_max_length, return_dense, return_sparse,
                           return_colbert_vecs, instruction=self.query_instruction_for_retrieval,
                           instruction_format=self.query_instruction_format, **kwargs)

    def encode_corpus(
        self,
        corpus: Union[List[str], str],
        batch_size: Optional[int] = None,
        max_length: Optional[int] = None,
        return_dense: Optional[bool] = None,
        return_sparse: Optional[bool] = None,
        return_colbert_vecs: Optional[bool] = None,
        **kwargs: Any,
    ) -> Dict[str, Any]:
        """:meth:`encode` at ``passage_max_length`` with the passage instruction and the passage compression."""
        return self.encode(corpus, batch_size, max_length or self.passage_max_length, return_dense, return_sparse,
                           return_colbert_vecs, instruction=self.passage_instruction_for_retrieval,
                           instruction_format=self.passage_instruction_format, passage=True, **kwargs)

    # -------------------------------------------------------------------------------------- scoring
    def convert_id_to_token(self, lexical_weights: Union[LexicalWeights, List[LexicalWeights]]) -> Any:
        """Replace token ids by decoded tokens: a dict gives a dict, a list gives a list."""
        single = isinstance(lexical_weights, Mapping)
        items = [lexical_weights] if single else lexical_weights
        converted = [{self.tokenizer.decode([int(i)]): w for i, w in item.items()} for item in items]
        return converted[0] if single else converted

    def compute_lexical_matching_score(
        self,
        lexical_weights_1: Union[LexicalWeights, List[LexicalWeights]],
        lexical_weights_2: Union[LexicalWeights, List[LexicalWeights]],
    ) -> Union[float, np.ndarray]:
        """Lexical score of two dicts (a float) or of two lists of dicts (``[len1, len2]`` array)."""
        if isinstance(lexical_weights_1, Mapping) and isinstance(lexical_weights_2, Mapping):
            return float(compute_lexical_matching_scores([lexical_weights_1], [lexical_weights_2])[0, 0])
        if isinstance(lexical_weights_1, list) and isinstance(lexical_weights_2, list):
            return compute_lexical_matching_scores(lexical_weights_1, lexical_weights_2)
        raise ValueError("The input format of lexical_weights is not correct: give two dicts or two lists of dicts.")

    def colbert_score(self, q_reps: Union[np.ndarray, Tensor], p_reps: Union[np.ndarray, Tensor]) -> Tensor:
        """ColBERT score of one query ``[Lq, D]`` and one passage ``[Lp, D]`` (0-dim tensor)."""
        q, p = torch.as_tensor(q_reps), torch.as_tensor(p_reps)
        q_mask, p_mask = q.new_ones(1, q.shape[0]), p.new_ones(1, p.shape[0])
        return colbert_scores(q[None], q_mask, p[None], p_mask)[0, 0]

    def compute_score(
        self,
        sentence_pairs: Union[List[Tuple[str, str]], Tuple[str, str]],
        batch_size: Optional[int] = None,
        max_query_length: Optional[int] = None,
        max_passage_length: Optional[int] = None,
        weights_for_different_modes: Optional[List[float]] = None,
        show_progress: bool = True,
        **tokenizer_kwargs: Any,
    ) -> Union[Dict[str, List[float]], Dict[str, float], List]:
        """Scores of ``(query, passage)`` pairs: ``dense``, ``sparse``, ``colbert`` and the weighted means
        ``sparse+dense = (w0 d + w1 s) / (w0 + w1)``, ``colbert+sparse+dense = (w0 d + w1 s + w2 c) / sum(w)``
        with ``weights_for_different_modes = [w0, w1, w2]`` (default: the model's fitted
        :attr:`hybrid_weights` when it has them, else :data:`flagm3.defaults.COMPUTE_SCORE_WEIGHTS`, 1 : 1 : 1
        as FlagEmbedding's ``compute_score``, so that it stays a drop-in). Ranking (``flagm3 eval``,
        ``flagm3 search``, the evaluator, mining) uses BGE-M3's 1 : 0.3 : 1 instead
        (:data:`flagm3.defaults.BGE_M3_ENSEMBLE_WEIGHTS`): pass ``weights_for_different_modes=[1, 0.3, 1]`` to
        score pairs as they rank.

        Unlike ``BGEM3FlagModel.compute_score``, passage padding never takes part in ColBERT's MaxSim, so a
        pair's score does not depend on the other pairs of its batch (it equals :meth:`colbert_score`).
        """
        if isinstance(sentence_pairs, list) and not sentence_pairs:
            return []
        single = isinstance(sentence_pairs[0], str)
        pairs = [sentence_pairs] if single else list(sentence_pairs)
        if weights_for_different_modes is None:
            fitted = self.hybrid_weights
            weights = [(COMPUTE_SCORE_WEIGHTS if fitted is None else fitted)[h] for h in HEADS]
        else:
            weights = list(weights_for_different_modes)
        if len(weights) != 3:
            raise ValueError(f"weights_for_different_modes needs 3 weights (dense, sparse, colbert), got {weights}")
        q_feats = self._tokenize([p[0] for p in pairs], max_query_length or self.query_max_length,
                                 **tokenizer_kwargs)
        p_feats = self._tokenize([p[1] for p in pairs], max_passage_length or self.passage_max_length,
                                 **tokenizer_kwargs)
        batches = self._length_sorted_batches([len(x) for x in p_feats["input_ids"]], batch_size or self.batch_size)
        scores = {h: torch.zeros(len(pairs), dtype=torch.float32) for h in HEADS}
        for indices in tqdm(batches, desc="Compute Scores", disable=not show_progress or len(batches) <= 1):
            q, p = self._forward(q_feats, indices, HEADS), self._forward(p_feats, indices, HEADS)
            idx = torch.tensor(indices)
            scores["dense"][idx] = dense_scores_paired(q["dense"], p["dense"])
            scores["sparse"][idx] = sparse_scores_paired(
                q["sparse_ids"], q["sparse_weights"], p["sparse_ids"], p["sparse_weights"]
            )
            scores["colbert"][idx] = colbert_scores_paired(q["colbert"], q["colbert_mask"], p["colbert"],
                                                           p["colbert_mask"])
        named = dict(zip(HEADS, weights))
        result = {
            "colbert": scores["colbert"],
            "sparse": scores["sparse"],
            "dense": scores["dense"],
            "sparse+dense": _weighted_mean(scores, {k: named[k] for k in ("dense", "sparse")}),
            "colbert+sparse+dense": _weighted_mean(scores, named),
        }
        lists = {k: v.tolist() for k, v in result.items()}
        return {k: v[0] for k, v in lists.items()} if single else lists


def _weighted_mean(scores: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """:func:`hybrid_scores` normalised by the weights; NaN (as FlagEmbedding's 0/0) when all weights are 0."""
    if all(w == 0 for w in weights.values()):
        return torch.full_like(next(iter(scores.values())), float("nan"))
    return hybrid_scores(scores, weights, normalize=True)


BGEM3FlagModel = M3Embedder  # FlagEmbedding's name, for drop-in use
