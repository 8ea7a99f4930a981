"""Helpers shared by the reference scripts (run by the FlagEmbedding venv's python, never imported by flagm3).

These scripts run FlagEmbedding 1.4.2 (transformers<5) in its own virtual environment; see
`.ci/setup_reference_env.sh`. What they rely on in a model directory (BGE-M3 layout):

- `config.json` + weights loadable by `transformers.AutoModel` (4.x) and a tokenizer loadable by
  `AutoTokenizer`;
- `colbert_linear.pt` and `sparse_linear.pt` (state dicts of `nn.Linear(hidden, dim)` and
  `nn.Linear(hidden, 1)`); FlagEmbedding silently initialises the heads at random when they are missing,
  so the scripts refuse a directory without them (unless told the heads are meant to be new);
- the tokenizer has an `eos_token`. FlagEmbedding drops the ids of cls/eos/pad/unk tokens from the sparse
  weights and its training sparse head indexes with `tokenizer.eos_token_id` (None crashes it). BERT
  tokenizers have no eos token: the fixtures set `eos_token` to the SEP token (`[SEP]`) in the saved
  tokenizer, which makes the dropped set {CLS, SEP, PAD, UNK} (note: not MASK).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np


def fail(message: str) -> None:
    """Print an error to stderr and exit with status 2."""
    print(f"ERROR: {message}", file=sys.stderr)
    sys.exit(2)


def check_model_dir(model_dir: str, require_heads: bool = True) -> None:
    """Exit with a clear message when `model_dir` lacks what FlagEmbedding needs."""
    if not os.path.isdir(model_dir):
        fail(f"model directory not found: {model_dir}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        fail(f"{model_dir}/config.json missing: not a Hugging Face model directory")
    if require_heads:
        for name in ("colbert_linear.pt", "sparse_linear.pt"):
            if not os.path.isfile(os.path.join(model_dir, name)):
                fail(
                    f"{model_dir}/{name} missing: FlagEmbedding would initialise that head at random "
                    "(BGE-M3 layout needs colbert_linear.pt and sparse_linear.pt)"
                )


def check_eos(tokenizer: Any, model_dir: str) -> None:
    """FlagEmbedding needs `tokenizer.eos_token` (BERT tokenizers: set it to the SEP token)."""
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        fail(
            f"tokenizer in {model_dir} has no eos_token: FlagEmbedding 1.4.2 needs one (for a BERT "
            f"tokenizer save it with eos_token='{tokenizer.sep_token}', the SEP token)"
        )


def dropped_special_ids(tokenizer: Any) -> list[int]:
    """Token ids FlagEmbedding removes from lexical weights: cls, eos, pad, unk (as in its encode)."""
    ids = set()
    for name in ("cls_token", "eos_token", "pad_token", "unk_token"):
        if name in tokenizer.special_tokens_map:
            ids.add(int(tokenizer.convert_tokens_to_ids(tokenizer.special_tokens_map[name])))
    return sorted(ids)


def to_jsonable(obj: Any) -> Any:
    """Recursively convert numpy / torch values into plain Python for `json.dump`."""
    if hasattr(obj, "detach"):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def write_json(path: str, payload: dict) -> None:
    """Write `payload` as JSON (creating parent directories)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_jsonable(payload), f)


def read_json(path: str) -> dict:
    """Read a JSON object; exit with the file and the reason when it is not valid."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"cannot read JSON input {path}: {e}")
    if not isinstance(data, dict):
        fail(f"{path}: expected a JSON object at top level, got {type(data).__name__}")
    return data
