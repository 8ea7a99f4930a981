"""Export an M3 model for serving: one ONNX graph with all three heads, or sentence-transformers directories.

ONNX (:func:`export_onnx`): ``model.onnx`` takes ``input_ids`` and ``attention_mask`` ``[B, L]`` (int64, any
batch and length) and returns the :class:`~flagm3.modeling_m3.M3Output` fields ``dense`` [B, H],
``token_weights`` [B, L] (as the graph output ``sparse``) and ``colbert`` [B, L-1, D], computed by
:meth:`M3Model.forward` itself. Beside it: the tokenizer and
``flagm3_onnx.json`` (the M3 config and the graph's names), which :class:`flagm3.onnx_model.OnnxM3Model` and
``M3Embedder(DIR)`` read. With a :class:`~flagm3.compression.Compression` the graph gives the truncated
(renormalised) dense and ColBERT vectors and the JSON keeps the settings, which ``M3Embedder(DIR)`` applies
(ColBERT pooling and sparse pruning run outside the graph).

sentence-transformers (:func:`export_sentence_transformers`): the dense head as a ``SentenceTransformer``
(encoder, pooling as configured, Normalize when the model normalises) in the output directory, and the
ColBERT head as a ``MultiVectorEncoder`` in ``colbert/`` (Dense projection, Normalize, the CLS token masked
out, MeanMaxSim) when the installed sentence-transformers has one, and the sparse head as a ``SparseEncoder`` in
``sparse/`` (:class:`flagm3.st_modules.M3SparsePooling`). Compression dimensions become a slicing ``Dense``
(dense head) and the ColBERT projection's first rows, before Normalize. Heads it cannot express are listed in
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
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .compression import Compression, truncate
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
    """``M3Model.forward`` with positional inputs and a tuple of the three head outputs (what ONNX traces), the
    dense and ColBERT vectors cut to ``compression``'s dimensions."""

    def __init__(self, model: M3Model, compression: Optional[Compression] = None) -> None:
        super().__init__()
        self.model = model
        self.compression = compression or Compression()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        normalize = self.model.config.normalize_embeddings
        return (truncate(out.dense, self.compression.dense_dim, normalize), out.token_weights,
                truncate(out.colbert, self.compression.colbert_dim, normalize))


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
                source: Any = None, compression: Optional[Compression] = None) -> str:
    """Write ``model.onnx`` (float32, or int8 dynamic quantisation with ``quantize``), the tokenizer and
    ``flagm3_onnx.json`` to ``output``; return the graph's path. ``source``: the model's directory, whose
    fitted hybrid weights are copied along. ``compression``: see the module's docstring."""
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
        torch.onnx.export(_ThreeHeads(model, compression), args, float_graph, dynamo=False, input_names=list(ONNX_INPUTS),
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
        "compression": (compression or Compression()).to_dict(),
    }
    with open(os.path.join(output, ONNX_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    copy_side_files(source, output)
    return graph


def is_onnx_export(path: Any) -> bool:
    """Whether ``path`` is a directory written by :func:`export_onnx`."""
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, ONNX_CONFIG_FILE))


def export_sentence_transformers(model: M3Model, tokenizer: Any, output: str, source: Any = None,
                                 compression: Optional[Compression] = None) -> Dict[str, Any]:
    """Write the dense head as a ``SentenceTransformer`` to ``output``, the sparse head as a ``SparseEncoder`` to
    ``output/sparse`` and, where the installed sentence-transformers has ``MultiVectorEncoder``, the ColBERT head
    to ``output/colbert``; ``compression``'s dimensions apply (pooling and pruning are encode-time options of
    ``M3Embedder``: ``SparseEncoder(..., max_active_dims=k)`` prunes as ``sparse_top_k``).

    Returns ``{"written": {head: directory}, "left_out": {head: reason}}`` (also saved as flagm3_export.json).
    """
    try:
        import sentence_transformers as st
        from sentence_transformers.base.modules import Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError as err:
        raise ImportError("sentence-transformers export needs sentence-transformers>=6: "
                          "pip install 'flagm3[deploy]'") from err
    from sentence_transformers.base.modules.dense import Dense

    from .st_modules import M3SparsePooling

    config = model.config
    compression = compression or Compression()
    os.makedirs(output, exist_ok=True)
    written: Dict[str, str] = {}
    left_out: Dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}
        model.encoder.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

        def normalize(**kwargs: Any) -> List[nn.Module]:
            return [Normalize(**kwargs)] if config.normalize_embeddings else []

        hidden = config.encoder_hidden_size
        modules = [Transformer(tmp), Pooling(hidden, pooling_mode=ST_POOLING[config.pooling])]
        dense_dim = compression.dense_dim
        if dense_dim is not None and dense_dim < hidden:  # keep the first dims: an exact slicing projection
            modules.append(Dense(hidden, dense_dim, bias=False, activation_function=nn.Identity(),
                                 init_weight=torch.eye(hidden)[:dense_dim].clone()))
        st.SentenceTransformer(modules=modules + normalize(), device="cpu").save(output)
        written["dense"] = output
        sparse_dir = os.path.join(output, "sparse")
        st.SparseEncoder(modules=[Transformer(tmp), M3SparsePooling.from_m3(model)], device="cpu",
                         similarity_fn_name="dot").save(sparse_dir)
        written["sparse"] = sparse_dir
        try:
            from sentence_transformers import MultiVectorEncoder
            from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask
        except ImportError:
            left_out["colbert"] = f"sentence-transformers {st.__version__} has no MultiVectorEncoder (needs >= 6)"
        else:
            linear = model.colbert_linear
            rows = min(compression.colbert_dim or linear.out_features, linear.out_features)  # first dims only
            dense = Dense(linear.in_features, rows, bias=True, activation_function=nn.Identity(),
                          init_weight=linear.weight.detach().float().cpu()[:rows].clone(),
                          init_bias=linear.bias.detach().float().cpu()[:rows].clone(),
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
    summary = {"written": written, "left_out": left_out, "compression": compression.to_dict(),
               "sentence_transformers_version": st.__version__}
    Path(output, ST_EXPORT_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
