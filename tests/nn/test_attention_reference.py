"""Grouped-query attention against a naive repeat-kv loop: outputs and gradients (q, k, v, bias).

The xla path has a hand-written backward; the reference is the plain math under autodiff.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.nn.attention import dot_product_attention


def reference_attention(q, k, v, mask=None, bias=None, scale=1.0, softcap=None):
  """Obviously-correct attention: repeat kv heads, select the mask, softmax."""
  h, kv = q.shape[2], k.shape[2]
  k = jnp.repeat(k, h // kv, axis=2)
  v = jnp.repeat(v, h // kv, axis=2)
  logits = jnp.einsum("blhd,bshd->bhls", q, k) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
  return jnp.einsum("bhls,bshd->blhd", jax.nn.softmax(logits, axis=-1), v)


def _inputs(heads, kv_heads, l=5, s=7, b=2, dh=4):
  ks = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(ks[0], (b, l, heads, dh))
  k = jax.random.normal(ks[1], (b, s, kv_heads, dh))
  v = jax.random.normal(ks[2], (b, s, kv_heads, dh))
  bias = jax.random.normal(ks[3], (1, heads, l, s))
  w = jax.random.normal(ks[4], (b, l, heads, dh))  # a random cotangent direction
  return q, k, v, bias, w


def _masks(b, l, s):
  causal = jnp.tril(jnp.ones((l, s), bool), k=s - l)[None].repeat(b, 0)
  padded = causal.at[1, :, 4:].set(False).at[1, 3:, :].set(False)  # row 1: padding queries
  return {"none": None, "causal": causal, "padded": padded}


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("mask_name", ["none", "causal", "padded"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_outputs_and_gradients_match_autodiff(heads, kv_heads, mask_name, with_bias):
  q, k, v, bias, w = _inputs(heads, kv_heads)
  mask = _masks(q.shape[0], q.shape[1], k.shape[1])[mask_name]
  bias = bias if with_bias else None

  def loss(fn, q, k, v, bias):
    return jnp.sum(fn(q, k, v, mask=mask, bias=bias, scale=0.5) * w)

  ours = lambda q, k, v, mask, bias, scale: dot_product_attention(  # noqa: E731
      q, k, v, mask_BLS=mask, bias_BHLS=bias, scale=scale)
  argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
  got_out = ours(q, k, v, mask, bias, 0.5)
  want_out = reference_attention(q, k, v, mask, bias, 0.5)
  np.testing.assert_allclose(got_out, want_out, atol=1e-6, rtol=1e-6)
  got = jax.grad(lambda *a: loss(ours, *a), argnums=argnums)(q, k, v, bias)
  want = jax.grad(lambda *a: loss(reference_attention, *a), argnums=argnums)(q, k, v, bias)
  for name, g, r in zip("qkvb", got, want):
    assert g.shape == r.shape, name
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("bias_shape", [(2, 4, 5, 7), (1, 1, 5, 7), (2, 1, 5, 7), (5, 7)])
def test_softcap_and_broadcast_biases_match_autodiff(bias_shape):
  """Gemma 2's soft-cap, and every bias broadcast (per sequence, shared, head-shared)."""
  q, k, v, _, w = _inputs(4, 2)
  mask = _masks(q.shape[0], q.shape[1], k.shape[1])["padded"]
  bias = jax.random.normal(jax.random.key(7), bias_shape)

  def loss(fn, q, k, v, bias):
    return jnp.sum(fn(q, k, v, bias) * w)

  ours = lambda q, k, v, bias: dot_product_attention(  # noqa: E731
      q, k, v, mask_BLS=mask, bias_BHLS=bias, scale=0.5, logit_softcap=1.5)
  ref = lambda q, k, v, bias: reference_attention(q, k, v, mask, bias, 0.5, 1.5)  # noqa: E731
  np.testing.assert_allclose(ours(q, k, v, bias), ref(q, k, v, bias), atol=1e-6, rtol=1e-6)
  got = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2, 3))(q, k, v, bias)
  want = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2, 3))(q, k, v, bias)
  for name, g, r in zip("qkvb", got, want):
    assert g.shape == r.shape, name
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=name)


def test_bfloat16_inputs_keep_their_dtype_in_gradients():
  q, k, v, _, w = _inputs(4, 2)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  grads = jax.grad(lambda q, k, v: jnp.sum(
      dot_product_attention(q, k, v, scale=0.5).astype(jnp.float32) * w), argnums=(0, 1, 2))(
          q, k, v)
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  assert all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in grads)
