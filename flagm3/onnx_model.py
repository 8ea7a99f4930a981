"""Run an exported ONNX M3 graph (:func:`flagm3.export.export_onnx`) with onnxruntime, as an ``M3Model`` stand-in.

:class:`OnnxM3Model` is called like :meth:`M3Model.forward` (``input_ids``/``attention_mask`` [B, L] tensors,
``heads``) and returns an :class:`~flagm3.modeling_m3.M3Output` of CPU float32 tensors, so ``M3Embedder``
encodes and scores through it unchanged.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any, Iterable, Optional

import numpy as np
import torch
from torch import Tensor

from .compression import Compression
from .configuration_m3 import HEADS, M3Config
from .export import ONNX_CONFIG_FILE
from .modeling_m3 import CheckpointError, M3Output, tokens_after_first


class OnnxM3Model:
    """An onnxruntime session over ``DIR/model.onnx`` with the M3 config of ``DIR/flagm3_onnx.json``.

    ``threads``: onnxruntime intra-op threads (0: as many as torch uses, ``torch.get_num_threads()``, so
    both backends compare on equal terms and follow ``OMP_NUM_THREADS``). ``providers``: onnxruntime execution providers
    (default: CUDA when :meth:`to` is given a CUDA device and onnxruntime has it, else CPU).
    """

    training = False

    def __init__(self, path: str, threads: int = 0, providers: Optional[list] = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ImportError("running an ONNX export needs onnxruntime: pip install 'flagm3[deploy]'") from err
        config_file = os.path.join(path, ONNX_CONFIG_FILE)
        try:
            with open(config_file, encoding="utf-8") as f:
                meta = json.load(f)
            self.config = M3Config.from_dict(meta["m3_config"])
            self.graph = os.path.join(path, meta["onnx_file"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{config_file}: not a flagm3 ONNX export config ({err})") from err
        if not os.path.isfile(self.graph):
            raise CheckpointError(f"{self.graph} is missing (named by {config_file})")
        self.meta = meta
        self._ort = ort
        self._threads = threads
        self._providers = providers or ["CPUExecutionProvider"]
        self._session = None

    @property
    def session(self) -> Any:
        if self._session is None:
            options = self._ort.SessionOptions()
            options.intra_op_num_threads = self._threads or torch.get_num_threads()
            options.inter_op_num_threads = 1
            self._session = self._ort.InferenceSession(self.graph, options, providers=self._providers)
        return self._session

    # ---------------------------------------------------------------- what M3Embedder uses of a model
    def to(self, device: Any) -> OnnxM3Model:
        """Pick the execution provider for ``device`` (CUDA when asked and available, else CPU)."""
        device = torch.device(device)
        if device.type == "cuda" and "CUDAExecutionProvider" in self._ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        if providers != self._providers:
            self._providers, self._session = providers, None
        return self

    def parameters(self) -> Iterable[Tensor]:
        yield torch.empty(0)  # device probe: CPU tensors come back

    def eval(self) -> OnnxM3Model:
        return self

    def train(self, mode: bool = True) -> OnnxM3Model:
        if mode:
            raise RuntimeError("an ONNX export cannot be trained")
        return self

    def get_input_embeddings(self) -> Any:
        return SimpleNamespace(num_embeddings=int(self.config.backbone_config.vocab_size))

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Optional[Tensor] = None,
                 heads: Iterable[str] = HEADS) -> M3Output:
        """Run the graph on ``input_ids``/``attention_mask`` [B, L]; ``token_type_ids`` must be zero (one
        segment, which is what the graph was traced with)."""
        if token_type_ids is not None and bool(token_type_ids.any()):
            raise ValueError("the ONNX graph takes one text segment: token_type_ids must be all zero")
        heads = set(heads)
        feeds = {"input_ids": np.ascontiguousarray(input_ids.cpu().numpy(), dtype=np.int64),
                 "attention_mask": np.ascontiguousarray(attention_mask.cpu().numpy(), dtype=np.int64)}
        names = [h for h in HEADS if h in heads]
        values = dict(zip(names, self.session.run(names, feeds)))
        as_tensor = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in values.items()}
        return M3Output(dense=as_tensor.get("dense"), token_weights=as_tensor.get("sparse"),
                        colbert=as_tensor.get("colbert"),
                        colbert_mask=tokens_after_first(attention_mask).cpu() if "colbert" in heads else None)


def read_export_compression(path: Any) -> Optional[Compression]:
    """The :class:`Compression` an ONNX export in ``path`` was written with (``None``: not an export, or none)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(os.path.join(path, ONNX_CONFIG_FILE)):
        return None
    file = os.path.join(path, ONNX_CONFIG_FILE)
    with open(file, encoding="utf-8") as f:
        values = json.load(f).get("compression") or {}
    try:
        return Compression.from_dict(values) if values else None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: field 'compression': {err}") from err
