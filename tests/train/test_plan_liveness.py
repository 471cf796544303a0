"""The plan's liveness walk (moe_jax.plan.liveness) on programs whose peak is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_the_target_logit_gradient_is_a_fused_one_hot():
  """grad of take_along_axis is a scatter-add of one value per row into zeros: XLA
  rewrites it as a select over an iota compare, fused into the softmax gradient."""
  labels = jax.ShapeDtypeStruct((256,), jnp.int32)
  half = X.update(dtype=jnp.bfloat16)

  def loss(x, w, y):
    logits = (x @ w).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum(lse - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0])

  # bfloat16 and float32 logits (the gradient written over the softmax), no float32
  # [256, 256] scatter beside them (the walk counted 2.02 MB before).
  peak = _peak(lambda x, w, y: jax.grad(loss, argnums=1)(x, w, y), half, half, labels)
  assert 1.5 * MB <= peak < 1.75 * MB


def test_a_weight_read_as_it_is_holds_its_gathered_copy():
  """An input that ``gathered_of`` sizes (an FSDP weight) counts from first use to last;
  one that is only cast is gathered after the cast (the cast is sized instead)."""
  gathered = lambda aval, local: 4.0 * MB if aval.shape == (256, 256) else 0.0  # noqa: E731
  rows = jax.ShapeDtypeStruct((128, 256), jnp.float32)
  read = jax.make_jaxpr(lambda x, w: jnp.sum(x @ w))(rows, X)
  extra = peak_bytes(read, _size, gathered_of=gathered) - peak_bytes(read, _size)
  assert extra == pytest.approx(4 * MB, abs=8)
  cast = jax.make_jaxpr(lambda x, w: jnp.sum(x @ w.astype(jnp.bfloat16)))(
      rows.update(dtype=jnp.bfloat16), X)
  assert peak_bytes(cast, _size) == peak_bytes(cast, _size, gathered_of=gathered)
