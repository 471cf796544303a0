"""examples/quickstart.ipynb runs top to bottom (nbclient + ipykernel), so it never rots."""

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is in the [test] extra; "
                               "pip install -e '.[test]' to run the notebook")
nbclient = pytest.importorskip("nbclient", reason="nbclient is in the [test] extra; "
                               "pip install -e '.[test]' to run the notebook")
pytest.importorskip("ipykernel", reason="ipykernel is in the [test] extra")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def _outputs(cell, kind: str) -> str:
  texts = []
  for out in cell.get("outputs", []):
    if kind == "text" and out.get("output_type") == "stream":
      texts.append(out.get("text", ""))
    elif kind in out.get("data", {}):
      texts.append(str(out["data"][kind]))
  return "".join(texts)


def test_quickstart_runs_top_to_bottom(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
      "commit the notebook without outputs"
  # One CPU device, as on a Colab CPU runtime (not the suite's 8 fake devices).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  start = time.perf_counter()
  client.execute(env=env)
  print(f"quickstart.ipynb: {time.perf_counter() - start:.0f} s")
  text = "".join(_outputs(c, "text") for c in nb.cells if c.cell_type == "code")
  assert "['config.json', 'model.safetensors']" in text
  assert "reloaded adapters give identical predictions: True" in text
  assert "rows sum to 1: True" in text
  assert "cannot be folded" in text
  images = sum(bool(_outputs(c, "image/png")) for c in nb.cells if c.cell_type == "code")
  assert images == 2  # the loss curve and the routing heatmap
  loss_line = next(line for line in text.splitlines() if line.startswith("loss "))
  first, last = (float(x) for x in loss_line.split()[1:4:2])
  assert last < first, loss_line
