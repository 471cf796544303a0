"""Fused attention kernels (Pallas interpret mode on CPU) against the xla path.

Outputs and gradients (q, k, v and the T5 bias) of the valid query rows must
agree within 1e-5 in float32. Shapes are the smallest the TPU kernels' block
constraints allow (sequence blocks of 128).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.nn.attention import Attention
from moe_jax.nn.attention_kernels import AttentionMask, attention, resolve_impl

B, L, DH = 2, 128, 8


def _qkv(h, kv, s=L, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
  return f(B, L, h, DH), f(B, s, kv, DH), f(B, s, kv, DH), f(B, L, h, DH)


def _padded_valid(n=L):
  valid = np.ones((B, n), bool)
  valid[0, :20] = False  # left padding
  valid[1, n - 37:] = False  # right padding
  return jnp.asarray(valid)


def _packed_segments():
  seg = np.zeros((B, L), np.int32)
  seg[0, :50], seg[0, 50:100], seg[0, 100:120] = 1, 2, 3  # 8 padding tokens (segment 0)
  seg[1, :] = 1
  seg[1, 64:] = 2
  return jnp.asarray(seg)


def _check(impl, q, k, v, r, mask, q_valid, bias=None, softcap=None):
  def loss(fn_impl, q, k, v, bias):
    out = attention(q, k, v, mask=mask, bias_BHLS=bias, scale=DH ** -0.5,
                    logit_softcap=softcap, impl=fn_impl)
    return jnp.sum(out * r * q_valid[:, :, None, None]), out

  args = (q, k, v, bias)
  argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
  (_, ref), g_ref = jax.value_and_grad(lambda *a: loss("xla", *a), argnums, has_aux=True)(*args)
  (_, got), g_got = jax.value_and_grad(lambda *a: loss(impl, *a), argnums, has_aux=True)(*args)
  sel = np.asarray(q_valid)
  np.testing.assert_allclose(np.asarray(got)[sel], np.asarray(ref)[sel], atol=1e-5, rtol=1e-5)
  for a, b in zip(g_got, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


CASES = {
    "causal": dict(causal=True),
    "padded": dict(causal=True, padded=True),
    "packed": dict(causal=True, packed=True),
    "sliding_window": dict(causal=True, padded=True, window=40),
}


@pytest.mark.parametrize("case", list(CASES))
def test_splash_equals_xla_gqa(case):
  opts = CASES[case]
  q, k, v, r = _qkv(h=4, kv=2)
  valid = _padded_valid() if opts.get("padded") else jnp.ones((B, L), bool)
  seg = _packed_segments() if opts.get("packed") else None
  if seg is not None:
    valid = seg > 0
  mask = AttentionMask(kv_valid_BS=valid, q_valid_BL=valid, q_segment_ids_BL=seg,
                       kv_segment_ids_BS=seg, causal=opts["causal"], window=opts.get("window"))
  _check("splash", q, k, v, r, mask, valid)


def test_splash_mqa_softcap():
  q, k, v, r = _qkv(h=4, kv=1)
  valid = _padded_valid()
  mask = AttentionMask(kv_valid_BS=valid, q_valid_BL=valid, causal=True)
  _check("splash", q, k, v, r, mask, valid, softcap=5.0)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_t5_bias_equals_xla(causal):
  """T5: a relative-position bias shared by the batch, padding, full (encoder) or causal."""
  q, k, v, r = _qkv(h=4, kv=4, seed=1)
  valid = _padded_valid()
  bias = jnp.asarray(np.random.default_rng(2).standard_normal((1, 4, L, L)), jnp.float32)
  mask = AttentionMask(kv_valid_BS=valid, q_valid_BL=valid, causal=causal)
  _check("flash", q, k, v, r, mask, valid, bias=bias)


def test_flash_t5_shared_bias_packed_equals_xla():
  """Packed rows, one bias for the batch (T5 training): the kernel runs row by row, dbias summed."""
  q, k, v, r = _qkv(h=4, kv=4, seed=5)
  seg = _packed_segments()
  valid = seg > 0
  bias = jnp.asarray(np.random.default_rng(6).standard_normal((1, 4, L, L)), jnp.float32)
  mask = AttentionMask(kv_valid_BS=valid, q_valid_BL=valid, q_segment_ids_BL=seg,
                       kv_segment_ids_BS=seg)
  _check("flash", q, k, v, r, mask, valid, bias=bias)


def test_flash_cross_attention_unaligned_lengths():
  """Lengths that are not multiples of 128 are padded inside (T5 cross-attention, packed)."""
  lq, s = 100, 72
  rng = np.random.default_rng(3)
  f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
  q, k, v, r = f(B, lq, 2, DH), f(B, s, 2, DH), f(B, s, 2, DH), f(B, lq, 2, DH)
  q_seg = jnp.asarray(np.repeat([[1] * 60 + [2] * 40], B, 0))
  kv_seg = jnp.asarray(np.repeat([[1] * 40 + [2] * 30 + [0] * 2], B, 0))
  mask = AttentionMask(kv_valid_BS=kv_seg > 0, q_segment_ids_BL=q_seg, kv_segment_ids_BS=kv_seg)
  _check("flash", q, k, v, r, mask, jnp.ones((B, lq), bool))


def test_unsupported_case_falls_back_to_xla_and_says_so(caplog):
  q, k, v, _ = _qkv(h=4, kv=2)
  bias = jnp.ones((1, 4, L, L), jnp.float32)
  mask = AttentionMask(kv_valid_BS=jnp.ones((B, L), bool), causal=True)
  with caplog.at_level(logging.WARNING, logger="moe_jax.nn.attention_kernels"):
    got = attention(q, k, v, mask=mask, bias_BHLS=bias, impl="splash")
    attention(q, k, v, mask=mask, bias_BHLS=bias, impl="splash")
  ref = attention(q, k, v, mask=mask, bias_BHLS=bias, impl="xla")
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  msgs = [r.getMessage() for r in caplog.records
          if "splash takes no additive bias" in r.getMessage()]
  assert len(msgs) <= 1  # once per process (an earlier test may already have said it)


def test_auto_is_xla_on_cpu_and_kernels_by_backend():
  assert resolve_impl("auto", "cpu") == "xla"
  assert resolve_impl("auto", "tpu") == "splash"
  assert resolve_impl("auto", "gpu") == "cudnn"
  with pytest.raises(ValueError, match="attention_impl"):
    resolve_impl("fused")


def test_module_kernel_matches_xla_and_cache_keeps_xla():
  """``Attention(attention_impl='splash')`` equals xla; with a KV cache it stays on xla."""
  common = dict(num_heads=4, num_kv_heads=2, head_dim=DH, out_features=16)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((B, L, 16)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(L), (B, L))
  valid = _padded_valid()
  mask = AttentionMask(kv_valid_BS=valid, q_valid_BL=valid, causal=True)
  ref_mod, ker_mod = Attention(**common, attention_impl="xla"), Attention(**common,
                                                                          attention_impl="splash")
  params = ref_mod.init(jax.random.key(0), x, mask_BLS=mask, positions_BL=pos)
  ref, _ = ref_mod.apply(params, x, mask_BLS=mask, positions_BL=pos)
  got, _ = ker_mod.apply(params, x, mask_BLS=mask, positions_BL=pos)
  sel = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(got)[sel], np.asarray(ref)[sel], atol=1e-5, rtol=1e-5)
  # Dense mask: same numbers as before this module knew about kernels.
  ref_dense, _ = ref_mod.apply(params, x, mask_BLS=mask.dense(L), positions_BL=pos)
  np.testing.assert_array_equal(np.asarray(ref_dense), np.asarray(ref))


def test_building_for_overrides_the_platform():
  from moe_jax.nn.attention_kernels import building_for, target_platform
  assert target_platform() == "cpu"
  with building_for("tpu"):
    assert target_platform() == "tpu"
    assert resolve_impl("auto") == "splash"
  assert target_platform() == "cpu"
