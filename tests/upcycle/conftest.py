"""Fixtures of the upcycling tests; they share tests/checkpoints' Hugging Face parity helpers
(``import hf_util``)."""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from upcycle_helpers import BASE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checkpoints"))


@pytest.fixture
def tokens():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, BASE["vocab_size"], size=(2, 9))
  valid = np.ones(ids.shape, bool)
  valid[1, :3] = False  # left padding
  return jnp.asarray(ids, jnp.int32), jnp.asarray(valid)
