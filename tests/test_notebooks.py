"""The notebooks under notebooks/ run top to bottom on tiny parameters, without errors or warnings.

Each notebook's cell tagged "parameters" is replaced by the test's values; the kernel is the project's own
interpreter (a kernelspec written to a temporary directory), so no global Jupyter install is needed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from serving.recommender import Recommender
from training.bundle import load_bundle
from training.pipeline import TrainResult
from training.settings import TrainingSettings

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "sharefeed-tests"
CELL_TIMEOUT_S = 120
TINY_DEMO = {"users": 200, "items": 100, "categories": 4, "days": 14}


@pytest.fixture(scope="session")
def kernel_specs(tmp_path_factory: pytest.TempPathFactory) -> KernelSpecManager:
    """A kernelspec that starts ipykernel with this interpreter (the project venv), wherever Jupyter is."""
    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(kernels / KERNEL)
    return KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)


def _execute(name: str, params: dict[str, Any], specs: KernelSpecManager) -> nbformat.NotebookNode:
    """Run `notebooks/<name>` with its parameter cell replaced; any cell error fails the test."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    assert tagged[0].cell_type == "code"
    tagged[0].source = "\n".join(f"{key} = {value!r}" for key, value in params.items())
    km = AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(cleanup_kc=True)  # the client does not own `km`: shut the kernel down explicitly
    return nb


def _tagged(nb: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}"
    return cells[0]


def _text(cell: nbformat.NotebookNode) -> str:
    """Everything a cell printed or displayed as plain text."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif "data" in output:
            parts.append(output.data.get("text/plain", ""))
    return "\n".join(parts)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _assert_clean(nb: nbformat.NotebookNode) -> None:
    """No cell wrote to stderr: warnings from our code or a library show up there."""
    stderr = [o.text for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, "notebook wrote to stderr:\n" + "\n".join(stderr)


def test_committed_notebooks_carry_no_outputs() -> None:
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs, f"{path.name}: strip outputs"
                assert cell.execution_count is None, f"{path.name}: clear execution counts"


def test_exploration_generates_and_explores_demo_data(
    kernel_specs: KernelSpecManager, tmp_path: Path
) -> None:
    data_dir = tmp_path / "demo"  # missing, so the notebook generates it from DEMO_CONFIG
    nb = _execute("data_exploration.ipynb", {"DATA_DIR": str(data_dir), "DEMO_CONFIG": TINY_DEMO}, kernel_specs)
    _assert_clean(nb)
    assert (data_dir / "events.parquet").is_file()
    summary = _text(_tagged(nb, "summary"))
    for table in ("events", "items", "users", "social"):
        assert table in summary
    assert "purchase" in _text(_tagged(nb, "event-types"))
    funnel = _text(_tagged(nb, "share-funnel"))
    assert "referred purchases" in funnel
    assert "skipped" not in funnel
    assert "followers" in _text(_tagged(nb, "social"))
    # type mix, daily counts, activity, popularity, categories, repurchase, funnel, degrees
    assert _images(nb) == 8


def test_evaluation_reads_the_run_and_serves_a_user(
    kernel_specs: KernelSpecManager, trained: TrainResult, training_settings: TrainingSettings, tmp_path: Path
) -> None:
    # RUN_ID is explicit: other tests add runs to the same store, so "the latest" need not be this one.
    params = {"TRACKING_URI": training_settings.tracking_uri, "EXPERIMENT": training_settings.mlflow_experiment,
              "RUN_ID": trained.run_id, "BUNDLE": None, "DOWNLOAD_DIR": str(tmp_path), "USER_ID": None,
              "FEED_SIZE": 10}
    nb = _execute("evaluation.ipynb", params, kernel_specs)
    _assert_clean(nb)
    assert trained.run_id in _text(_tagged(nb, "run"))
    assert (tmp_path / trained.run_id / "bundle" / "manifest.json").is_file()  # downloaded from MLflow
    table = _text(_tagged(nb, "metrics-table"))
    models = re.search(r"^models: (.+)$", table, re.MULTILINE)
    assert models is not None
    assert set(models[1].split(", ")) == set(trained.report.rows)
    for row in trained.report.rows.values():
        for metric in row:
            assert metric in table
    assert f"{trained.report.users:,}" in _text(_tagged(nb, "holdout"))
    ks = {m.rsplit("_at_", 1)[1] for row in trained.report.rows.values() for m in row if re.fullmatch(r".+_at_\d+", m)}
    assert _images(nb) == 2 + (len(ks) > 1)  # NDCG/Recall bars, stage times, metrics against K if several K

    # The feed shown is the one serving gives that user, rank by rank.
    shown = _text(_tagged(nb, "user-feed"))
    user = re.search(r"^user (\S+): (\d+) items in recent history; feed of 10 \(personalized\)", shown,
                     re.MULTILINE)
    assert user is not None, shown
    assert int(user[2]) > 0
    expected = Recommender(load_bundle(trained.bundle_path)).feed(user[1], 10)
    assert len(expected.items) == 10
    for rank, item in enumerate(expected.items, start=1):
        assert re.search(rf"^{rank}\s.*\b{item.item_id}\b", shown, re.MULTILINE), f"rank {rank}: {item.item_id}"
