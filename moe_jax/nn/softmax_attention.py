"""Softmax attention as XLA ops (the ``xla`` implementation), with a hand-written backward.

Legend: B batch, L query length, S key length, H query heads, K kv heads
(H = K * G), G query heads per kv head, M = G·L query rows per kv head, Dh head dim.

The G query heads of a kv head become G·L rows of one ``[B, K]``-batched
matmul, so keys and values are never repeated and every product has 4-D
operands (5-D ``bkgls`` einsums cost XLA:CPU extra transposes). The backward
is one fused softmax-gradient pass over the probabilities (the only
``[.., L, S]`` tensor kept from the forward) between the four matmuls; under
autodiff XLA:CPU spent 1.2x as long on the same math (attention forward and
backward, B 8, L 128, H 4, Dh 64: 5.3 vs 4.4 ms; the LoRA step of
``benchmarks/peft.py`` 0.95-0.96 of the autodiff one). Gradients equal
autodiff of the plain math (tests/nn/test_attention_reference.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def softmax_attention(q_BLHD: Array, k_BSKD: Array, v_BSKD: Array, *,
                      mask_BLS: Array | None = None, bias_BHLS: Array | None = None,
                      scale: float = 1.0, logit_softcap: float | None = None) -> Array:
  """``[B, L, H, Dh]`` softmax attention, softmax in float32.

  Args:
    q_BLHD: queries.
    k_BSKD, v_BSKD: keys and values with ``K`` dividing ``H``.
    mask_BLS: boolean, broadcastable to ``[B, L, S]``; True where attention is
      allowed. Masked logits get float32's most negative finite value, so a
      fully masked row (a padding query) is uniform and finite.
    bias_BHLS: additive logit bias broadcastable to ``[B, H, L, S]``.
    scale: multiplier on ``q · k``.
    logit_softcap: ``c`` of ``c * tanh(logits / c)`` on the scaled logits,
      before bias and mask; ``None``: no capping.
  """
  b, l, h, dh = q_BLHD.shape
  kv = k_BSKD.shape[2]
  if h % kv:
    raise ValueError(f"query heads {h} not divisible by kv heads {kv}")
  g = h // kv
  if mask_BLS is not None:
    mask_BLS = jnp.asarray(mask_BLS, bool)
  if bias_BHLS is not None:
    bias_BHLS = jnp.asarray(bias_BHLS)
  # M = G·L rows per kv head, group-major
  q_BMKD = q_BLHD
  if g > 1:
    q_BMKD = q_BLHD.reshape(b, l, kv, g, dh).transpose(0, 3, 1, 2, 4).reshape(b, g * l, kv, dh)
  bias_spec = None if bias_BHLS is None else (bias_BHLS.shape, bias_BHLS.dtype)
  out = _xla_attention(float(scale), None if logit_softcap is None else float(logit_softcap),
                       bias_spec, g, q_BMKD, k_BSKD, v_BSKD, mask_BLS, bias_BHLS)
  if g > 1:
    out = out.reshape(b, g, l, kv, dh).transpose(0, 2, 3, 1, 4)
  return out.reshape(b, l, h, dh)


def _grouped(x_BKMS: Array, g: int) -> Array:
  """``[B, K, G·L, S]`` viewed as ``[B, K, G, L, S]`` (a bitcast)."""
  b, kv, m, s = x_BKMS.shape
  return x_BKMS.reshape(b, kv, g, m // g, s)


def _grouped_bias(bias_BHLS: Array, kv: int) -> Array:
  """A bias broadcastable to ``[B, H, L, S]`` as float32 ``[B|1, K|1, G|1, L|1, S|1]``."""
  bias = jnp.asarray(bias_BHLS, jnp.float32)
  bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
  if bias.shape[1] == 1:
    return bias[:, :, None]
  return bias.reshape(bias.shape[0], kv, bias.shape[1] // kv, *bias.shape[2:])


def _attention_fwd_math(scale, softcap, g, q_BMKD, k_BSKD, v_BSKD, mask_BLS, bias_BHLS):
  """The forward: ``(out_BMKD, probs_BKMS float32, tanh of the capped logits or None)``."""
  logits = jnp.einsum("bmkd,bskd->bkms", q_BMKD, k_BSKD,
                      preferred_element_type=jnp.float32) * scale
  capped = None
  if softcap is not None:
    capped = jnp.tanh(logits / softcap)
    logits = softcap * capped
  if bias_BHLS is not None or mask_BLS is not None:
    logits_5 = _grouped(logits, g)
    if bias_BHLS is not None:
      logits_5 = logits_5 + _grouped_bias(bias_BHLS, k_BSKD.shape[2])
    if mask_BLS is not None:
      logits_5 = jnp.where(mask_BLS[:, None, None], logits_5, jnp.finfo(jnp.float32).min)
    logits = logits_5.reshape(logits.shape)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bkms,bskd->bmkd", probs.astype(v_BSKD.dtype), v_BSKD)
  return out.astype(q_BMKD.dtype), probs, capped


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _xla_attention(scale, softcap, bias_spec, g, q_BMKD, k_BSKD, v_BSKD, mask_BLS, bias_BHLS):
  return _attention_fwd_math(scale, softcap, g, q_BMKD, k_BSKD, v_BSKD, mask_BLS, bias_BHLS)[0]


def _xla_attention_fwd(scale, softcap, bias_spec, g, q_BMKD, k_BSKD, v_BSKD, mask_BLS,
                       bias_BHLS):
  out, probs, capped = _attention_fwd_math(scale, softcap, g, q_BMKD, k_BSKD, v_BSKD, mask_BLS,
                                           bias_BHLS)
  return out, (q_BMKD, k_BSKD, v_BSKD, mask_BLS, probs, capped)


def _sum_to(x: Array, shape: tuple[int, ...]) -> Array:
  """Sums ``x`` over the axes a numpy broadcast of ``shape`` to ``x.shape`` expanded."""
  lead = x.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(
      lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1)
  return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


def _xla_attention_bwd(scale, softcap, bias_spec, g, res, dout_BMKD):
  q, k, v, mask, probs, capped = res
  dv = jnp.einsum("bkms,bmkd->bskd", probs.astype(v.dtype), dout_BMKD.astype(v.dtype))
  dprobs = jnp.einsum("bmkd,bskd->bkms", dout_BMKD, v, preferred_element_type=jnp.float32)
  # softmax's backward, one fused pass: p * (dp - sum_s p * dp)
  dlogits = probs * (dprobs - jnp.sum(probs * dprobs, axis=-1, keepdims=True))
  dbias = None
  if mask is not None or bias_spec is not None:
    d5 = _grouped(dlogits, g)
    if mask is not None:  # fully masked rows: the mask's select passes no gradient
      d5 = jnp.where(mask[:, None, None], d5, 0.0)
    if bias_spec is not None:  # [B, K, G, L, S] -> [B, H, L, S], heads k-major
      b, kv, _, l, s = d5.shape
      dbias = _sum_to(d5.reshape(b, kv * g, l, s), bias_spec[0]).astype(bias_spec[1])
    dlogits = d5.reshape(dlogits.shape)
  if softcap is not None:
    dlogits = dlogits * (1.0 - capped * capped)
  dlogits = (dlogits * scale).astype(q.dtype)
  dq = jnp.einsum("bkms,bskd->bmkd", dlogits, k.astype(q.dtype))
  dk = jnp.einsum("bkms,bmkd->bskd", dlogits, q).astype(k.dtype)
  return dq, dk, dv.astype(v.dtype), None, dbias


_xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)
