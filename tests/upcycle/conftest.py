"""Fixtures of the upcycling tests."""

import jax.numpy as jnp
import numpy as np
import pytest

from upcycle_helpers import BASE


@pytest.fixture
def tokens():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, BASE["vocab_size"], size=(2, 9))
  valid = np.ones(ids.shape, bool)
  valid[1, :3] = False  # left padding
  return jnp.asarray(ids, jnp.int32), jnp.asarray(valid)
