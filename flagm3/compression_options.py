"""Command-line options of encode-time compression (:mod:`flagm3.compression`) for ``flagm3 eval``, ``index``,
``search`` and ``export``; imports nothing heavy until the options are turned into a ``Compression``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .compression import Compression

QUANTIZATIONS = ("binary", "int8")  # Qdrant's quantisation of the dense and ColBERT vectors (flagm3.qdrant)


def add_arguments(parser: Any, passage: bool = True, quantization: bool = False) -> None:
    """Add ``--dense-dim`` and ``--colbert-dim`` (and with ``passage`` ``--pool-factor``, ``--sparse-top-k``,
    ``--sparse-threshold``; with ``quantization`` ``--quantization``) to an argparse parser."""
    group = parser.add_argument_group("smaller vectors (flagm3.compression)")
    group.add_argument("--dense-dim", type=int, help="Keep the first D dense dimensions (renormalised; train with "
                       "Matryoshka, flagm3 train's mrl_dims, for quality at small D).")
    group.add_argument("--colbert-dim", type=int, help="Keep the first D ColBERT dimensions (renormalised).")
    if passage:
        group.add_argument("--pool-factor", type=int, help="Pool each passage's ColBERT token vectors by "
                           "hierarchical clustering into n/F vectors (queries are never pooled).")
        group.add_argument("--sparse-top-k", type=int, help="Keep each passage's K highest-weighted tokens.")
        group.add_argument("--sparse-threshold", type=float, help="Drop passage tokens weighted below this.")
    if quantization:
        group.add_argument("--quantization", choices=QUANTIZATIONS,
                           help="Qdrant quantisation of the dense and ColBERT vectors (originals kept for rescoring).")


def from_arguments(args: Any) -> Compression:
    """The :class:`Compression` of parsed :func:`add_arguments` options (absent ones: unset)."""
    from .compression import Compression

    get = lambda name: getattr(args, name, None)  # noqa: E731
    return Compression(dense_dim=get("dense_dim"), colbert_dim=get("colbert_dim"),
                       pool_factor=get("pool_factor") or 1, sparse_top_k=get("sparse_top_k"),
                       sparse_threshold=get("sparse_threshold"))
