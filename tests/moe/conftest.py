"""Shared fixtures for the MoE tests.

``init_params`` builds a module's parameters from numpy random numbers in the
shapes ``jax.eval_shape(module.init, ...)`` reports: XLA's CPU compile of
flax init (one threefry + truncated normal per parameter) costs seconds per
model, which would dominate these tests.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest


def _init_params(module, *args, seed: int = 0, scale: float = 1.0, **kwargs):
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)["params"])
  rng = np.random.default_rng(seed)

  def make(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:  # norm scales
      return np.ones(s.shape, s.dtype)
    fan_in = s.shape[-2] if len(s.shape) >= 2 else 1
    return (rng.standard_normal(s.shape) * scale / np.sqrt(fan_in)).astype(s.dtype)

  return {"params": jax.tree_util.tree_map_with_path(make, shapes)}


@pytest.fixture
def init_params():
  return _init_params
