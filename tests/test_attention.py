"""Recomputed attention (flagm3.attention): the outputs and gradients of ``sdpa`` with dropout on, without
keeping the [B, heads, L, L] tensors for the backward pass, never saved; attention dropout set per recipe."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SENTENCES

from flagm3 import M3Model
from flagm3.attention import RECOMPUTE_SDPA, set_attention_dropout, use_recompute_attention
from flagm3.compat import TRANSFORMERS_5
from flagm3.recipe import prepare_for_training
from flagm3.training_args import M3TrainingArguments

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def load(encoder_dir, dropout: float = 0.1) -> M3Model:
    torch.manual_seed(0)
    return M3Model.from_encoder(str(encoder_dir), colbert_dim=16, attention_probs_dropout_prob=dropout,
                                hidden_dropout_prob=dropout, attn_implementation="sdpa").double()


def loss_and_grads(model: M3Model, batch: dict, seed: int = 7) -> tuple[torch.Tensor, dict, int]:
    """Loss of all heads, parameter gradients, and the bytes autograd saved for the backward pass."""
    model.train()
    model.zero_grad(set_to_none=True)
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
        loss = out.dense.sum() + out.sparse.pow(2).sum() + (out.colbert * torch.linspace(-1, 1, 16)).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)


NO_INTERFACE = "transformers 4.x's BERT attention does not go through AttentionInterface: no recomputed attention"


@pytest.mark.skipif(not TRANSFORMERS_5, reason=NO_INTERFACE)
def test_same_outputs_and_gradients_with_dropout_and_less_saved(tiny_encoder_dir, tiny_tokenizer):
    batch = dict(tiny_tokenizer([" ".join(SENTENCES[:4]), SENTENCES[5], "wing"], padding=True, return_tensors="pt"))
    length = batch["input_ids"].shape[1]
    model = load(tiny_encoder_dir)
    loss_sdpa, grads_sdpa, saved_sdpa = loss_and_grads(model, batch)
    assert use_recompute_attention(model.encoder)
    assert model.encoder.config._attn_implementation == RECOMPUTE_SDPA
    loss_re, grads_re, saved_re = loss_and_grads(model, batch)

    torch.testing.assert_close(loss_re, loss_sdpa, rtol=1e-12, atol=0)
    assert grads_re.keys() == grads_sdpa.keys()
    for name in grads_sdpa:
        torch.testing.assert_close(grads_re[name], grads_sdpa[name], rtol=1e-10, atol=1e-12, msg=name)
    # the dropout really acted: another seed gives another loss
    assert not torch.equal(loss_and_grads(model, batch, seed=8)[0], loss_re)
    # per layer at least the probabilities and the dropped probabilities ([B, heads, L, L] float64) are not kept
    layers, heads = model.config.backbone_config.num_hidden_layers, model.config.backbone_config.num_attention_heads
    square = 3 * heads * length * length * 8
    assert saved_sdpa - saved_re >= layers * 2 * square


def test_inference_and_no_grad_are_unchanged(tiny_encoder_dir, tiny_tokenizer):
    batch = dict(tiny_tokenizer(SENTENCES[:3], padding=True, return_tensors="pt"))
    model = load(tiny_encoder_dir).eval()
    with torch.no_grad():
        before = model(**batch)
        use_recompute_attention(model.encoder)
        after = model(**batch)
    torch.testing.assert_close(after.dense, before.dense)
    torch.testing.assert_close(after.colbert, before.colbert)


def test_recipe_attention_settings(tiny_encoder_dir, tmp_path):
    def trainer_attention(**overrides) -> tuple[str, list[float]]:
        model = load(tiny_encoder_dir)
        args = M3TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, **overrides)
        encoder = prepare_for_training(model, args).encoder
        dropouts = [layer.attention.self.dropout.p for layer in encoder.encoder.layer]
        assert all(layer.attention.output.dropout.p == 0.1 for layer in encoder.encoder.layer)  # hidden: kept
        return encoder.config._attn_implementation, dropouts

    assert trainer_attention() == ("sdpa", [0.0, 0.0])  # the flagm3 recipe: no dropout on attention probabilities
    assert trainer_attention(loss_preset="bge-m3") == ("sdpa", [0.1, 0.1])  # FlagEmbedding's: the encoder's own
    assert trainer_attention(attention_dropout=0.0, loss_preset="bge-m3") == ("sdpa", [0.0, 0.0])
    assert trainer_attention(loss_preset="bge-m3", attention_dropout=0.05) == ("sdpa", [0.05, 0.05])
    recompute = RECOMPUTE_SDPA if TRANSFORMERS_5 else "sdpa"  # 4.x: left as it is, with a warning (NO_INTERFACE)
    assert trainer_attention(recompute_attention=True, attention_dropout=0.1) == (recompute, [0.1, 0.1])
    # whole layers are recomputed already
    assert trainer_attention(recompute_attention=True, gradient_checkpointing=True)[0] == "sdpa"


def test_set_attention_dropout_changes_the_output_only_in_training(tiny_encoder_dir, tiny_tokenizer):
    batch = dict(tiny_tokenizer(SENTENCES[:3], padding=True, return_tensors="pt"))
    model = load(tiny_encoder_dir, dropout=0.0).train()
    with torch.no_grad():
        reference = model(**batch).dense
        assert set_attention_dropout(model.encoder, 0.5) == 2
        model.train()
        torch.manual_seed(0)
        dropped = model(**batch).dense
        model.eval()
        evaluated = model(**batch).dense
    assert not torch.allclose(dropped, reference)
    torch.testing.assert_close(evaluated, reference)
    assert model.config.backbone_config.attention_probs_dropout_prob == 0.0  # the saved config is untouched


def test_recompute_attention_is_never_saved(tiny_encoder_dir, tmp_path):
    model = load(tiny_encoder_dir)
    use_recompute_attention(model.encoder)
    model.save_pretrained(str(tmp_path / "saved"))
    assert RECOMPUTE_SDPA not in (tmp_path / "saved" / "config.json").read_text()
    json.loads((tmp_path / "saved" / "config.json").read_text())
    reloaded = M3Model.from_pretrained(str(tmp_path / "saved"))
    assert reloaded.encoder.config._attn_implementation != RECOMPUTE_SDPA
