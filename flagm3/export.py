"""Export an M3 model for serving: one ONNX graph with all three heads, or sentence-transformers directories.

ONNX (:func:`export_onnx`): ``model.onnx`` takes ``input_ids`` and ``attention_mask`` ``[B, L]`` (int64, any
batch and length) and returns the :class:`~flagm3.modeling_m3.M3Output` fields ``dense`` [B, H],
``token_weights`` [B, L] (as the graph output ``sparse``) and ``colbert`` [B, L-1, D], computed by
:meth:`M3Model.forward` itself. Beside it: the tokenizer and
``flagm3_onnx.json`` (the M3 config and the graph's names), which :class:`flagm3.onnx_model.OnnxM3Model` and
``M3Embedder(DIR)`` read.

sentence-transformers (:func:`export_sentence_transformers`): the dense head as a ``SentenceTransformer``
(encoder, pooling as configured, Normalize when the model normalises) in the output directory, and the
ColBERT head as a ``MultiVectorEncoder`` in ``colbert/`` (Dense projection, Normalize, the CLS token masked
out, MeanMaxSim) when the installed sentence-transformers has one. Heads it cannot express are listed in
``flagm3_export.json`` and in the returned summary.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import nn

from .configuration_m3 import HEADS
from .hybrid_weights import HYBRID_WEIGHTS_FILE
from .modeling_m3 import M3Model

ONNX_CONFIG_FILE = "flagm3_onnx.json"
ONNX_FILE = "model.onnx"
ONNX_INPUTS = ("input_ids", "attention_mask")
ONNX_OUTPUTS = HEADS
ST_EXPORT_FILE = "flagm3_export.json"
ST_POOLING = {"cls": "cls", "mean": "mean", "last_token": "lasttoken"}
SIDE_FILES = (HYBRID_WEIGHTS_FILE,)  # fitted hybrid weights beside the model travel with its exports


class _ThreeHeads(nn.Module):
    """``M3Model.forward`` with positional inputs and a tuple of the three head outputs (what ONNX traces)."""

    def __init__(self, model: M3Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.dense, out.token_weights, out.colbert


def copy_side_files(source: Any, output: str) -> List[str]:
    """Copy :data:`SIDE_FILES` found in the directory ``source`` (if it is one) to ``output``."""
    copied = []
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        for name in SIDE_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy(os.path.join(source, name), os.path.join(output, name))
                copied.append(name)
    return copied


def export_onnx(model: M3Model, tokenizer: Any, output: str, quantize: bool = False, opset: int = 17,
                source: Any = None) -> str:
    """Write ``model.onnx`` (float32, or int8 dynamic quantisation with ``quantize``), the tokenizer and
    ``flagm3_onnx.json`` to ``output``; return the graph's path. ``source``: the model's directory, whose
    fitted hybrid weights are copied along."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError as err:
        raise ImportError("ONNX export needs onnx: pip install 'flagm3[deploy]'") from err
    os.makedirs(output, exist_ok=True)
    weight = model.sparse_linear.weight
    if weight.dtype != torch.float32 or weight.device.type != "cpu":  # trace a float32 CPU copy
        model = copy.deepcopy(model).float().cpu()
    was_training = model.training
    model.eval()
    sample = tokenizer(["an example passage to trace", "a query"], padding=True, return_tensors="pt")
    args = (sample["input_ids"], sample["attention_mask"])
    graph = os.path.join(output, ONNX_FILE)
    axes = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
            "dense": {0: "batch"}, "sparse": {0: "batch", 1: "length"}, "colbert": {0: "batch", 1: "tokens"}}
    float_graph = graph if not quantize else os.path.join(output, "model.float32.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        # tracing notes on shape-dependent Python branches of the encoder (the mask code): the graph is
        # checked on other batch sizes and lengths in the tests
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*advanced indexing.*")
        torch.onnx.export(_ThreeHeads(model), args, float_graph, dynamo=False, input_names=list(ONNX_INPUTS),
                          output_names=list(ONNX_OUTPUTS), dynamic_axes=axes, opset_version=opset)
    model.train(was_training)
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(float_graph, graph, weight_type=QuantType.QInt8)
        os.remove(float_graph)
    tokenizer.save_pretrained(output)
    meta = {
        "format": "flagm3-onnx",
        "onnx_file": ONNX_FILE,
        "inputs": list(ONNX_INPUTS),
        "outputs": list(ONNX_OUTPUTS),
        "quantization": "int8-dynamic" if quantize else None,
        "opset": opset,
        "m3_config": model.config.to_dict(),
    }
    with open(os.path.join(output, ONNX_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    copy_side_files(source, output)
    return graph


def is_onnx_export(path: Any) -> bool:
    """Whether ``path`` is a directory written by :func:`export_onnx`."""
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, ONNX_CONFIG_FILE))


def export_sentence_transformers(model: M3Model, tokenizer: Any, output: str, source: Any = None) -> Dict[str, Any]:
    """Write the dense head as a ``SentenceTransformer`` to ``output`` and, where the installed
    sentence-transformers has ``MultiVectorEncoder``, the ColBERT head to ``output/colbert``.

    Returns ``{"written": {head: directory}, "left_out": {head: reason}}`` (also saved as flagm3_export.json).
    """
    try:
        import sentence_transformers as st
        from sentence_transformers.base.modules import Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError as err:
        raise ImportError("sentence-transformers export needs sentence-transformers>=6: "
                          "pip install 'flagm3[deploy]'") from err
    config = model.config
    os.makedirs(output, exist_ok=True)
    written: Dict[str, str] = {}
    left_out: Dict[str, str] = {
        "sparse": ("sentence-transformers' SparseEncoder pools vocabulary-sized MLM logits (SPLADE); it has no "
                   "module for a per-token ReLU(Linear(hidden, 1)) weight max-pooled by token id"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}
        model.encoder.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

        def normalize(**kwargs: Any) -> List[nn.Module]:
            return [Normalize(**kwargs)] if config.normalize_embeddings else []

        modules = [Transformer(tmp), Pooling(config.encoder_hidden_size, pooling_mode=ST_POOLING[config.pooling])]
        st.SentenceTransformer(modules=modules + normalize(), device="cpu").save(output)
        written["dense"] = output
        try:
            from sentence_transformers import MultiVectorEncoder
            from sentence_transformers.base.modules.dense import Dense
            from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask
        except ImportError:
            left_out["colbert"] = f"sentence-transformers {st.__version__} has no MultiVectorEncoder (needs >= 6)"
        else:
            linear = model.colbert_linear
            dense = Dense(linear.in_features, linear.out_features, bias=True, activation_function=nn.Identity(),
                          init_weight=linear.weight.detach().float().cpu().clone(),
                          init_bias=linear.bias.detach().float().cpu().clone(),
                          module_input_name="token_embeddings")
            # M3 drops the first (CLS) token's vector on both sides: the CLS id occurs only there.
            mask = MultiVectorMask(skiplist_words=[tokenizer.cls_token or tokenizer.bos_token],
                                   skiplist_tasks=["query", "document"])
            colbert_dir = os.path.join(output, "colbert")
            mve = MultiVectorEncoder(modules=[Transformer(tmp), dense,
                                              *normalize(module_input_name="token_embeddings"), mask],
                                     similarity_fn_name="meanmaxsim", device="cpu")
            mve.save(colbert_dir)
            written["colbert"] = colbert_dir
    copy_side_files(source, output)
    summary = {"written": written, "left_out": left_out,
               "sentence_transformers_version": st.__version__}
    Path(output, ST_EXPORT_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
