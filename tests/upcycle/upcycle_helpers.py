"""Helpers of the upcycling tests: tiny dense decoders with NumPy-random parameters.

NumPy init instead of ``module.init`` because XLA's CPU compile of a flax init
costs seconds per model."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.models.decoder import Decoder, DecoderConfig

BASE = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
            max_seq_len=64)


def make_config(**kw) -> DecoderConfig:
  return DecoderConfig(**{**BASE, **kw})


def make_params(config: DecoderConfig, seed: int = 0) -> dict:
  """Random dense parameters (norm scales near 1, fan-in scaled kernels)."""
  shapes = nn.unbox(jax.eval_shape(Decoder(config=config).init, jax.random.key(0),
                                   jnp.zeros((1, 1), jnp.int32))["params"])
  rng = np.random.default_rng(seed)

  def make(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(s.dtype)
    fan_in = s.shape[0] * s.shape[1] if "'o'" in name else s.shape[0]
    return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(s.dtype)

  return jax.tree_util.tree_map_with_path(make, shapes)


def make_branch(params: dict, seed: int, jitter: float = 0.05) -> dict:
  """``params`` plus relative noise: a stand-in for a domain-trained branch of a seed."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda w: (w + jitter * np.std(w) * rng.standard_normal(w.shape)).astype(w.dtype)
      if w.ndim > 1 else (w + jitter * rng.standard_normal(w.shape)).astype(w.dtype), params)


def logits_of(module, params, tokens):
  ids, valid = tokens
  out, _ = _apply(module, params, ids, valid)
  return np.asarray(out)[np.asarray(valid)]


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, params, ids, valid):
  return module.apply({"params": params}, ids, valid_BL=valid)


def sharpen_routers(params: dict, factor: float = 30.0) -> dict:
  """Confident routers: no near-ties in top-k that float rounding could flip."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x * factor if "router" in jax.tree_util.keystr(p) else x, params)
