"""The model tests share tests/checkpoints' Hugging Face parity helpers (``import hf_util``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoints"))
