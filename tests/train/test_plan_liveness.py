"""The plan's liveness walk (moe_jax.plan.liveness) on programs whose peak is known."""

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.plan.liveness import peak_bytes


def _size(aval, local):
  del local
  return float(np.prod(aval.shape, dtype=np.int64) * np.dtype(aval.dtype).itemsize)


def _peak(fn, *args):
  return peak_bytes(jax.make_jaxpr(fn)(*args), _size)


X = jax.ShapeDtypeStruct((256, 256), jnp.float32)
MB = 256 * 256 * 4


def test_two_products_alive_at_once():
  # x @ w1 and x @ w2 are both alive when multiplied; the product overwrites one of them.
  assert _peak(lambda x, a, b: jnp.sum((x @ a) * (x @ b)), X, X, X) == 2 * MB + 4


def test_elementwise_chains_fuse_and_calls_inline():
  chain = jax.jit(lambda x: jnp.tanh(jnp.exp(x) * 2.0 + 1.0))
  assert _peak(lambda x: jnp.sum(chain(x)), X) == 4  # fused into the reduction
  assert _peak(lambda x: chain(x), X) == MB  # the program's output is materialised


def test_a_scan_body_counts_once_and_its_stacked_outputs_whole():
  def body(c, w):
    h = c @ w
    return jnp.tanh(h) + c, h  # h is kept: one [256, 256] per layer

  stacked = jax.ShapeDtypeStruct((8, 256, 256), jnp.float32)
  peak = _peak(lambda x, ws: jax.lax.scan(body, x, ws), X, stacked)
  assert 9 * MB <= peak <= 11 * MB  # 8 stacked outputs + the carry, not 8 bodies' worth more
