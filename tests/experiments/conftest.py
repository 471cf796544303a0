"""The experiments' tests: ``experiments`` is importable from the repository root
(pyproject's pytest ``pythonpath``); the PEFT sweep's tests share tests/peft's helpers."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "peft"))
