"""The evaluator ``M3Trainer`` calls during training: retrieval metrics of the model being trained."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

from ..modeling_m3 import unwrap_m3
from ..scoring import HEADS
from .beir import load_beir, subsample
from .metrics import METRICS, flatten_results
from .retrieval import DEFAULT_HYBRID_WEIGHTS, check_rankings, evaluate_retrieval


class M3RetrievalEvaluator:
    """Retrieval metrics of a model under training, for ``M3Trainer``: ``evaluator(model, tokenizer)``.

    It follows sentence-transformers' ``SentenceEvaluator`` contract: metrics are named after the evaluator
    (``"<name>_<ranking>_<metric>"``, or ``"<ranking>_<metric>"`` without a ``name``: ``"dense_ndcg@10"``,
    ``"all_ndcg@10"``, ...), ``primary_metric`` is the (named) key to select checkpoints on and
    ``greater_is_better`` says which way is better; ``M3Trainer`` logs the metrics with the ``eval_`` prefix
    and sets ``metric_for_best_model="eval_<primary_metric>"`` and ``greater_is_better`` from them. Give
    ``data_dir`` (BEIR layout, ``split``) or ``corpus``/``queries``/``qrels``; ``max_corpus_size``/``max_queries``
    evaluate on a seeded subset (all judged documents kept). ``primary_metric`` (``main_metric`` is its old
    name; unprefixed) defaults to ``"all_ndcg@10"``, or the nDCG of the widest ranking computed. ``model`` may be wrapped
    (DDP ``.module``, PEFT ``get_base_model()``); it is encoded in eval mode (fp32 unless
    ``use_fp16``/``use_bf16``: autocast, weights untouched) and its previous train/eval mode is restored.
    """

    def __init__(
        self,
        data_dir: Optional[Union[str, os.PathLike]] = None,
        split: str = "dev",
        corpus: Optional[Mapping[str, str]] = None,
        queries: Optional[Mapping[str, str]] = None,
        qrels: Optional[Mapping[str, Mapping[str, int]]] = None,
        heads: Sequence[str] = HEADS,
        hybrids: Optional[Sequence[str]] = None,
        hybrid_weights: Union[Sequence[float], Mapping[str, float]] = DEFAULT_HYBRID_WEIGHTS,
        k_values: Sequence[int] = (1, 10, 100),
        metrics: Sequence[str] = METRICS,
        max_query_length: int = 512,
        max_passage_length: int = 512,
        batch_size: int = 32,
        main_metric: Optional[str] = None,
        name: str = "",
        max_corpus_size: Optional[int] = None,
        max_queries: Optional[int] = None,
        seed: int = 0,
        colbert_mode: str = "full",
        rerank_depth: int = 100,
        query_instruction_for_retrieval: Optional[str] = None,
        query_instruction_format: str = "{}{}",
        use_fp16: bool = False,
        use_bf16: bool = False,
        show_progress: bool = False,
    ) -> None:
        if data_dir is not None:
            if corpus is not None or queries is not None or qrels is not None:
                raise ValueError("give either data_dir or corpus/queries/qrels, not both")
            corpus, queries, qrels = load_beir(data_dir, split)
        elif corpus is None or queries is None or qrels is None:
            raise ValueError("M3RetrievalEvaluator needs data_dir, or all of corpus, queries and qrels")
        subset = subsample(corpus, queries, qrels, max_corpus_size, max_queries, seed)
        self.corpus, self.queries, self.qrels = subset
        self.heads, self.hybrids = check_rankings(heads, hybrids)
        k_values = sorted(set(k_values))
        self.keys = [f"{r}_{m}@{k}" for r in self.heads + self.hybrids for m in metrics for k in k_values]
        if main_metric is None:  # nDCG@10 of the widest hybrid computed, else of the first head
            ranking = self.hybrids[-1] if self.hybrids else self.heads[0]
            main_metric = f"{ranking}_{metrics[0]}@{10 if 10 in k_values else k_values[-1]}"
        if main_metric not in self.keys:
            raise ValueError(f"main_metric {main_metric!r} is not among the evaluator's keys {self.keys}")
        self.main_metric = main_metric
        self.name = name
        self.greater_is_better = True  # every metric here (nDCG, recall, MRR, MAP) is better when higher
        self.options = dict(
            heads=self.heads, hybrids=self.hybrids, hybrid_weights=hybrid_weights, k_values=tuple(k_values),
            metrics=tuple(metrics), max_query_length=max_query_length, max_passage_length=max_passage_length,
            batch_size=batch_size, colbert_mode=colbert_mode, rerank_depth=rerank_depth,
            show_progress=show_progress,
        )
        self.embedder_options = dict(
            batch_size=batch_size, use_fp16=use_fp16, use_bf16=use_bf16,
            query_instruction_for_retrieval=query_instruction_for_retrieval,
            query_instruction_format=query_instruction_format,
        )

    @property
    def primary_metric(self) -> str:
        """The key (named after the evaluator) that selects the best checkpoint."""
        return self.prefix_name(self.main_metric)

    def prefix_name(self, key: str) -> str:
        """``key`` named after the evaluator (``"<name>_<key>"``; unchanged without a ``name``)."""
        return f"{self.name}_{key}" if self.name else key

    @classmethod
    def from_beir(
        cls, data_dir: Union[str, os.PathLike], split: str = "dev", **kwargs: Any
    ) -> M3RetrievalEvaluator:
        """An evaluator on the ``split`` of a BEIR-layout directory (other arguments as the constructor)."""
        return cls(data_dir=data_dir, split=split, **kwargs)

    def __call__(self, model: Any, tokenizer: Any) -> dict[str, float]:
        from ..inference import M3Embedder

        outer = model
        was_training = outer.training
        outer.eval()
        try:
            embedder = M3Embedder(unwrap_m3(model), tokenizer=tokenizer, **self.embedder_options)
            results = evaluate_retrieval(embedder, self.corpus, self.queries, self.qrels, **self.options)
        finally:
            outer.train(was_training)
        return {self.prefix_name(k): v for k, v in flatten_results(results).items()}

