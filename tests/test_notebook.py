"""notebooks/lightning_to_federated.ipynb runs top to bottom (a real federation, the local-only baselines, the plot)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("lightning")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_lightning_to_federated_notebook_runs(monkeypatch, tmp_path):
    from jupyter_client.manager import KernelManager

    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figure
    nb = nbformat.read(NOTEBOOKS / "lightning_to_federated.ipynb", as_version=4)
    # IPC sockets in tmp_path: the kernel opens no TCP port at all
    km = KernelManager(kernel_name="python3", transport="ipc", ip=str(tmp_path / "kernel"))
    nbclient.NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "+import fl_plugins.lightning as flare" in text and "+    flare.patch(trainer)" in text
    glob = float(text.split("global model: ")[1].split()[0])
    alone = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if " alone: " in line]
    assert len(alone) == 3 and all(glob > a for a in alone), text
    plots = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert plots, "the last cell draws the per-round metrics"
