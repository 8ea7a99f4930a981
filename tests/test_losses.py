"""The M3 objective: each loss function against a loop written from its formula, and ``M3Loss`` against the
BGE-M3 recipe recomputed independently (scores by plain loops, losses by the published equations)."""

from __future__ import annotations

import math

import pytest
import torch

from flagm3.losses import M3Loss, M3LossConfig, group_logits, info_nce, kl_distill, m3_kd_loss
from flagm3.modeling_m3 import M3Output
from flagm3.training_args import M3TrainingArguments

DTYPE = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


# ------------------------------------------------------------------------------------------ references
def ref_ce(row: torch.Tensor, target: int, allowed: list[int] | None = None) -> torch.Tensor:
    """``-log(exp(row[target]) / sum_{j in allowed} exp(row[j]))``, by an explicit sum."""
    cols = range(row.shape[0]) if allowed is None else allowed
    return -(row[target] - torch.log(sum(torch.exp(row[j]) for j in cols)))


def ref_info_nce(logits: torch.Tensor, targets: list[int]) -> torch.Tensor:
    return sum(ref_ce(logits[b], t) for b, t in enumerate(targets)) / len(targets)


def ref_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``-mean_b sum_j t[b, j] * log softmax(s[b])_j`` with the log-softmax written out."""
    total = 0.0
    for b in range(student.shape[0]):
        log_z = torch.log(sum(torch.exp(v) for v in student[b]))
        total = total - sum(teacher[b, j] * (student[b, j] - log_z) for j in range(student.shape[1]))
    return total / student.shape[0]


def ref_m3_kd(teacher: torch.Tensor, logits: torch.Tensor, positives: list[int]) -> torch.Tensor:
    """``sum_i mean_b t[b, i] * CE`` of group member i against every column but the earlier members."""
    batch, group = teacher.shape
    total = 0.0
    for i in range(group):
        per_query = []
        for b in range(batch):
            earlier = {positives[b] + k for k in range(i)}
            allowed = [j for j in range(logits.shape[1]) if j not in earlier]
            per_query.append(teacher[b, i] * ref_ce(logits[b], positives[b] + i, allowed))
        total = total + sum(per_query) / batch
    return total


def ref_group(logits: torch.Tensor, positives: list[int], group: int) -> torch.Tensor:
    return torch.stack([logits[b, p : p + group] for b, p in enumerate(positives)])


def ref_dense(q: M3Output, p: M3Output) -> torch.Tensor:
    return torch.stack([torch.stack([(qv * pv).sum() for pv in p.dense]) for qv in q.dense])


def _bag(ids: torch.Tensor, weights: torch.Tensor) -> dict[int, torch.Tensor]:
    bag: dict[int, torch.Tensor] = {}
    for t, w in zip(ids.tolist(), weights):
        if w > 0:
            bag[t] = torch.maximum(bag[t], w) if t in bag else w
    return bag


def ref_sparse(q: M3Output, q_ids: torch.Tensor, p: M3Output, p_ids: torch.Tensor) -> torch.Tensor:
    """``sum over shared ids of max-pooled w_q * w_p``, with Python dictionaries."""
    rows = []
    for i in range(q_ids.shape[0]):
        qb = _bag(q_ids[i], q.sparse[i])
        row = []
        for j in range(p_ids.shape[0]):
            pb = _bag(p_ids[j], p.sparse[j])
            row.append(sum((qb[t] * pb[t] for t in qb if t in pb), torch.zeros((), dtype=DTYPE)))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def ref_colbert(q: M3Output, p: M3Output) -> torch.Tensor:
    """Mean over real query tokens of the best dot product with a real passage token."""
    rows = []
    for i in range(q.colbert.shape[0]):
        q_tok = [v for v, m in zip(q.colbert[i], q.colbert_mask[i]) if m]
        row = []
        for j in range(p.colbert.shape[0]):
            p_tok = [v for v, m in zip(p.colbert[j], p.colbert_mask[j]) if m]
            best = [torch.stack([(qv * pv).sum() for pv in p_tok]).max() for qv in q_tok]
            row.append(sum(best) / len(best))
        rows.append(torch.stack(row))
    return torch.stack(rows)


REF_SCORES = {"dense": ref_dense, "colbert": ref_colbert}


def ref_logits(heads, q, q_ids, p, p_ids, temps: dict[str, float]) -> dict[str, torch.Tensor]:
    out = {}
    for h in heads:
        raw = ref_sparse(q, q_ids, p, p_ids) if h == "sparse" else REF_SCORES[h](q, p)
        out[h] = raw / temps[h]
    return out


# -------------------------------------------------------------------------------------------- fixtures
def make_side(gen: torch.Generator, n: int, length: int, vocab: int = 12, dim: int = 6, hidden: int = 5):
    """Hand-made head outputs of ``n`` texts: right padding, repeated token ids, some zero weights."""
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (n, length), generator=gen) * mask
    sparse = torch.rand(n, length, generator=gen, dtype=DTYPE) * 2
    sparse[torch.rand(n, length, generator=gen) < 0.25] = 0.0
    sparse = sparse * mask
    colbert = torch.nn.functional.normalize(torch.randn(n, length - 1, dim, generator=gen, dtype=DTYPE), dim=-1)
    colbert = colbert * mask[:, 1:, None]
    dense = torch.nn.functional.normalize(torch.randn(n, hidden, generator=gen, dtype=DTYPE), dim=-1)
    out = M3Output(dense=dense, sparse=sparse, colbert=colbert, colbert_mask=mask[:, 1:])
    return out, ids


def leafy(out: M3Output) -> M3Output:
    """The same outputs as fresh leaves that require gradients."""
    req = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    return M3Output(dense=req(out.dense), sparse=req(out.sparse), colbert=req(out.colbert),
                    colbert_mask=out.colbert_mask)


def only(out: M3Output, heads) -> M3Output:
    return M3Output(
        dense=out.dense if "dense" in heads else None,
        sparse=out.sparse if "sparse" in heads else None,
        colbert=out.colbert if "colbert" in heads else None,
        colbert_mask=out.colbert_mask if "colbert" in heads else None,
    )


B, G = 3, 4


@pytest.fixture()
def batch():
    gen = torch.Generator().manual_seed(7)
    q, q_ids = make_side(gen, B, 6)
    p, p_ids = make_side(gen, B * G, 9)
    teacher = torch.randn(B, G, generator=gen, dtype=DTYPE) * 2
    return q, q_ids, p, p_ids, teacher


BGE = {"temps": {"dense": 0.02, "sparse": 0.02, "colbert": 0.02}}


def bge_m3_reference(q, q_ids, p, p_ids, self_distill: bool, teacher=None, kd="kl_div", temps=None):
    """FlagEmbedding's formula: (d + e + 0.1 s + c) / 4, then ((that) + (kd_d + 0.1 kd_s + kd_c) / 3) / 2."""
    temps = temps or BGE["temps"]
    logits = ref_logits(("dense", "sparse", "colbert"), q, q_ids, p, p_ids, temps)
    logits["ensemble"] = logits["dense"] + 0.3 * logits["sparse"] + logits["colbert"]
    positives = [b * G for b in range(q_ids.shape[0])]

    def term(lg):
        if teacher is None:
            return ref_info_nce(lg, positives)
        t = torch.softmax(teacher, -1)
        if kd == "m3_kd_loss":
            return ref_m3_kd(t, lg, positives)
        return ref_kl(t, ref_group(lg, positives, G)) + ref_info_nce(lg, positives)

    terms = {h: term(v) for h, v in logits.items()}
    loss = (terms["dense"] + terms["ensemble"] + 0.1 * terms["sparse"] + terms["colbert"]) / 4
    if self_distill:
        target = torch.softmax(logits["ensemble"].detach(), -1)
        sd = {h: ref_kl(target, logits[h]) for h in ("dense", "sparse", "colbert")}
        loss = (loss + (sd["dense"] + 0.1 * sd["sparse"] + sd["colbert"]) / 3) / 2
        terms.update({f"sd_{h}": v for h, v in sd.items()})
    return loss, terms


def assert_close(a, b, tol=1e-9):
    a, b = (x.detach() if isinstance(x, torch.Tensor) else x for x in (a, b))
    assert float(a) == pytest.approx(float(b), rel=tol, abs=tol)


# --------------------------------------------------------------------------------- the loss functions
def test_info_nce_matches_loop():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, generator=gen, dtype=DTYPE) * 4
    targets = [0, 4, 9]
    assert_close(info_nce(logits, torch.tensor(targets)), ref_info_nce(logits, targets))


def test_kl_distill_matches_loop():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(4, 5, generator=gen, dtype=DTYPE) * 3
    teacher = torch.softmax(torch.randn(4, 5, generator=gen, dtype=DTYPE), -1)
    assert_close(kl_distill(teacher, student), ref_kl(teacher, student))
    # cross entropy to soft targets: minimised (= teacher entropy) when the student's softmax is the teacher
    entropy = -(teacher * teacher.log()).sum(-1).mean()
    assert_close(kl_distill(teacher, teacher.log() + 3.0), entropy)


@pytest.mark.parametrize("positives", [[0, 4, 8], [4, 8, 12]])  # the second: queries 1..3 of 4 (offset 1)
def test_m3_kd_loss_matches_loop(positives):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 16, generator=gen, dtype=DTYPE) * 3
    teacher = torch.softmax(torch.randn(3, 4, generator=gen, dtype=DTYPE), -1)
    got = m3_kd_loss(teacher, logits, torch.tensor(positives))
    assert_close(got, ref_m3_kd(teacher, logits, positives))
    # a one-hot teacher on the positive is plain InfoNCE
    one_hot = torch.zeros(3, 4, dtype=DTYPE)
    one_hot[:, 0] = 1
    assert_close(m3_kd_loss(one_hot, logits, torch.tensor(positives)), ref_info_nce(logits, positives))


def test_group_logits_picks_each_querys_group():
    logits = torch.arange(24.0).view(2, 12)
    got = group_logits(logits, torch.tensor([0, 8]), 4)
    assert got.tolist() == [[0, 1, 2, 3], [20, 21, 22, 23]]


# --------------------------------------------------------------------------------------------- M3Loss
@pytest.mark.parametrize("self_distill", [False, True])
def test_bge_m3_preset_total_and_gradients(batch, self_distill):
    q, q_ids, p, p_ids, _ = batch
    loss_fn = M3Loss(M3LossConfig.preset("bge-m3", use_self_distill=self_distill))
    ql, pl = leafy(q), leafy(p)
    out = loss_fn(ql, q_ids, pl, p_ids, group_size=G)
    qr, pr = leafy(q), leafy(p)
    ref, terms = bge_m3_reference(qr, q_ids, pr, p_ids, self_distill)
    assert_close(out.loss, ref)
    for h in ("dense", "sparse", "colbert", "ensemble"):
        assert_close(out.logs[f"loss_{h}"], terms[h])
    assert ("self_distill_dense" in out.logs) == self_distill
    if self_distill:
        for h in ("dense", "sparse", "colbert"):
            assert_close(out.logs[f"self_distill_{h}"], terms[f"sd_{h}"])
    # gradients too: the ensemble target of self-distillation is detached on both sides
    out.loss.backward()
    ref.backward()
    for name in ("dense", "sparse", "colbert"):
        torch.testing.assert_close(getattr(ql, name).grad, getattr(qr, name).grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(getattr(pl, name).grad, getattr(pr, name).grad, rtol=1e-9, atol=1e-12)


def test_self_distill_start_step(batch):
    q, q_ids, p, p_ids, _ = batch
    loss_fn = M3Loss(M3LossConfig.preset("bge-m3", self_distill_start_step=5))
    without, _ = bge_m3_reference(q, q_ids, p, p_ids, self_distill=False)
    with_sd, _ = bge_m3_reference(q, q_ids, p, p_ids, self_distill=True)
    for step, expected in ((0, without), (5, without), (6, with_sd), (50, with_sd)):
        out = loss_fn(q, q_ids, p, p_ids, group_size=G, step=step)
        assert_close(out.loss, expected)
        assert ("self_distill_dense" in out.logs) == (step > 5)
    assert not math.isclose(float(without), float(with_sd))


def test_dense_only_is_plain_info_nce(batch):
    q, q_ids, p, p_ids, _ = batch
    loss_fn = M3Loss(M3LossConfig.preset("bge-m3", heads=("dense",)))
    out = loss_fn(only(q, ["dense"]), q_ids, only(p, ["dense"]), p_ids, group_size=G)
    expected = ref_info_nce(ref_dense(q, p) / 0.02, [b * G for b in range(B)])
    assert_close(out.loss, expected)
    assert set(out.logs) == {"loss_dense", "loss"}  # no ensemble, hence no self-distillation


def test_dense_and_sparse_without_colbert_terms(batch):
    q, q_ids, p, p_ids, _ = batch
    heads = ("dense", "sparse")
    loss_fn = M3Loss(M3LossConfig.preset("bge-m3", heads=heads))
    out = loss_fn(only(q, heads), q_ids, only(p, heads), p_ids, group_size=G)
    lg = ref_logits(heads, q, q_ids, p, p_ids, BGE["temps"])
    lg["ensemble"] = lg["dense"] + 0.3 * lg["sparse"]
    pos = [b * G for b in range(B)]
    terms = {h: ref_info_nce(v, pos) for h, v in lg.items()}
    contrastive = (terms["dense"] + 0.1 * terms["sparse"] + terms["ensemble"]) / 3
    target = torch.softmax(lg["ensemble"], -1)
    distill = (ref_kl(target, lg["dense"]) + 0.1 * ref_kl(target, lg["sparse"])) / 2
    assert_close(out.loss, (contrastive + distill) / 2)
    assert not any("colbert" in k for k in out.logs)
    assert "colbert" not in out.logits


def test_no_in_batch_neg_scores_each_query_against_its_own_group(batch):
    q, q_ids, p, p_ids, teacher = batch
    loss_fn = M3Loss(M3LossConfig.preset("bge-m3"))
    out = loss_fn(q, q_ids, p, p_ids, group_size=G, no_in_batch_neg=True)
    full = ref_logits(("dense", "sparse", "colbert"), q, q_ids, p, p_ids, BGE["temps"])
    pos = [b * G for b in range(B)]
    local = {h: ref_group(v, pos, G) for h, v in full.items()}
    local["ensemble"] = local["dense"] + 0.3 * local["sparse"] + local["colbert"]
    for h, v in local.items():
        assert out.logits[h].shape == (B, G)
        torch.testing.assert_close(out.logits[h], v, rtol=1e-9, atol=1e-9)
    terms = {h: ref_info_nce(v, [0] * B) for h, v in local.items()}
    contrastive = (terms["dense"] + terms["ensemble"] + 0.1 * terms["sparse"] + terms["colbert"]) / 4
    target = torch.softmax(local["ensemble"], -1)
    sd = {h: ref_kl(target, local[h]) for h in ("dense", "sparse", "colbert")}
    expected = (contrastive + (sd["dense"] + 0.1 * sd["sparse"] + sd["colbert"]) / 3) / 2
    assert_close(out.loss, expected)
    # with in-batch negatives the loss differs: the restriction matters
    assert not math.isclose(float(loss_fn(q, q_ids, p, p_ids, group_size=G).loss), float(out.loss), rel_tol=1e-6)


@pytest.mark.parametrize("kd", ["kl_div", "m3_kd_loss"])
@pytest.mark.parametrize("self_distill", [False, True])
def test_teacher_scores(batch, kd, self_distill):
    q, q_ids, p, p_ids, teacher = batch
    loss_fn = M3Loss(M3LossConfig.preset("bge-m3", kd_loss_type=kd, use_self_distill=self_distill))
    out = loss_fn(q, q_ids, p, p_ids, group_size=G, teacher_scores=teacher.float())
    expected, terms = bge_m3_reference(q, q_ids, p, p_ids, self_distill, teacher=teacher.float().double(), kd=kd)
    assert_close(out.loss, expected, tol=1e-7)  # teacher scores pass through float32, as in FlagEmbedding
    for h in ("dense", "sparse", "colbert", "ensemble"):
        assert_close(out.logs[f"loss_{h}"], terms[h], tol=1e-7)


@pytest.mark.parametrize("teacher", [False, True])
def test_query_offset_for_gathered_passages(teacher):
    """Rank 1 of 2: local queries 2..3 of 4, passages of all 4 groups; positives at (offset + b) * G."""
    gen = torch.Generator().manual_seed(11)
    q_all, q_ids_all = make_side(gen, 4, 6)
    p, p_ids = make_side(gen, 4 * G, 9)
    scores = torch.randn(2, G, generator=gen) if teacher else None  # float32, as collated
    q = M3Output(dense=q_all.dense[2:], sparse=q_all.sparse[2:], colbert=q_all.colbert[2:],
                 colbert_mask=q_all.colbert_mask[2:])
    loss_fn = M3Loss(M3LossConfig.preset("bge-m3"))
    out = loss_fn(q, q_ids_all[2:], p, p_ids, group_size=G, teacher_scores=scores, query_offset=2)
    lg = ref_logits(("dense", "sparse", "colbert"), q, q_ids_all[2:], p, p_ids, BGE["temps"])
    lg["ensemble"] = lg["dense"] + 0.3 * lg["sparse"] + lg["colbert"]
    pos = [2 * G, 3 * G]
    if teacher:
        t = torch.softmax(scores, -1).double()
        terms = {h: ref_kl(t, ref_group(v, pos, G)) + ref_info_nce(v, pos) for h, v in lg.items()}
    else:
        terms = {h: ref_info_nce(v, pos) for h, v in lg.items()}
    contrastive = (terms["dense"] + terms["ensemble"] + 0.1 * terms["sparse"] + terms["colbert"]) / 4
    target = torch.softmax(lg["ensemble"], -1)
    sd = {h: ref_kl(target, lg[h]) for h in ("dense", "sparse", "colbert")}
    assert_close(out.loss, (contrastive + (sd["dense"] + 0.1 * sd["sparse"] + sd["colbert"]) / 3) / 2, tol=1e-7)
    # without the offset the loss would treat groups 0 and 1 as positives: a different number
    wrong = loss_fn(q, q_ids_all[2:], p, p_ids, group_size=G, teacher_scores=scores)
    assert not math.isclose(float(wrong.loss), float(out.loss), rel_tol=1e-6)


# ------------------------------------------------------------------------------- configuration knobs
def test_overrides_from_training_arguments(batch, tmp_path):
    args = M3TrainingArguments(
        output_dir=str(tmp_path), loss_preset="bge-m3", head_loss_weights="dense=2",
        head_temperatures="sparse=1.0", ensemble_weights="sparse=0.5", self_distill_weights="colbert=0.25",
        temperature=0.05, report_to=[],
    )
    config = args.loss_config()
    assert config.head_weights == {"dense": 2.0, "sparse": 0.1, "colbert": 1.0, "ensemble": 1.0}
    assert config.ensemble_weights == {"dense": 1.0, "sparse": 0.5, "colbert": 1.0}
    assert config.self_distill_weights == {"dense": 1.0, "sparse": 0.1, "colbert": 0.25}
    assert [config.head_temperature(h) for h in ("dense", "sparse", "colbert")] == [0.05, 1.0, 0.05]

    q, q_ids, p, p_ids, _ = batch
    out = M3Loss(config)(q, q_ids, p, p_ids, group_size=G)
    lg = ref_logits(("dense", "sparse", "colbert"), q, q_ids, p, p_ids,
                    {"dense": 0.05, "sparse": 1.0, "colbert": 0.05})
    lg["ensemble"] = lg["dense"] + 0.5 * lg["sparse"] + lg["colbert"]
    pos = [b * G for b in range(B)]
    t = {h: ref_info_nce(v, pos) for h, v in lg.items()}
    contrastive = (2 * t["dense"] + t["ensemble"] + 0.1 * t["sparse"] + t["colbert"]) / 4
    target = torch.softmax(lg["ensemble"], -1)
    sd = (ref_kl(target, lg["dense"]) + 0.1 * ref_kl(target, lg["sparse"]) + 0.25 * ref_kl(target, lg["colbert"])) / 3
    assert_close(out.loss, (contrastive + sd) / 2)


def test_flagm3_preset_trains_the_sparse_head_on_its_own_in_batch_term(batch):
    """loss = ((L_d + 0.1 L_s' + L_c + L_ens) / 4 + (KL_d + KL_c) / 2) / 2 with ens = dense + ColBERT logits and
    L_s' the sparse InfoNCE at temperature 0.05 without each query's own hard negatives (terms of weight 0 are
    not counted)."""
    q, q_ids, p, p_ids, _ = batch
    config = M3LossConfig.preset("flagm3")
    assert [config.trains(h) for h in ("dense", "sparse", "colbert")] == [True, True, True]
    assert config.sparse_stop_gradient and not config.sparse_hard_negatives
    ql, pl = leafy(q), leafy(p)
    out = M3Loss(config)(ql, q_ids, pl, p_ids, group_size=G)
    lg = ref_logits(("dense", "sparse", "colbert"), q, q_ids, p, p_ids, {**BGE["temps"], "sparse": 0.05})
    lg["ensemble"] = lg["dense"] + lg["colbert"]
    pos = [b * G for b in range(B)]
    terms = {h: ref_info_nce(v, pos) for h, v in lg.items()}
    allowed = [[j for j in range(B * G) if j == pos[b] or not pos[b] < j < pos[b] + G] for b in range(B)]
    terms["sparse"] = sum(ref_ce(lg["sparse"][b], pos[b], allowed[b]) for b in range(B)) / B
    target = torch.softmax(lg["ensemble"], -1)
    contrastive = (terms["dense"] + 0.1 * terms["sparse"] + terms["colbert"] + terms["ensemble"]) / 4
    distill = (ref_kl(target, lg["dense"]) + ref_kl(target, lg["colbert"])) / 2
    assert_close(out.loss, (contrastive + distill) / 2)
    assert_close(out.logs["loss_sparse"], terms["sparse"])
    assert "self_distill_sparse" not in out.logs
    assert config.computed_heads() == ("dense", "sparse", "colbert")
    assert set(out.stats) == {f"sparse_{k}_{s}" for k in ("active", "zero", "weight") for s in ("query", "passage")}
    out.loss.backward()
    assert ql.sparse.grad.abs().sum() > 0 and pl.sparse.grad.abs().sum() > 0
    assert ql.dense.grad.abs().sum() > 0 and pl.colbert.grad.abs().sum() > 0


def test_recipe_freezes_a_head_no_term_trains(tiny_model, tiny_tokenizer, tmp_path):
    from flagm3.recipe import RECIPE_SPARSE_LEARNING_RATE, prepare_for_training
    from flagm3.trainer import M3Trainer

    def trainer_for(**overrides):
        args = M3TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **overrides)
        return M3Trainer(model=tiny_model, args=args, processing_class=tiny_tokenizer)

    def frozen(**overrides) -> set:
        args = M3TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **overrides)
        model = prepare_for_training(tiny_model, args)
        return {n for n, p in model.named_parameters() if not p.requires_grad and "pooler" not in n}

    assert frozen() == set()  # the flagm3 recipe trains every head
    assert frozen(loss_preset="bge-m3") == set()
    assert frozen(head_loss_weights="sparse=0") == {"sparse_linear.weight", "sparse_linear.bias"}  # asked for
    for param in tiny_model.parameters():
        param.requires_grad_(True)
    # the recipe's sparse head learns at its own rate; the encoder and ColBERT at --learning_rate
    optimizer = trainer_for(learning_rate=1e-5).create_optimizer()
    sparse = {id(p) for p in tiny_model.sparse_linear.parameters()}
    rates = {g["lr"] for g in optimizer.param_groups if {id(p) for p in g["params"]} & sparse}
    assert rates == {RECIPE_SPARSE_LEARNING_RATE}
    assert {g["lr"] for g in optimizer.param_groups if not {id(p) for p in g["params"]} & sparse} == {1e-5}


def test_presets_and_head_selection(tmp_path):
    flagm3 = M3TrainingArguments(output_dir=str(tmp_path), report_to=[]).loss_config()
    assert flagm3.head_weights["sparse"] == 0.1 and flagm3.ensemble_weights["sparse"] == 0
    assert flagm3.self_distill_weights["sparse"] == 0 and flagm3.head_temperatures == {"sparse": 0.05}
    assert flagm3.head_temperature("sparse") == 0.05 and flagm3.head_temperature("dense") == flagm3.temperature
    bge = M3TrainingArguments(output_dir=str(tmp_path), loss_preset="bge-m3", report_to=[]).loss_config()
    assert bge.head_temperatures == {} and tuple(bge.heads) == ("dense", "sparse", "colbert")
    dense_only = M3TrainingArguments(output_dir=str(tmp_path), unified_finetuning=False, report_to=[])
    assert tuple(dense_only.loss_config().heads) == ("dense",)
    picked = M3TrainingArguments(output_dir=str(tmp_path), heads="sparse, dense", report_to=[])
    assert picked.loss_config().computed_heads() == ("dense", "sparse")
    picked = M3TrainingArguments(output_dir=str(tmp_path), heads="sparse, dense", loss_preset="bge-m3", report_to=[])
    assert M3Loss(picked.loss_config()).heads == ("dense", "sparse")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"heads": ("dense", "splade")}, "heads"),
        ({"heads": ()}, "heads"),
        ({"kd_loss_type": "mse"}, "kd_loss_type"),
        ({"temperature": 0.0}, "temperature"),
        ({"head_temperatures": {"sparse": -1.0}}, "temperature"),
    ],
)
def test_invalid_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        M3LossConfig.preset("bge-m3", **overrides)
    with pytest.raises(ValueError, match="preset"):
        M3LossConfig.preset("bge-m4")


# ------------------------------------------------------------------------------------------- weight-0 terms
def test_a_term_of_weight_zero_is_not_computed_nor_counted(batch):
    """A head whose outputs are NaN but whose every weight is 0 leaves the loss finite, and the total is the
    weighted mean over the non-zero terms only: (1 L_d + 0.5 L_c + 2 L_ens) / 3 with ens = L_d + L_c logits."""
    q, q_ids, p, p_ids, _ = batch
    nan = lambda out: M3Output(dense=out.dense, sparse=torch.full_like(out.sparse, math.nan),  # noqa: E731
                               colbert=out.colbert, colbert_mask=out.colbert_mask)
    config = M3LossConfig.preset(
        "bge-m3", use_self_distill=False,
        head_weights={"dense": 1.0, "sparse": 0.0, "colbert": 0.5, "ensemble": 2.0},
        ensemble_weights={"dense": 1.0, "sparse": 0.0, "colbert": 1.0},
    )
    ql, pl = leafy(nan(q)), leafy(nan(p))
    out = M3Loss(config)(ql, q_ids, pl, p_ids, group_size=G)
    assert torch.isfinite(out.loss)
    lg = ref_logits(("dense", "colbert"), q, q_ids, p, p_ids, BGE["temps"])
    lg["ensemble"] = lg["dense"] + lg["colbert"]
    pos = [b * G for b in range(B)]
    t = {h: ref_info_nce(v, pos) for h, v in lg.items()}
    assert_close(out.loss, (t["dense"] + 0.5 * t["colbert"] + 2.0 * t["ensemble"]) / 3)
    assert set(out.logs) == {"loss_dense", "loss_colbert", "loss_ensemble", "loss"}
    out.loss.backward()
    assert ql.sparse.grad is None and pl.sparse.grad is None  # not back-propagated either
    assert torch.isfinite(ql.dense.grad).all() and torch.isfinite(pl.colbert.grad).all()


def test_self_distillation_is_its_own_switch(batch):
    """An ensemble InfoNCE weight of 0 drops that term only: self-distillation towards the ensemble stays on."""
    q, q_ids, p, p_ids, _ = batch
    config = M3LossConfig.preset("bge-m3", head_weights={"dense": 1.0, "sparse": 0.1, "colbert": 1.0, "ensemble": 0.0})
    out = M3Loss(config)(q, q_ids, p, p_ids, group_size=G)
    lg = ref_logits(("dense", "sparse", "colbert"), q, q_ids, p, p_ids, BGE["temps"])
    lg["ensemble"] = lg["dense"] + 0.3 * lg["sparse"] + lg["colbert"]
    pos = [b * G for b in range(B)]
    t = {h: ref_info_nce(lg[h], pos) for h in ("dense", "sparse", "colbert")}
    target = torch.softmax(lg["ensemble"], -1)
    sd = (ref_kl(target, lg["dense"]) + 0.1 * ref_kl(target, lg["sparse"]) + ref_kl(target, lg["colbert"])) / 3
    assert_close(out.loss, ((t["dense"] + 0.1 * t["sparse"] + t["colbert"]) / 3 + sd) / 2)
    assert "loss_ensemble" not in out.logs and "self_distill_dense" in out.logs
    off = M3Loss(M3LossConfig.preset("bge-m3", use_self_distill=False))(q, q_ids, p, p_ids, group_size=G)
    assert not any(k.startswith("self_distill") for k in off.logs)
    with pytest.raises(ValueError, match="every loss term has weight 0"):
        M3LossConfig.preset("bge-m3", use_self_distill=False,
                            head_weights={"dense": 0.0, "sparse": 0.0, "colbert": 0.0, "ensemble": 0.0})


# ---------------------------------------------------------------------- sparse-head levers, teacher temperature
@pytest.mark.parametrize("kd", ["kl_div", "m3_kd_loss"])
def test_teacher_temperature_divides_the_teacher_scores(batch, kd):
    """softmax(scores / T): T = 0.5 on the scores equals T = 1 on the scores doubled, and differs from T = 1."""
    q, q_ids, p, p_ids, teacher = batch
    scores = teacher.float()
    cooled = M3Loss(M3LossConfig.preset("bge-m3", kd_loss_type=kd, teacher_temperature=0.5))
    plain = M3Loss(M3LossConfig.preset("bge-m3", kd_loss_type=kd))
    out = cooled(q, q_ids, p, p_ids, group_size=G, teacher_scores=scores)
    expected, _ = bge_m3_reference(q, q_ids, p, p_ids, True, teacher=(scores * 2).double(), kd=kd)
    assert_close(out.loss, expected, tol=1e-7)
    assert not math.isclose(float(plain(q, q_ids, p, p_ids, group_size=G, teacher_scores=scores).loss),
                            float(out.loss), rel_tol=1e-6)
    args = M3TrainingArguments(output_dir="unused", teacher_temperature=0.5, report_to=[])
    assert args.loss_config().teacher_temperature == 0.5
    with pytest.raises(ValueError, match="teacher_temperature"):
        M3LossConfig.preset("bge-m3", teacher_temperature=0.0)


def test_sparse_term_without_hard_negatives(batch):
    """sparse_hard_negatives=False: the sparse InfoNCE of query b runs over its positive and the other groups'
    passages; the other heads, the ensemble and self-distillation keep every passage."""
    q, q_ids, p, p_ids, _ = batch
    out = M3Loss(M3LossConfig.preset("bge-m3", sparse_hard_negatives=False))(q, q_ids, p, p_ids, group_size=G)
    lg = ref_logits(("dense", "sparse", "colbert"), q, q_ids, p, p_ids, BGE["temps"])
    lg["ensemble"] = lg["dense"] + 0.3 * lg["sparse"] + lg["colbert"]
    pos = [b * G for b in range(B)]
    terms = {h: ref_info_nce(v, pos) for h, v in lg.items()}
    allowed = [[j for j in range(B * G) if j == pos[b] or not pos[b] < j < pos[b] + G] for b in range(B)]
    terms["sparse"] = sum(ref_ce(lg["sparse"][b], pos[b], allowed[b]) for b in range(B)) / B
    contrastive = (terms["dense"] + terms["ensemble"] + 0.1 * terms["sparse"] + terms["colbert"]) / 4
    target = torch.softmax(lg["ensemble"], -1)
    sd = (ref_kl(target, lg["dense"]) + 0.1 * ref_kl(target, lg["sparse"]) + ref_kl(target, lg["colbert"])) / 3
    assert_close(out.loss, (contrastive + sd) / 2)
    assert_close(out.logs["loss_sparse"], terms["sparse"])
    assert_close(out.logs["loss_dense"], terms["dense"])


def test_sparse_health_statistics():
    """Active tokens per text, share of all-zero texts, mean weight of the active tokens."""
    from flagm3.losses import sparse_health

    weights = torch.tensor([[0.5, 0.0, 1.5, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    stats = sparse_health(weights)
    assert stats["active"].item() == pytest.approx(1.0)  # (2 + 0 + 1) / 3
    assert stats["zero"].item() == pytest.approx(1 / 3)
    assert stats["weight"].item() == pytest.approx(4.0 / 3)  # (0.5 + 1.5 + 2) / 3 active tokens
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
    q, q_ids = make_side(torch.Generator().manual_seed(3), B, 6)
    p, p_ids = make_side(torch.Generator().manual_seed(4), B * G, 9)
    out = M3Loss(M3LossConfig.preset("flagm3"))(q, q_ids, p, p_ids, group_size=G)
    assert set(out.stats) == {f"sparse_{k}_{s}" for k in ("active", "zero", "weight") for s in ("query", "passage")}
    assert_close(out.stats["sparse_active_passage"], (p.sparse > 0).sum(1).double().mean().float())


def test_sparse_anchor_is_the_relative_squared_distance():
    head = torch.nn.Linear(3, 1)
    initial = [t.detach().clone() for t in head.parameters()]
    loss_fn = M3Loss(M3LossConfig.preset("bge-m3", sparse_anchor_weight=2.0))
    assert loss_fn.sparse_anchor(head, initial).item() == 0.0
    with torch.no_grad():
        head.weight += 0.5
    norm = sum(float((t ** 2).sum()) for t in initial)
    assert loss_fn.sparse_anchor(head, initial).item() == pytest.approx(2.0 * 3 * 0.25 / norm, rel=1e-6)
    with pytest.raises(ValueError, match="sparse_anchor_weight"):
        M3LossConfig.preset("bge-m3", sparse_anchor_weight=-1.0)


def _sparse_grads(model, tokenizer, tmp_path, **overrides):
    """Encoder and sparse-head gradients of the sparse InfoNCE term alone, through the training loss's encode."""
    from flagm3.recipe import prepare_for_training
    from flagm3.trainer import M3Trainer

    args = M3TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, loss_preset="bge-m3",
                               **overrides)
    trainer = M3Trainer(model=prepare_for_training(model, args), args=args, processing_class=tokenizer)
    texts = ["a query about wings", "boundary layer flow", "a paper on wings and flow", "heat transfer"]
    q = tokenizer(texts[:2], return_tensors="pt", padding=True)
    p = tokenizer(texts[2:] * 2, return_tensors="pt", padding=True)
    model.zero_grad(set_to_none=True)
    qo, po = (trainer.training_loss.encode(trainer.model, dict(side)) for side in (q, p))
    sparse = trainer.m3_loss.head_logits("sparse", qo, q["input_ids"], po, p["input_ids"], None)
    info_nce(sparse, torch.tensor([0, 2])).backward()
    encoder = [t.grad.abs().sum() for n, t in model.named_parameters() if n.startswith("encoder.")
               and t.grad is not None]
    return sum(encoder, torch.zeros(())), model.sparse_linear.weight.grad.abs().sum()


def test_sparse_stop_gradient_leaves_the_encoder_alone(tiny_model, tiny_tokenizer, tmp_path):
    """sparse_stop_gradient: the sparse term's gradient reaches the sparse head, never the encoder."""
    with torch.no_grad():  # every token active, so the sparse scores depend on the encoder
        tiny_model.sparse_linear.bias.fill_(5.0)
    encoder, head = _sparse_grads(tiny_model, tiny_tokenizer, tmp_path)
    assert encoder > 0 and head > 0
    encoder, head = _sparse_grads(tiny_model, tiny_tokenizer, tmp_path / "stop", sparse_stop_gradient=True)
    assert encoder == 0 and head > 0


def test_sparse_health_is_logged_and_warns_once(tiny_model, tiny_tokenizer, tmp_path, caplog):
    """Statistics summed as tensors, averaged at the logging step; one WARNING when the active tokens halve or
    more than 5% of the passages are all zero."""
    from flagm3.trainer import M3Trainer

    args = M3TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = M3Trainer(model=tiny_model, args=args, processing_class=tiny_tokenizer)

    def interval(active_passage: float, zero_passage: float) -> dict:
        stats = {"sparse_active_query": 8.0, "sparse_zero_query": 0.0, "sparse_weight_query": 0.2,
                 "sparse_active_passage": active_passage, "sparse_zero_passage": zero_passage,
                 "sparse_weight_passage": 0.1}
        for value in (0.5, 1.5):  # two micro-batches: the log shows their mean
            trainer.term_logs.add({"loss": torch.tensor(1.0)}, {k: torch.tensor(v * value) for k, v in stats.items()})
        logs = {"loss": 1.0}
        trainer.log(logs)
        return logs

    with caplog.at_level("WARNING", logger="flagm3.trainer"):
        first = interval(100.0, 0.0)
        assert first["sparse_active_passage"] == pytest.approx(100.0)
        # the weight per active token over both micro-batches' active tokens: (0.1 x 4 + 0.3 x 12) / 16
        assert first["sparse_weight_query"] == pytest.approx(0.25)
        interval(60.0, 0.02)
        assert not [r for r in caplog.records if "collapsing" in r.message]
        interval(40.0, 0.02)  # below half of 100
        interval(10.0, 0.5)
    warnings = [r for r in caplog.records if "collapsing" in r.message]
    assert len(warnings) == 1 and "active tokens per passage 40.0 (100.0 at the start)" in warnings[0].message
