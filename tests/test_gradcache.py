"""Cached-gradient training (``sub_batch_size``): one ``training_step`` gives the loss and parameter gradients of
the uncached step, for every head, with and without teacher scores, with dropout off and on."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import SENTENCES

from flagm3 import M3Model
from flagm3.data import M3Collator
from flagm3.losses import gradcache
from flagm3.modeling_m3 import M3Output
from flagm3.trainer import M3Trainer
from flagm3.training_args import M3TrainingArguments

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


B, G, SUB = 4, 3, 3  # 4 queries, 12 passages, chunks of 3 texts: query chunks of 3 and 1


def make_items(teacher: bool) -> list[dict]:
    """Groups whose passages differ a lot in length, so that chunks are trimmed to different lengths."""
    long = " ".join(SENTENCES[:6])
    groups = [
        [long, SENTENCES[1], SENTENCES[2]],
        ["wing", "flow", "shells"],  # the second passage chunk: all short
        [SENTENCES[3], long + " " + SENTENCES[7], SENTENCES[9]],
        [SENTENCES[4], SENTENCES[5] + " " + SENTENCES[6], "flutter"],
    ]
    queries = ["aeroelastic models", SENTENCES[2], "heat transfer at hypersonic speed in a wake", "flutter"]
    gen = torch.Generator().manual_seed(0)
    return [
        {"query": q, "passages": p, "teacher_scores": torch.randn(G, generator=gen).tolist() if teacher else None}
        for q, p in zip(queries, groups)
    ]


def make_trainer(model, tokenizer, tmp_path, sub_batch_size=None, **overrides) -> M3Trainer:
    args = M3TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, loss_preset="bge-m3", sub_batch_size=sub_batch_size,
        **overrides,
    )
    trainer = M3Trainer(model=model, args=args, processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; the tests call training_step
    return trainer


def load_model(encoder_dir, dropout: float = 0.0, dtype: torch.dtype = torch.float64) -> M3Model:
    """The tiny model in float64 by default: the cached and uncached gradients then agree to rounding, where
    float32 leaves relative errors of 1e-3 on the small gradients of a near-uniform random model."""
    torch.manual_seed(0)
    model = M3Model.from_encoder(
        str(encoder_dir), colbert_dim=16, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout
    )
    with torch.no_grad():  # most token weights positive, so the sparse head always gets a gradient
        model.sparse_linear.bias.fill_(0.5)
    return model.to(dtype)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def step(trainer, inputs, seed: int = 123) -> tuple[float, dict[str, torch.Tensor]]:
    trainer.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = trainer.training_step(trainer.model, inputs)
    return float(loss), grads(trainer.model)


ALL_HEADS = ("sparse_linear.weight", "colbert_linear.weight", "encoder.embeddings.word_embeddings.weight")


def assert_same_grads(got: dict, want: dict, rtol: float = 1e-6, required=ALL_HEADS) -> None:
    """Equal up to ``rtol`` of each tensor's entries, and of the largest gradient for the near-zero ones."""
    assert set(got) == set(want)
    scale = max(float(g.abs().max()) for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for head in (*required, "encoder.embeddings.word_embeddings.weight"):
        assert want[head].abs().sum() > 0, f"{head} got no gradient: the comparison would be vacuous"


def collate(tokenizer, items, padding_side: str = "right") -> dict:
    tokenizer.padding_side = padding_side
    try:
        return M3Collator(tokenizer, query_max_len=32, passage_max_len=64)(items)
    finally:
        tokenizer.padding_side = "right"


# ------------------------------------------------------------------------------------------ dropout off
@pytest.mark.parametrize("teacher, kd", [(False, "kl_div"), (True, "kl_div"), (True, "m3_kd_loss")])
def test_cached_step_equals_uncached_step(tiny_encoder_dir, tiny_tokenizer, tmp_path, teacher, kd):
    inputs = collate(tiny_tokenizer, make_items(teacher))
    chunk_lengths = [c["input_ids"].shape[1] for c in gradcache._chunks(inputs["passage"], SUB)]
    assert len(set(chunk_lengths)) > 1 and max(chunk_lengths) == inputs["passage"]["input_ids"].shape[1]

    model = load_model(tiny_encoder_dir)
    plain = make_trainer(model, tiny_tokenizer, tmp_path, kd_loss_type=kd)
    cached = make_trainer(model, tiny_tokenizer, tmp_path, sub_batch_size=SUB, kd_loss_type=kd)
    loss_plain, grads_plain = step(plain, inputs)
    loss_cached, grads_cached = step(cached, inputs)
    assert loss_cached == pytest.approx(loss_plain, rel=1e-5)
    assert_same_grads(grads_cached, grads_plain)
    assert cached.term_logs.last.keys() == plain.term_logs.last.keys()
    for key, value in plain.term_logs.last.items():
        assert float(cached.term_logs.last[key]) == pytest.approx(float(value), rel=1e-5), key


def test_cached_step_in_float32(tiny_encoder_dir, tiny_tokenizer, tmp_path):
    """The dtype users train in: equal up to float32 rounding (measured: 3e-7 of the largest gradient)."""
    inputs = collate(tiny_tokenizer, make_items(True))
    model = load_model(tiny_encoder_dir, dtype=torch.float32)
    loss_plain, grads_plain = step(make_trainer(model, tiny_tokenizer, tmp_path), inputs)
    loss_cached, grads_cached = step(make_trainer(model, tiny_tokenizer, tmp_path, SUB), inputs)
    assert loss_cached == pytest.approx(loss_plain, rel=1e-5)
    assert_same_grads(grads_cached, grads_plain, rtol=1e-4)


@pytest.mark.parametrize("heads", ["dense", "dense,sparse", "colbert"])
def test_cached_step_with_head_subsets(tiny_encoder_dir, tiny_tokenizer, tmp_path, heads):
    inputs = collate(tiny_tokenizer, make_items(False))
    model = load_model(tiny_encoder_dir)
    loss_plain, grads_plain = step(make_trainer(model, tiny_tokenizer, tmp_path, heads=heads), inputs)
    loss_cached, grads_cached = step(make_trainer(model, tiny_tokenizer, tmp_path, SUB, heads=heads), inputs)
    assert loss_cached == pytest.approx(loss_plain, rel=1e-5)
    used = {"dense": [], "sparse": ["sparse_linear.weight"], "colbert": ["colbert_linear.weight"]}
    assert_same_grads(grads_cached, grads_plain, required=[n for h in heads.split(",") for n in used[h]])
    assert not any(n.startswith(("sparse_linear", "colbert_linear")) for n in grads_plain if n not in
                   [f"{h}_linear.{w}" for h in heads.split(",") for w in ("weight", "bias")])


def test_cached_step_with_left_padding(tiny_encoder_dir, tiny_tokenizer, tmp_path):
    """Left-padded batches (decoder-style tokenizers) must not be trimmed on the right."""
    inputs = collate(tiny_tokenizer, make_items(False), padding_side="left")
    assert not inputs["passage"]["attention_mask"][:, 0].all()
    model = load_model(tiny_encoder_dir)
    loss_plain, grads_plain = step(make_trainer(model, tiny_tokenizer, tmp_path), inputs)
    loss_cached, grads_cached = step(make_trainer(model, tiny_tokenizer, tmp_path, SUB), inputs)
    assert loss_cached == pytest.approx(loss_plain, rel=1e-5)
    assert_same_grads(grads_cached, grads_plain)


def test_gradient_accumulation_scaling(tiny_encoder_dir, tiny_tokenizer, tmp_path):
    inputs = collate(tiny_tokenizer, make_items(True))
    model = load_model(tiny_encoder_dir)
    results = {}
    for sub in (None, SUB):
        for accumulation in (1, 2):
            trainer = make_trainer(model, tiny_tokenizer, tmp_path, sub)
            trainer.current_gradient_accumulation_steps = accumulation
            results[sub, accumulation] = step(trainer, inputs)
    for sub in (None, SUB):
        loss1, grads1 = results[sub, 1]
        loss2, grads2 = results[sub, 2]
        assert loss2 == pytest.approx(loss1 / 2, rel=1e-6)
        assert_same_grads(grads2, {n: g / 2 for n, g in grads1.items()})
    assert_same_grads(results[SUB, 2][1], results[None, 2][1])


# ------------------------------------------------------------------------------------------- dropout on
def chunked_with_graph(trainer, model, inputs, size: int, seed: int) -> tuple[float, dict]:
    """What GradCache must reproduce when dropout is on: the loss of the batch encoded chunk by chunk (queries,
    then passages; each chunk trimmed to its longest text) in one graph, from the same random seed."""
    model.zero_grad(set_to_none=True)
    model.train()
    torch.manual_seed(seed)
    sides = {}
    for side in ("query", "passage"):
        features = inputs[side]
        full = features["attention_mask"].shape[1]
        parts = []
        for start in range(0, features["input_ids"].shape[0], size):
            chunk = {k: v[start : start + size] for k, v in features.items()}
            length = int(chunk["attention_mask"].sum(1).max())
            parts.append(trainer.training_loss.encode(model, {k: v[:, :length] for k, v in chunk.items()}))
        sides[side] = M3Output(
            dense=torch.cat([o.dense for o in parts]),
            sparse=torch.cat([F.pad(o.sparse, (0, full - o.sparse.shape[1])) for o in parts]),
            colbert=torch.cat([F.pad(o.colbert, (0, 0, 0, full - 1 - o.colbert.shape[1])) for o in parts]),
            colbert_mask=features["attention_mask"][:, 1:],
        )
    out = trainer.training_loss.loss_from_outputs(
        sides["query"], inputs["query"]["input_ids"], sides["passage"], inputs["passage"]["input_ids"], inputs
    )
    out.loss.backward()
    return float(out.loss.detach()), grads(model)


@pytest.mark.parametrize("teacher", [False, True])
def test_dropout_is_replayed(tiny_encoder_dir, tiny_tokenizer, tmp_path, teacher):
    inputs = collate(tiny_tokenizer, make_items(teacher))
    model = load_model(tiny_encoder_dir, dropout=0.3)
    cached = make_trainer(model, tiny_tokenizer, tmp_path, SUB)
    loss_ref, grads_ref = chunked_with_graph(cached, model, inputs, SUB, seed=5)
    loss_cached, grads_cached = step(cached, inputs, seed=5)
    assert loss_cached == pytest.approx(loss_ref, rel=1e-5)
    assert_same_grads(grads_cached, grads_ref)

    # the check has teeth: dropout changes the gradients, and a second forward without the replayed random
    # state gives different ones
    _, grads_other_seed = chunked_with_graph(cached, model, inputs, SUB, seed=6)
    assert not torch.allclose(grads_other_seed["colbert_linear.weight"], grads_ref["colbert_linear.weight"])
    original = gradcache.RandomState.restored
    gradcache.RandomState.restored = lambda self: contextlib.nullcontext()
    try:
        _, grads_unreplayed = step(cached, inputs, seed=5)
    finally:
        gradcache.RandomState.restored = original
    assert not torch.allclose(grads_unreplayed["colbert_linear.weight"], grads_ref["colbert_linear.weight"],
                              rtol=1e-4, atol=1e-6)


def test_random_state_after_cached_step_matches_one_forward(tiny_encoder_dir, tiny_tokenizer, tmp_path):
    """The replay leaves the global generator where a single pass over the chunks would (no extra draws)."""
    inputs = collate(tiny_tokenizer, make_items(False))
    model = load_model(tiny_encoder_dir, dropout=0.3)
    cached = make_trainer(model, tiny_tokenizer, tmp_path, SUB)
    chunked_with_graph(cached, model, inputs, SUB, seed=9)
    after_reference = torch.get_rng_state()
    step(cached, inputs, seed=9)
    assert torch.equal(torch.get_rng_state(), after_reference)


# -------------------------------------------------------------------------------------------- chunking
def test_chunks_trim_each_to_its_longest_text():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0],
                         [1, 1, 1, 1, 1, 1]])
    ids = torch.arange(30).view(5, 6) * mask
    features = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    chunks = gradcache._chunks(features, 2)
    assert [c["input_ids"].shape for c in chunks] == [(2, 5), (2, 3), (1, 6)]
    for start, chunk in zip((0, 2, 4), chunks):
        width = chunk["input_ids"].shape[1]
        for key in features:
            assert torch.equal(chunk[key], features[key][start : start + 2, :width])
        assert int(features["attention_mask"][start : start + 2, width:].sum()) == 0  # only padding dropped


def test_chunks_keep_left_padded_columns():
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]])
    features = {"input_ids": torch.arange(12).view(3, 4) * mask, "attention_mask": mask}
    for chunk, start in zip(gradcache._chunks(features, 2), (0, 2)):
        assert torch.equal(chunk["input_ids"], features["input_ids"][start : start + 2])
