"""The training step's hot path: row lengths come from the collator (no host read of the masks), chunk outputs are
reassembled in one copy, and gathering passages across processes takes one length all-reduce."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_gradcache import SUB, assert_same_grads, collate, load_model, make_items, make_trainer, step
from torch.utils._python_dispatch import TorchDispatchMode

from flagm3 import distributed
from flagm3.losses.training import M3TrainingLoss
from flagm3.modeling_m3 import M3Output, merge_outputs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def test_collator_gives_each_rows_length(tiny_tokenizer):
    batch = collate(tiny_tokenizer, make_items(False))
    for side in ("query", "passage"):
        mask = batch[side]["attention_mask"]
        assert batch["lengths"][side] == mask.sum(1).tolist()
        assert len(set(batch["lengths"][side])) > 1  # real padding
    left = collate(tiny_tokenizer, make_items(False), padding_side="left")
    assert left["lengths"] == {"query": None, "passage": None}  # not right-padded: encoded whole


@pytest.mark.parametrize("chunks, sub_batch", [(1, None), (4, None), (4, SUB)])
def test_step_with_collator_lengths_reads_no_mask(tiny_encoder_dir, tiny_tokenizer, tmp_path, monkeypatch, chunks,
                                                  sub_batch):
    """The step on the collator's batch never reads a mask back, and equals the step that reads them."""
    inputs = collate(tiny_tokenizer, make_items(True))
    without = {k: v for k, v in inputs.items() if k != "lengths"}
    model = load_model(tiny_encoder_dir)
    trainer = make_trainer(model, tiny_tokenizer, tmp_path, sub_batch_size=sub_batch, max_length_chunks=chunks)
    loss_read, grads_read = step(trainer, without)

    def no_host_read(mask):
        raise AssertionError("the attention mask was read back to the host")

    monkeypatch.setattr(M3TrainingLoss, "_lengths", staticmethod(no_host_read))
    loss, grads = step(trainer, inputs)
    assert loss == pytest.approx(loss_read, rel=1e-12)
    assert_same_grads(grads, grads_read, rtol=1e-12)
    with pytest.raises(AssertionError, match="read back"):
        step(trainer, without)


def earlier_merge(parts, rows, length):
    """flagm3's earlier reassembly: cast to fp32, pad each part, concatenate, reorder (three copies)."""
    order = torch.tensor([r for chunk in rows for r in chunk])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())

    def merged(name, tokens=0):
        values = [getattr(p, name) for p in parts]
        values = [v.float() if v.is_floating_point() else v for v in values]
        if tokens:
            values = [F.pad(v, [0, 0] * (v.dim() - 2) + [0, tokens - v.shape[1]]) for v in values]
        return torch.cat(values).index_select(0, inverse)

    return M3Output(dense=merged("dense"), sparse=merged("sparse", length), colbert=merged("colbert", length - 1),
                    colbert_mask=merged("colbert_mask", length - 1))


class NewFloatTensors(TorchDispatchMode):
    """The row counts of the floating-point tensors that ops create: a storage not seen before (the inputs'
    and in-place writes' are)."""

    def __init__(self, inputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.seen = {t.untyped_storage().data_ptr() for t in inputs}
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.untyped_storage().data_ptr() not in self.seen:
                self.seen.add(t.untyped_storage().data_ptr())
                self.rows.append(t.shape[0])
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_writes_each_field_once_with_the_earlier_values_and_gradients(dtype):
    gen = torch.Generator().manual_seed(0)
    rows, widths, length, hidden, dim = [[3, 0], [4], [1, 2, 5]], [9, 6, 4], 9, 5, 3

    def make_parts():
        parts = []
        for chunk, width in zip(rows, widths):
            n = len(chunk)
            mask = (torch.arange(width - 1)[None, :] < torch.randint(1, width, (n, 1), generator=gen)).long()
            parts.append(M3Output(
                dense=torch.randn(n, hidden, generator=gen).to(dtype).requires_grad_(),
                sparse=torch.rand(n, width, generator=gen).to(dtype).requires_grad_(),
                colbert=torch.randn(n, width - 1, dim, generator=gen).to(dtype).requires_grad_(),
                colbert_mask=mask))
        return parts

    parts = make_parts()
    clones = [M3Output(**{k: (v.detach().clone().requires_grad_() if v.is_floating_point() else v)
                          for k, v in p.items()}) for p in parts]
    with NewFloatTensors([v for part in parts for v in part.values()]) as created:
        got = merge_outputs(parts, rows, length, upcast=True)
    # dense, sparse, ColBERT: one batch-sized tensor each; bf16 parts are cast one at a time (part-sized)
    assert created.rows.count(6) == 3 and max(created.rows) == 6
    if dtype == torch.float32:
        assert len(created.rows) == 3
    want = earlier_merge(clones, rows, length)
    upstream = {k: torch.randn(v.shape, generator=gen) for k, v in want.items() if v.is_floating_point()}
    for name in ("dense", "sparse", "colbert", "colbert_mask"):
        assert got[name].dtype == want[name].dtype
        assert torch.equal(got[name], want[name]), name
    sum((got[k] * u).sum() for k, u in upstream.items()).backward()
    sum((want[k] * u).sum() for k, u in upstream.items()).backward()
    for mine, theirs in zip(parts, clones):
        for name in ("dense", "sparse", "colbert"):
            assert mine[name].grad.dtype == dtype
            assert torch.equal(mine[name].grad, theirs[name].grad), name


def test_gathering_passages_takes_one_length_all_reduce(monkeypatch):
    """Every token-level tensor is padded to the longest length on any rank, found by one all-reduce."""
    calls = []

    def all_reduce(tensor, op=None):
        calls.append(int(tensor))
        tensor += 3  # another rank's batch is 3 tokens longer

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(distributed, "gather_with_grad", lambda t: t)  # one rank's share of the gather
    monkeypatch.setattr(distributed, "gather_without_grad", lambda t: t)
    p, length = 4, 6
    out = M3Output(dense=torch.randn(p, 8), sparse=torch.rand(p, length), colbert=torch.randn(p, length - 1, 2),
                   colbert_mask=torch.ones(p, length - 1, dtype=torch.long))
    ids = torch.randint(5, 50, (p, length))
    gathered, gathered_ids = distributed.gather_passages(out, ids, pad_token_id=1)
    assert calls == [length]
    assert gathered_ids.shape == gathered.sparse.shape == (p, length + 3)
    assert gathered.colbert.shape == (p, length + 2, 2) and gathered.colbert_mask.shape == (p, length + 2)
    assert (gathered_ids[:, length:] == 1).all() and (gathered.sparse[:, length:] == 0).all()
    assert (gathered.colbert_mask[:, length - 1:] == 0).all()
    with pytest.raises(ValueError, match="shorter length"):
        distributed.pad_to_length(ids, 1, length - 1)
