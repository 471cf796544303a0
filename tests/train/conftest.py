"""Fixtures for the training tests.

Compiling flax parameter initialisation (a threefry + truncated normal per
parameter) and the train step costs XLA's CPU backend seconds per model, and
several tests build the same programs (resume = the same train step twice).
jax's persistent compilation cache, pointed at a per-session temp directory,
lets identical programs compile once.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  yield


def numpy_params(model, seed: int = 0):
  """Random parameters of a model wrapper from numpy (no init compilation)."""
  shapes = nn.meta.unbox(model.abstract_boxed_params())
  rng = np.random.default_rng(seed)

  def make(path, s):
    if "scale" in jax.tree_util.keystr(path):
      return np.ones(s.shape, s.dtype)
    fan_in = s.shape[0] if len(s.shape) >= 2 else 1
    return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(make, shapes)


def place(trainer, params):
  """A train state around numpy params, placed on the trainer's shardings."""
  sharded = jax.tree.map(jax.device_put, params, trainer.state_shardings.params)
  return trainer.state_from_params(sharded)


@pytest.fixture(name="numpy_params")
def _numpy_params_fixture():
  return numpy_params


@pytest.fixture(name="place")
def _place_fixture():
  return place
