"""Every notebooks/*.ipynb runs top to bottom in smoke mode (LORAJAX_SMOKE=1).
"""

import os
import pathlib

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
  # The kernel inherits this environment: smoke settings, and `import
  # lorajax` from the repository root without installing it.
  monkeypatch.setenv("LORAJAX_SMOKE", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv(
      "PYTHONPATH",
      os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                      if p))
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": str(path.parent)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
