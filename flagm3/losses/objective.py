"""The M3 training objective: InfoNCE per head, an ensemble head, self-knowledge distillation, teacher scores.

Scores come from :mod:`flagm3.scoring`; this module only turns them into losses. Shapes: ``B`` local queries,
``G`` passages per query (positive first), ``P`` passages scored against (``B*G``, or ``W*B*G`` with
negatives gathered from ``W`` processes).

The ``bge-m3`` preset reproduces FlagEmbedding 1.4.2's M3 loss on one process (tests/test_parity_loss.py:
loss and every term within 1e-6). Where the two differ, on purpose:

- ColBERT MaxSim ignores passage padding; FlagEmbedding lets zero pad vectors into the max (similarity 0),
  which changes a score only when a query token's best real match is negative.
- Without in-batch negatives FlagEmbedding 1.4.2 scores the ensemble as a [B, 1] matrix (its loss is 0) and
  broadcasts that column as the self-distillation target; here the ensemble is scored over each group.
- ``step`` is the trainer's optimizer step; FlagEmbedding counts forward passes (micro-batches), which
  differs for ``self_distill_start_step >= 0`` with gradient accumulation.
- With negatives gathered across processes every head scores the gathered passages; FlagEmbedding gathers
  for the dense head only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compression import pool_colbert_batch
from ..modeling_m3 import M3Output
from ..scoring import (
    BGE_M3_ENSEMBLE_WEIGHTS,
    HEADS,
    colbert_scores,
    colbert_scores_paired,
    dense_scores,
    dense_scores_paired,
    hybrid_scores,
    sparse_scores,
    sparse_scores_paired,
)
from .false_negatives import mask_logits, near_duplicate_mask
from .flops import flops_penalty
from .matryoshka import matryoshka_terms

# Per head: its all-pairs score [Q, P], its paired score [N] (flagm3.scoring), and the score's inputs from one
# side's outputs and input ids.
HEAD_SCORES = {
    "dense": (dense_scores, dense_scores_paired, lambda out, ids: (out.dense,)),
    "sparse": (sparse_scores, sparse_scores_paired, lambda out, ids: (ids, out.sparse)),
    "colbert": (colbert_scores, colbert_scores_paired, lambda out, ids: (out.colbert, out.colbert_mask)),
}


# ------------------------------------------------------------------------------------- loss functions
def info_nce(logits: Tensor, positive_index: Tensor) -> Tensor:
    """Cross entropy of the positive among all scored passages. ``logits`` [B, P], ``positive_index`` [B]."""
    return F.cross_entropy(logits, positive_index)


def kl_distill(teacher_probs: Tensor, student_logits: Tensor) -> Tensor:
    """``-mean_b sum_j t[b, j] log softmax(s)[b, j]`` (BGE-M3's ``kl_div``: cross entropy to soft targets)."""
    return -(torch.log_softmax(student_logits, dim=-1) * teacher_probs).sum(-1).mean()


def m3_kd_loss(teacher_probs: Tensor, logits: Tensor, positive_index: Tensor) -> Tensor:
    """BGE-M3's ``m3_kd_loss``: for each group member i, InfoNCE of passage i against the passages that are not
    earlier group members, weighted by the teacher's probability of i.

    ``teacher_probs`` [B, G], ``logits`` [B, P], ``positive_index`` [B] (column of each group's first passage).
    """
    mask = torch.zeros_like(logits)
    loss = logits.new_zeros(())
    for i in range(teacher_probs.shape[1]):
        target = positive_index + i
        per_query = F.cross_entropy(logits + mask, target, reduction="none")
        loss = loss + (teacher_probs[:, i] * per_query).mean()
        mask = mask.scatter(1, target.unsqueeze(1), torch.finfo(logits.dtype).min)
    return loss


def group_logits(logits: Tensor, positive_index: Tensor, group_size: int) -> Tensor:
    """Each query's scores over its own group. [B, P] -> [B, G]."""
    cols = positive_index.unsqueeze(1) + torch.arange(group_size, device=logits.device)
    return logits.gather(1, cols)


# ------------------------------------------------------------------------------------------- config
# Temperature of the sparse head's own term in the flagm3 recipe (the best of 0.01-0.2 measured in
# docs/heads-and-loss.md, "Training the sparse head"; the other heads keep ``temperature``).
RECIPE_SPARSE_TEMPERATURE = 0.05


@dataclass
class M3LossConfig:
    """Everything that defines the objective; :meth:`preset` gives the named recipes.

    The loss is ``mean_t(w_t * L_t)`` over the contrastive terms t with a non-zero weight ``w_t`` (each head
    and, with more than one head, the ensemble); once self-distillation is on (``use_self_distill``, more than
    one head, ``step > self_distill_start_step``) it becomes the mean of that and
    ``mean_h(v_h * KL(softmax(ensemble) || head_h))`` over the heads with a non-zero ``v_h``. A term with
    weight 0 is neither computed nor counted; a head in no term is not computed at all.
    """

    heads: Sequence[str] = HEADS
    temperature: float = 0.02
    head_temperatures: Dict[str, float] = field(default_factory=dict)  # overrides per head
    head_weights: Dict[str, float] = field(
        default_factory=lambda: {"dense": 1.0, "sparse": 0.1, "colbert": 1.0, "ensemble": 1.0}
    )
    ensemble_weights: Dict[str, float] = field(default_factory=lambda: dict(BGE_M3_ENSEMBLE_WEIGHTS))
    use_self_distill: bool = True
    self_distill_start_step: int = -1
    self_distill_weights: Dict[str, float] = field(
        default_factory=lambda: {"dense": 1.0, "sparse": 0.1, "colbert": 1.0}
    )
    kd_loss_type: str = "kl_div"
    # teacher scores (pos_scores/neg_scores) become softmax(scores / teacher_temperature); 1 suits reranker logits
    teacher_temperature: float = 1.0
    # --- sparse-head levers (docs/heads-and-loss.md, "Training the sparse head")
    # the sparse head reads detached hidden states: no loss term moves the encoder through the sparse head
    sparse_stop_gradient: bool = False
    # False: the sparse head's own InfoNCE leaves out each query's own hard negatives (in-batch negatives only)
    sparse_hard_negatives: bool = True
    # weight of ||theta - theta_0||^2 / ||theta_0||^2, the sparse head's distance to its initial (IDF-fitted) fit
    sparse_anchor_weight: float = 0.0
    # in-batch passages at least this cosine-similar (dense) to a query's positive are masked (None: off)
    false_negative_threshold: Optional[float] = None
    # --- smaller vectors (flagm3.losses.matryoshka, flagm3.losses.flops)
    # Matryoshka: dense/ColBERT InfoNCE also on these leading dimensions (each capped at the head's size)
    mrl_dims: Sequence[int] = ()
    mrl_weights: Sequence[float] = ()  # one per mrl_dims entry (empty: all 1)
    normalize_compressed: bool = True  # renormalise truncated/pooled vectors (as the model normalises its own)
    # pooling-aware training: every ColBERT score of passages on their token vectors pooled by this factor
    colbert_pool_factor: int = 1
    # FLOPS regulariser on the passages' sparse weights, applied while their mean active tokens > target
    sparse_flops_weight: float = 0.0
    sparse_flops_target: Optional[float] = None

    @classmethod
    def preset(cls, name: str, **overrides) -> M3LossConfig:
        """``bge-m3``: FlagEmbedding 1.4.2's published objective. ``flagm3``: our measured default recipe
        (docs/heads-and-loss.md, "Training the sparse head"): dense, ColBERT and the ensemble as in ``bge-m3``; the
        sparse head trained by its own InfoNCE term only, on in-batch negatives (``sparse_hard_negatives`` off:
        BM25-mined hard negatives share the query's terms by construction and teach it to shrink), on detached
        hidden states (``sparse_stop_gradient``: its term never moves the encoder), at its own temperature
        (``RECIPE_SPARSE_TEMPERATURE``), and out of the ensemble and of self-distillation (their targets rank the
        lexical look-alikes last, which drove it towards zero).
        """
        if name == "bge-m3":
            config = cls()
        elif name == "flagm3":
            config = cls(
                head_temperatures={"sparse": RECIPE_SPARSE_TEMPERATURE},
                head_weights={"dense": 1.0, "sparse": 0.1, "colbert": 1.0, "ensemble": 1.0},
                ensemble_weights={"dense": 1.0, "sparse": 0.0, "colbert": 1.0},
                self_distill_weights={"dense": 1.0, "sparse": 0.0, "colbert": 1.0},
                sparse_stop_gradient=True,
                sparse_hard_negatives=False,
            )
        else:
            raise ValueError(f"unknown loss preset {name!r}; choose 'bge-m3' or 'flagm3'")
        for key, value in overrides.items():
            if value is not None:
                setattr(config, key, value)
        config.validate()
        return config

    def validate(self) -> None:
        unknown = set(self.heads) - set(HEADS)
        if unknown or not self.heads:
            raise ValueError(f"heads must be a non-empty subset of {HEADS}, got {list(self.heads)}")
        if self.kd_loss_type not in ("kl_div", "m3_kd_loss"):
            raise ValueError(f"kd_loss_type must be 'kl_div' or 'm3_kd_loss', got {self.kd_loss_type!r}")
        if self.temperature <= 0 or any(t <= 0 for t in self.head_temperatures.values()):
            raise ValueError("temperatures must be positive")
        if self.teacher_temperature <= 0:
            raise ValueError(f"teacher_temperature must be positive, got {self.teacher_temperature}")
        if self.false_negative_threshold is not None and not -1 <= self.false_negative_threshold <= 1:
            raise ValueError(f"false_negative_threshold is a cosine similarity in [-1, 1], got "
                             f"{self.false_negative_threshold}")
        if self.false_negative_threshold is not None and "dense" not in self.heads:
            raise ValueError("false_negative_threshold finds near-duplicates with the dense head: add it to heads")
        if self.sparse_anchor_weight < 0:
            raise ValueError(f"sparse_anchor_weight must be >= 0, got {self.sparse_anchor_weight}")
        if any(int(d) < 1 for d in self.mrl_dims):
            raise ValueError(f"mrl_dims must be positive, got {list(self.mrl_dims)}")
        if self.mrl_weights and len(self.mrl_weights) != len(self.mrl_dims):
            raise ValueError(f"mrl_weights needs one weight per mrl_dims entry: {len(self.mrl_weights)} weights for "
                             f"mrl_dims {list(self.mrl_dims)}")
        if int(self.colbert_pool_factor) < 1:
            raise ValueError(f"colbert_pool_factor must be >= 1, got {self.colbert_pool_factor}")
        if self.sparse_flops_weight < 0:
            raise ValueError(f"sparse_flops_weight must be >= 0, got {self.sparse_flops_weight}")
        if not self.contrastive_terms() and not self.distilled_heads():
            raise ValueError(f"every loss term has weight 0: head_weights={self.head_weights}, "
                             f"self-distillation {'on' if self.use_self_distill else 'off'}")
        if not self.contrastive_terms() and self.self_distill_start_step >= 0:
            raise ValueError(f"every contrastive weight is 0 (head_weights={self.head_weights}) and self-distillation "
                             f"starts only after step {self.self_distill_start_step}: steps 0-"
                             f"{self.self_distill_start_step} would have no loss term; give a head a weight or set "
                             "self_distill_start_step -1")

    def mrl_weight(self, dim: int) -> float:
        """Weight of the nested term at ``dim`` dimensions: that of the smallest ``mrl_dims`` entry >= ``dim`` (the
        entry itself, or one capped to a smaller head); 1 when ``mrl_weights`` is empty."""
        if not self.mrl_weights:
            return 1.0
        return float(min((int(d), w) for d, w in zip(self.mrl_dims, self.mrl_weights) if int(d) >= dim)[1])

    def head_temperature(self, head: str) -> float:
        return self.head_temperatures.get(head, self.temperature)

    def head_weight(self, term: str) -> float:
        """Weight of a contrastive term (a head or ``ensemble``); heads default to 1, the ensemble to 0."""
        return self.head_weights.get(term, 0.0 if term == "ensemble" else 1.0)

    def ensemble_members(self) -> dict[str, float]:
        """The heads in the ensemble score, with their non-zero weights (empty with a single head)."""
        if len(self.heads) < 2:
            return {}
        return {h: w for h in HEADS if h in self.heads and (w := self.ensemble_weights.get(h, 0)) != 0}

    def distills(self, step: int) -> bool:
        """Whether self-distillation (towards the ensemble's scores) is on at optimizer step ``step``."""
        return self.use_self_distill and bool(self.ensemble_members()) and step > self.self_distill_start_step

    def distilled_heads(self) -> tuple[str, ...]:
        """Heads with a self-distillation term (non-zero weight) when self-distillation is on."""
        if not (self.use_self_distill and self.ensemble_members()):
            return ()
        return tuple(h for h in HEADS if h in self.heads and self.self_distill_weights.get(h, 1.0) != 0)

    def contrastive_terms(self) -> tuple[str, ...]:
        """Heads and ``ensemble`` with an InfoNCE term of non-zero weight."""
        terms = tuple(h for h in HEADS if h in self.heads and self.head_weight(h) != 0)
        if self.ensemble_members() and self.head_weight("ensemble") != 0:
            terms += ("ensemble",)
        return terms

    def computed_heads(self) -> tuple[str, ...]:
        """Heads whose scores some term needs (the others are not scored)."""
        needed = {t for t in self.contrastive_terms() if t != "ensemble"} | set(self.distilled_heads())
        if "ensemble" in self.contrastive_terms() or self.distilled_heads():
            needed |= set(self.ensemble_members())
        return tuple(h for h in HEADS if h in needed)

    def trains(self, head: str) -> bool:
        """Whether any loss term gives ``head`` a gradient (its own term, the ensemble, self-distillation; the
        ensemble's scores are a detached target in self-distillation)."""
        in_ensemble = "ensemble" in self.contrastive_terms() and head in self.ensemble_members()
        return head in self.contrastive_terms() or in_ensemble or head in self.distilled_heads()


@dataclass
class M3LossOutput:
    """``loss``: scalar; ``logs``: detached scalar tensors (``loss_<term>``, ``self_distill_<head>``, ``loss``),
    read on the host only when logged; ``logits``: [B, P] (or [B, G]) scores per head and ``ensemble``."""

    loss: Tensor
    logs: Dict[str, Tensor]
    logits: Dict[str, Tensor]
    stats: Dict[str, Tensor] = field(default_factory=dict)  # detached 0-d tensors (sparse_health); no host sync


def sparse_health(weights: Tensor) -> Dict[str, Tensor]:
    """Health of lexical token weights ``[N, L]`` (0 at padding and ignored ids), as detached 0-d tensors:
    ``active`` (mean number of tokens with a positive weight per text), ``zero`` (share of texts with none) and
    ``weight`` (mean weight of the active tokens)."""
    weights = weights.detach()
    active = (weights > 0).sum(1).float()
    return {
        "active": active.mean(),
        "zero": (active == 0).float().mean(),
        "weight": weights.sum() / active.sum().clamp(min=1),
    }


def own_negatives_mask(logits: Tensor, positive_index: Tensor, group_size: int) -> Tensor:
    """``logits`` [B, P] with each query's own group negatives (columns ``pos(b)+1 .. pos(b)+G-1``) at the
    dtype's minimum: InfoNCE against the positive and the other queries' passages only."""
    cols = torch.arange(logits.shape[1], device=logits.device)
    offset = cols.unsqueeze(0) - positive_index.unsqueeze(1)
    own = (offset > 0) & (offset < group_size)
    return logits.masked_fill(own, torch.finfo(logits.dtype).min)


# --------------------------------------------------------------------------------------------- module
class M3Loss(nn.Module):
    """The unified M3 loss as a module; ``get_config_dict()`` goes into the model card."""

    def __init__(self, config: Optional[M3LossConfig] = None) -> None:
        super().__init__()
        self.config = config or M3LossConfig()
        self.config.validate()

    @property
    def heads(self) -> tuple[str, ...]:
        """The heads the model computes for this loss: those in some term with a non-zero weight, and the sparse
        head whenever it is configured (its health statistics are logged even while no term trains it; its
        outputs cost one ``Linear(H, 1)``, its scores are what a term would cost and are skipped)."""
        computed = set(self.config.computed_heads()) | ({"sparse"} & set(self.config.heads))
        if self.config.false_negative_threshold is not None:  # near-duplicates are found with dense vectors
            computed.add("dense")
        return tuple(h for h in HEADS if h in computed)

    def get_config_dict(self) -> dict:
        return asdict(self.config)

    # ----------------------------------------------------------------------------------- scores
    def head_logits(
        self, head: str, q: M3Output, q_ids: Tensor, p: M3Output, p_ids: Tensor, group_size: Optional[int]
    ) -> Tensor:
        """Scores of local queries against passages, divided by the head's temperature.

        ``group_size=None``: all pairs, [B, P]. Otherwise each query only against its own group, [B, G].
        """
        all_pairs, paired, inputs = HEAD_SCORES[head]
        q_in, p_in = inputs(q, q_ids), inputs(p, p_ids)
        if group_size is None:
            scores = all_pairs(*q_in, *p_in)
        else:
            scores = paired(*(t.repeat_interleave(group_size, dim=0) for t in q_in), *p_in).view(-1, group_size)
        return scores / self.config.head_temperature(head)

    def contrastive(
        self, logits: Tensor, positive_index: Tensor, group_size: int, teacher_probs: Optional[Tensor]
    ) -> Tensor:
        """InfoNCE, with teacher-score distillation when teacher probabilities are given (BGE-M3 semantics)."""
        if teacher_probs is None:
            return info_nce(logits, positive_index)
        if self.config.kd_loss_type == "m3_kd_loss":
            return m3_kd_loss(teacher_probs, logits, positive_index)
        student = group_logits(logits, positive_index, group_size)
        return kl_distill(teacher_probs, student) + info_nce(logits, positive_index)

    # ---------------------------------------------------------------------------------- forward
    def forward(
        self,
        q: M3Output,
        q_ids: Tensor,
        p: M3Output,
        p_ids: Tensor,
        group_size: int,
        teacher_scores: Optional[Tensor] = None,
        no_in_batch_neg: bool = False,
        step: int = 0,
        query_offset: int = 0,
    ) -> M3LossOutput:
        """Loss of ``B`` local queries against passages ``p`` ([P] = all gathered passages, group-major).

        ``query_offset``: index of the first local query in the gathered batch (rank * B), so the positive of
        local query b is passage ``(query_offset + b) * G``. ``teacher_scores`` [B, G] raw teacher scores.
        """
        cfg = self.config
        batch = q_ids.shape[0]
        teacher_probs = None
        if teacher_scores is not None:
            teacher_probs = torch.softmax(teacher_scores.float() / cfg.teacher_temperature, dim=-1)
        if no_in_batch_neg:
            # each query is scored against its own group only: its positive is column 0
            positive_index = torch.zeros(batch, dtype=torch.long, device=q_ids.device)
            sizes: Optional[int] = group_size
        else:
            positive_index = (torch.arange(batch, device=q_ids.device) + query_offset) * group_size
            sizes = None

        pool_passages = None
        unpooled = p
        if cfg.colbert_pool_factor > 1 and p.colbert is not None:  # as flagm3.compression pools at encode time
            def pool_passages(out: M3Output) -> M3Output:
                vecs, mask = pool_colbert_batch(out.colbert, out.colbert_mask, cfg.colbert_pool_factor,
                                                cfg.normalize_compressed)
                return M3Output(dense=out.dense, token_weights=out.token_weights, colbert=vecs, colbert_mask=mask)

            p = pool_passages(p)
        terms_on = cfg.contrastive_terms()
        distilled = cfg.distilled_heads() if cfg.distills(step) else ()
        members = cfg.ensemble_members() if ("ensemble" in terms_on or distilled) else {}
        needed = [h for h in HEADS if h in terms_on or h in distilled or h in members]
        logits = {h: self.head_logits(h, q, q_ids, p, p_ids, sizes) for h in needed}
        if members:
            logits["ensemble"] = hybrid_scores(logits, members)
        masked = None
        if cfg.false_negative_threshold is not None and sizes is None:
            if p.dense is None:
                raise ValueError("false_negative_threshold needs the dense head's passage vectors")
            masked = near_duplicate_mask(p.dense, positive_index, cfg.false_negative_threshold)
            logits = {name: mask_logits(value, masked) for name, value in logits.items()}
        own = sizes is None and teacher_probs is None  # hard negatives can be left out of plain InfoNCE only
        terms = {t: self.contrastive(self.own_logits(t, logits[t], positive_index, group_size) if own else logits[t],
                                     positive_index, group_size, teacher_probs) for t in terms_on}
        nested = {}
        if cfg.mrl_dims:  # Matryoshka: the dense/ColBERT terms again on leading dimensions (.matryoshka)
            def nested_term(head: str, q_d: M3Output, p_d: M3Output) -> Tensor:
                head_logits = self.head_logits(head, q_d, q_ids, p_d, p_ids, sizes)
                return self.contrastive(self.own_logits(head, head_logits, positive_index, group_size) if own
                                        else head_logits, positive_index, group_size, teacher_probs)

            nested = matryoshka_terms(cfg.mrl_dims, cfg.normalize_compressed, [t for t in terms_on if t in HEADS], q,
                                      unpooled, nested_term, pool_passages)
        parts = []
        if terms:
            nested_sum = sum(cfg.head_weight(h) * cfg.mrl_weight(d) * v for (h, d), v in nested.items())
            parts.append((sum(cfg.head_weight(t) * value for t, value in terms.items()) + nested_sum) / len(terms))
        logs = {f"loss_{t}": value.detach() for t, value in terms.items()}
        logs.update({f"loss_{h}@{d}": v.detach() for (h, d), v in nested.items()})
        if distilled:
            target = torch.softmax(logits["ensemble"].detach(), dim=-1)
            distill = {h: kl_distill(target, logits[h]) for h in distilled}
            parts.append(sum(cfg.self_distill_weights.get(h, 1.0) * v for h, v in distill.items()) / len(distill))
            logs.update({f"self_distill_{h}": v.detach() for h, v in distill.items()})
        loss = parts[0] if len(parts) == 1 else (parts[0] + parts[1]) / 2
        logs["loss"] = loss.detach()
        stats = {}
        if masked is not None:
            stats["false_negatives_masked"] = masked.sum(1).float().mean()
        if q.sparse is not None and p.sparse is not None:
            for side, out in (("query", q), ("passage", p)):
                stats.update({f"sparse_{k}_{side}": v for k, v in sparse_health(out.sparse).items()})
        if cfg.sparse_flops_weight > 0 and p.token_weights is not None:  # .flops: fewer active tokens per passage
            penalty = flops_penalty(p_ids, p.token_weights, cfg.sparse_flops_weight, cfg.sparse_flops_target)
            loss = loss + penalty
            logs["loss"] = loss.detach()
            stats["sparse_flops"] = penalty.detach()
        return M3LossOutput(loss=loss, logs=logs, logits=logits, stats=stats)

    def own_logits(self, head: str, logits: Tensor, positive_index: Tensor, group_size: int) -> Tensor:
        """The logits [B, P] of ``head``'s own InfoNCE term: the sparse head's without each query's hard negatives
        when ``sparse_hard_negatives`` is off (teacher-score terms and ``no_in_batch_neg`` keep them)."""
        if head != "sparse" or self.config.sparse_hard_negatives:
            return logits
        return own_negatives_mask(logits, positive_index, group_size)

    def sparse_anchor(self, module: nn.Module, initial: Sequence[Tensor]) -> Tensor:
        """``sparse_anchor_weight * ||theta - theta_0||^2 / ||theta_0||^2`` over the sparse head's parameters."""
        params = list(module.parameters())
        dist = sum(((p - p0.to(p)) ** 2).sum() for p, p0 in zip(params, initial))
        norm = sum((p0 ** 2).sum() for p0 in initial).clamp(min=1e-12)
        return self.config.sparse_anchor_weight * dist / norm.to(dist)
