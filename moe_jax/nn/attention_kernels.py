"""Fused attention kernels by backend, behind one function and one config field.

Legend: B batch, L query length, S key length, H query heads, K kv heads
(H = K * G), Dh head dim.

``attention(q_BLHD, k_BSKD, v_BSKD, mask=..., impl=...)`` runs one of:

* ``"xla"``: :func:`dot_product_attention`, the
  reference: float32 ``[B, K, G·L, S]`` logits in memory, a hand-written
  backward. Works everywhere, for every mask, bias and KV cache.
* ``"splash"`` (TPU): Pallas splash attention. Causal / sliding-window /
  full masks are static block-sparse masks (fully masked blocks are skipped),
  padding and packing are segment ids, GQA / MQA read each kv head once, and
  Gemma 2's logit soft-cap is a kernel option. No additive bias.
* ``"flash"`` (TPU): Pallas flash attention, which takes an additive bias
  (T5's relative positions) and causal / segment masks. MHA only, no sliding
  window, no soft-cap.
* ``"cudnn"`` (GPU): ``jax.nn.dot_product_attention(implementation="cudnn")``:
  causal, sliding window, bias, GQA; padding and packing as a boolean mask.
  float16 / bfloat16 only.
* ``"auto"``: by the platform the program is built for (the devices of the
  mesh in context, else the default backend): splash on TPU (flash when a
  bias is given), cuDNN on GPU, xla on CPU.

A kernel needs a *structured* mask (:class:`AttentionMask`) rather than a
boolean ``[B, L, S]`` array: splash's block sparsity must be static, and a
dense mask is the ``O(L·S)`` buffer the kernels exist to avoid. The models
build an ``AttentionMask`` and :meth:`AttentionMask.dense` gives the exact
boolean mask the xla path (and PEFT routers) read.

Where the chosen kernel cannot express a call (a bias for splash, a window for
flash, a KV cache, float32 on cuDNN, ...), the call falls back to ``xla`` and
the reason is logged once per distinct reason: never silently wrong.

On CPU an explicitly requested TPU kernel runs in Pallas interpret mode (the
tests' oracle check); ``"auto"`` never picks one there.

Padding queries (``q_valid_BL`` False) are "don't care" rows: the kernels let
them attend the other padding keys (so they stay finite), while the xla path
gives them a uniform distribution. Valid rows agree exactly.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax.nn.softmax_attention import softmax_attention

Array = jax.Array

ATTENTION_IMPLS = ("auto", "xla", "splash", "flash", "cudnn")
_KERNEL_PLATFORM = {"splash": "tpu", "flash": "tpu", "cudnn": "gpu"}
_LANES = 128  # TPU kernels tile sequences in multiples of 128

log = logging.getLogger(__name__)
_LOGGED: set[str] = set()


def check_impl(impl: str, owner: str = "attention_impl") -> None:
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"{owner}={impl!r} unknown; known: {ATTENTION_IMPLS}")


def _log_once(msg: str) -> None:
  if msg not in _LOGGED:
    _LOGGED.add(msg)
    log.warning(msg)


@flax.struct.dataclass
class AttentionMask:
  """What may attend what, in the form kernels take; ``dense`` gives ``[B, L, S]``.

  Attributes:
    kv_valid_BS: real (non-padding) keys.
    q_valid_BL: real queries (``None``: all); only kernels read it.
    q_segment_ids_BL, kv_segment_ids_BS: packed segments; a query attends
      keys of its own segment only (``None``: one segment).
    q_slots_L: key slot of each query, for causality with a KV cache;
      ``None``: query ``i`` sits at slot ``i`` (training, prefill from 0) --
      the only case kernels take.
    causal: keys after the query's slot are hidden.
    window: sliding window (Mistral): ``slot(q) - s < window``; ``None``: global.
  """

  kv_valid_BS: Array
  q_valid_BL: Array | None = None
  q_segment_ids_BL: Array | None = None
  kv_segment_ids_BS: Array | None = None
  q_slots_L: Array | None = None
  causal: bool = flax.struct.field(pytree_node=False, default=False)
  window: int | None = flax.struct.field(pytree_node=False, default=None)

  def dense(self, q_len: int) -> Array:
    """Boolean ``[B, L, S]``, True where attention is allowed."""
    valid_BS = jnp.asarray(self.kv_valid_BS, bool)
    b, s = valid_BS.shape
    if self.causal:
      q_slots = jnp.arange(q_len) if self.q_slots_L is None else self.q_slots_L
      s_S = jnp.arange(s)
      allowed_LS = s_S[None, :] <= q_slots[:, None]
      if self.window is not None:
        allowed_LS &= (q_slots[:, None] - s_S[None, :]) < self.window
      mask = allowed_LS[None] & valid_BS[:, None, :]
    else:
      mask = jnp.broadcast_to(valid_BS[:, None, :], (b, q_len, s))
    if self.q_segment_ids_BL is not None:
      mask &= self.q_segment_ids_BL[:, :, None] == self.kv_segment_ids_BS[:, None, :]
    return mask

  def kernel_segment_ids(self, q_len: int) -> tuple[Array, Array]:
    """int32 ``([B, L], [B, S])`` ids that equal exactly where attention is allowed.

    Valid keys get ``segment + 1`` (1 without packing), padding keys 0; valid
    queries ``segment + 1``, padding queries 0 (they see the padding keys).
    """
    valid_BS = jnp.asarray(self.kv_valid_BS, bool)
    b = valid_BS.shape[0]
    one = jnp.ones((), jnp.int32)
    kv_seg = one if self.kv_segment_ids_BS is None else self.kv_segment_ids_BS.astype(jnp.int32) + 1
    q_seg = one if self.q_segment_ids_BL is None else self.q_segment_ids_BL.astype(jnp.int32) + 1
    kv_BS = jnp.where(valid_BS, kv_seg, 0)
    q_BL = jnp.broadcast_to(q_seg, (b, q_len)).astype(jnp.int32)
    if self.q_valid_BL is not None:
      q_BL = jnp.where(self.q_valid_BL, q_BL, 0)
    return q_BL, kv_BS


def as_dense_mask(mask: Array | AttentionMask | None, q_len: int) -> Array | None:
  """``[B, L, S]`` booleans from either form (``None`` stays ``None``)."""
  if isinstance(mask, AttentionMask):
    return mask.dense(q_len)
  return mask


# ----------------------------------------------------------------------------- choice


_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("platform", default=None)


@contextlib.contextmanager
def building_for(platform: str):
  """Pick kernels (attention, MoE) for ``platform`` while tracing, whatever the devices.

  For plans traced on an abstract mesh (``jax.eval_shape``) of a TPU or GPU
  job: the traced program is then the one that job would run.
  """
  token = _PLATFORM.set(platform)
  try:
    yield
  finally:
    _PLATFORM.reset(token)


def target_platform() -> str:
  """Platform the program is built for: :func:`building_for`, the mesh in context, the backend."""
  if _PLATFORM.get() is not None:
    return _PLATFORM.get()
  try:
    from jax._src import mesh as mesh_lib  # the concrete mesh set by jax.set_mesh
    mesh = mesh_lib.get_concrete_mesh()
    if mesh is not None and not mesh.empty:
      return mesh.devices.flat[0].platform
  except Exception:  # noqa: BLE001 -- older/newer jax: fall through to the backend
    pass
  return jax.default_backend()


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """The implementation ``impl`` means on ``platform`` (``auto`` picked by backend)."""
  check_impl(impl)
  platform = platform or target_platform()
  if impl != "auto":
    return impl
  return {"tpu": "splash", "gpu": "cudnn"}.get(platform, "xla")


def unsupported_reason(impl: str, *, platform: str, mask: Any, bias: Array | None,
                       logit_softcap: float | None, num_heads: int, num_kv_heads: int,
                       dtype: Any) -> str | None:
  """Why kernel ``impl`` cannot run this call (``None``: it can)."""
  if impl == "xla":
    return None
  want = _KERNEL_PLATFORM[impl]
  if platform != want and not (platform == "cpu" and want == "tpu"):
    return f"{impl} needs a {want.upper()} (building for {platform})"
  if not isinstance(mask, AttentionMask):
    return f"{impl} needs a structured AttentionMask, got a dense mask"
  if mask.q_slots_L is not None:
    return f"{impl} does not take a KV cache (queries not at slots 0..L-1)"
  if impl == "splash" and bias is not None:
    return "splash takes no additive bias (use 'flash' or 'auto' for T5)"
  if impl == "flash":
    if num_heads != num_kv_heads:
      return "flash needs as many kv heads as query heads"
    if mask.window is not None:
      return "flash has no sliding window"
    if logit_softcap is not None:
      return "flash has no logit soft-cap"
  if impl == "cudnn":
    if logit_softcap is not None:
      return "cudnn has no logit soft-cap"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      return f"cudnn needs float16/bfloat16 inputs, got {jnp.dtype(dtype).name}"
  return None


# ----------------------------------------------------------------------------- sharding


def _mesh_axes(rule: str) -> tuple[str, ...]:
  for logical, axes in nn.get_logical_axis_rules() or ():
    if logical == rule:
      return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  return ()


def sharded_over_batch_and_heads(fn: Callable, q_BHLD: Array, k_BKSD: Array, v_BKSD: Array,
                                 seg: tuple[Array, Array] | None, bias: Array | None) -> Array:
  """``fn(q, k, v, seg, bias)`` in a ``shard_map`` over the batch and head mesh axes.

  Pallas kernels are opaque to GSPMD, which would gather their operands; each
  device instead runs the kernel on its own sequences and heads. Mesh axes
  come from the logical rules of ``batch`` and ``heads`` in context; a batch
  or head count the mesh does not divide is left unsplit. When the kv heads do
  not divide over the head axes (Mixtral's 8 over 16), each kv head is repeated
  just enough that they do.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or getattr(mesh, "empty", True) or not mesh.axis_names:
    return fn(q_BHLD, k_BKSD, v_BKSD, seg, bias)
  sizes = dict(mesh.shape)
  present = lambda axes: tuple(a for a in axes if a in sizes and sizes[a] > 1)  # noqa: E731
  b, h = q_BHLD.shape[:2]
  kv = k_BKSD.shape[1]
  batch = present(_mesh_axes("batch"))
  heads = tuple(a for a in present(_mesh_axes("heads")) if a not in batch)
  if b % math.prod(sizes[a] for a in batch):
    batch = ()
  m = math.prod(sizes[a] for a in heads)
  if h % m:
    heads, m = (), 1
  if kv % m:
    r = m // math.gcd(kv, m)
    if h % (kv * r):
      heads, m = (), 1
    else:
      k_BKSD, v_BKSD = (jnp.repeat(t, r, axis=1) for t in (k_BKSD, v_BKSD))
  if not batch and not heads:
    return fn(q_BHLD, k_BKSD, v_BKSD, seg, bias)
  bt, hd = batch or None, heads or None
  specs = [P(bt, hd, None, None)] * 3
  specs.append(None if seg is None else (P(bt, None), P(bt, None)))
  specs.append(None if bias is None else P(bt if bias.shape[0] == b > 1 else None, hd,
                                              None, None))
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs), out_specs=P(bt, hd, None, None),
                       check_vma=False)(q_BHLD, k_BKSD, v_BKSD, seg, bias)


# ----------------------------------------------------------------------------- TPU kernels


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _block(n: int, largest: int = 512) -> int:
  """Largest of 512, 256, 128 dividing ``n`` (a multiple of 128)."""
  return next(blk for blk in (largest, 256, 128) if blk <= largest and n % blk == 0)


def _pad_to(x: Array, axis: int, n: int) -> Array:
  if x.shape[axis] == n:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, n - x.shape[axis])
  return jnp.pad(x, widths)


def vjp_in_context(context: Callable[[], Any], fn: Callable, *args):
  """``fn(*args)`` with every Pallas call (forward and backward) traced in ``context()``.

  Such modes (interpret mode, matmul precision) are read when a
  ``pallas_call`` is traced, and a ``custom_vjp``'s backward is traced after
  the forward returns: both run inside the context.
  """

  @jax.custom_vjp
  def run(*xs):
    with context():
      return fn(*xs)

  def fwd(*xs):
    with context():
      return jax.vjp(fn, *xs)

  def bwd(vjp, g):
    with context():
      return vjp(g)

  run.defvjp(fwd, bwd)
  return run(*args)


def at_kernel_precision(fn: Callable, dtype: Any, *args, interpret: bool = False):
  """``fn(*args)`` for compiled Pallas TPU kernels on ``dtype`` operands.

  bfloat16 operands multiply exactly in one MXU pass; a process-wide
  ``jax_default_matmul_precision`` of ``"highest"`` would ask Mosaic for
  float32 passes over them, which it rejects ("Bad lhs type"). Such calls run
  at the default precision (forward and backward); float32 operands and
  interpret mode keep the caller's.
  """
  if interpret or jnp.dtype(dtype).itemsize >= 4:
    return fn(*args)
  return vjp_in_context(lambda: jax.default_matmul_precision("default"), fn, *args)


def _splash_local(q_BHLD, k_BKSD, v_BKSD, seg, bias, *, causal: bool, window: int | None,
                  logit_softcap: float | None, interpret: bool) -> Array:
  """Splash attention on one device's shard (sequence lengths multiples of 128)."""
  del bias
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  _, h, l, _ = q_BHLD.shape
  s = k_BKSD.shape[2]
  if causal and window is not None:
    base = sa.LocalMask((l, s), window_size=(window - 1, 0), offset=0)
  elif causal:
    base = sa.CausalMask((l, s))
  else:
    base = sa.FullMask((l, s))
  bq, bkv = _block(l), _block(s)
  sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                        block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                        block_kv_dq=bkv)
  kernel = sa.make_splash_mha(sa.MultiHeadMask([base] * h), block_sizes=sizes, head_shards=1,
                              q_seq_shards=1, attn_logits_soft_cap=logit_softcap,
                              interpret=interpret)
  if seg is None:
    return jax.vmap(kernel)(q_BHLD, k_BKSD, v_BKSD)
  return jax.vmap(lambda q, k, v, sq, skv: kernel(q, k, v, sa.SegmentIds(q=sq, kv=skv)))(
      q_BHLD, k_BKSD, v_BKSD, *seg)


def _flash_local(q_BHLD, k_BHSD, v_BHSD, seg, bias, *, causal: bool, scale: float,
                 interpret: bool) -> Array:
  """Pallas flash attention on one shard; ``bias`` ``[1 or B, H, L, S]`` is read per batch."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  del interpret  # set around the call (_vjp_in_context): lax.map below needs no vmap of a grid
  b, _, l, _ = q_BHLD.shape
  s = k_BHSD.shape[2]
  bq, bk = _block(l), _block(s)
  sizes = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                        block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk,
                        block_q_dkv=bq, block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
  run = functools.partial(fa.flash_attention, causal=causal, sm_scale=scale, block_sizes=sizes)
  if bias is None or bias.shape[0] == b:
    ids = None if seg is None else fa.SegmentIds(q=seg[0], kv=seg[1])
    return run(q_BHLD, k_BHSD, v_BHSD, ab=bias, segment_ids=ids)
  # One bias for the whole batch (T5): run the kernel one sequence at a time
  # (a scan) with the bias shared, rather than broadcasting a [B, H, L, S]
  # float32 copy of it. The kernel's backward writes the bias gradient of its
  # own sequence; under vmap that is a [B, H, L, S] float32 buffer summed
  # afterwards, while the transposed scan adds each [1, H, L, S] into one carry.
  def one(xs):
    q, k, v, *seg1 = xs
    ids = None if not seg1 else fa.SegmentIds(q=seg1[0][None], kv=seg1[1][None])
    return run(q[None], k[None], v[None], ab=bias, segment_ids=ids)[0]
  return jax.lax.map(one, (q_BHLD, k_BHSD, v_BHSD, *(seg or ())))


def tpu_attention(impl: str, q_BLHD: Array, k_BSKD: Array, v_BSKD: Array, *,
                  mask: AttentionMask, bias_BHLS: Array | None, scale: float,
                  logit_softcap: float | None, interpret: bool) -> Array:
  """Splash or flash attention: pads lengths to multiples of 128, shards, un-pads."""
  b, l, h, dh = q_BLHD.shape
  s = k_BSKD.shape[1]
  lp, sp = _round_up(l, _LANES), _round_up(s, _LANES)
  seg = None
  if (lp, sp) != (l, s) or mask.q_segment_ids_BL is not None or mask.q_valid_BL is not None \
      or not _all_true(mask.kv_valid_BS):
    q_seg, kv_seg = mask.kernel_segment_ids(l)
    seg = (_pad_to(q_seg, 1, lp), _pad_to(kv_seg, 1, sp))
  dtype = q_BLHD.dtype
  q = _pad_to(jnp.swapaxes(q_BLHD, 1, 2), 2, lp)
  k = _pad_to(jnp.swapaxes(k_BSKD, 1, 2).astype(dtype), 2, sp)
  v = _pad_to(jnp.swapaxes(v_BSKD, 1, 2).astype(dtype), 2, sp)
  bias = None
  if bias_BHLS is not None:
    bias = jnp.asarray(bias_BHLS, jnp.float32)
    bias = jnp.broadcast_to(bias, (bias.shape[0], h) + bias.shape[2:])
    bias = _pad_to(_pad_to(bias, 2, lp), 3, sp)
  # Scale the queries: splash has no logit scale, flash scales (q·k + bias).
  q = q * jnp.asarray(scale, dtype)
  if impl == "splash":
    local = functools.partial(_splash_local, causal=mask.causal, window=mask.window,
                              logit_softcap=logit_softcap, interpret=interpret)
  else:
    local = functools.partial(_flash_local, causal=mask.causal, scale=1.0,
                              interpret=interpret)
  run = functools.partial(sharded_over_batch_and_heads, local)
  if interpret and impl == "flash":
    from jax.experimental.pallas import tpu as pltpu
    out = vjp_in_context(pltpu.force_tpu_interpret_mode, run, q, k, v, seg, bias)
  else:
    out = at_kernel_precision(run, dtype, q, k, v, seg, bias, interpret=interpret)
  return jnp.swapaxes(out[:, :, :l], 1, 2).astype(dtype)


def _all_true(x: Array) -> bool:
  """Whether ``x`` is a compile-time constant of all True (then no segment ids are needed)."""
  try:
    return bool(jnp.all(jax.core.concrete_or_error(None, x)))
  except Exception:  # noqa: BLE001 -- traced: assume padding may be present
    return False


# ----------------------------------------------------------------------------- GPU kernel


def cudnn_attention(q_BLHD: Array, k_BSKD: Array, v_BSKD: Array, *, mask: AttentionMask,
                    bias_BHLS: Array | None, scale: float) -> Array:
  """cuDNN fused attention; padding and packing as a boolean mask, causality and window native."""
  l = q_BLHD.shape[1]
  plain = AttentionMask(kv_valid_BS=mask.kv_valid_BS, q_segment_ids_BL=mask.q_segment_ids_BL,
                        kv_segment_ids_BS=mask.kv_segment_ids_BS)
  dense_B1LS = plain.dense(l)[:, None]
  bias = None
  if bias_BHLS is not None:
    bias = jnp.asarray(bias_BHLS, q_BLHD.dtype)
  window = None if mask.window is None else (mask.window - 1, 0)
  return jax.nn.dot_product_attention(
      q_BLHD, k_BSKD.astype(q_BLHD.dtype), v_BSKD.astype(q_BLHD.dtype), bias=bias,
      mask=dense_B1LS, scale=scale, is_causal=mask.causal, local_window_size=window,
      implementation="cudnn")


def dot_product_attention(q_BLHD: Array, k_BSKD: Array, v_BSKD: Array, *,
                          mask_BLS: Array | AttentionMask | None = None,
                          bias_BHLS: Array | None = None,
                          scale: float = 1.0, logit_softcap: float | None = None) -> Array:
  """Softmax attention with grouped kv heads; softmax in float32.

  The math, with its hand-written backward, is
  :func:`moe_jax.nn.softmax_attention.softmax_attention`; this front makes a
  structured mask dense.

  Args:
    q_BLHD: queries.
    k_BSKD, v_BSKD: keys and values with ``K`` dividing ``H``.
    mask_BLS: boolean, broadcastable to ``[B, L, S]``; True where attention is allowed
      (an :class:`AttentionMask` is made dense).
    bias_BHLS: additive logit bias broadcastable to ``[B, H, L, S]`` (T5 relative bias).
    scale: multiplier on ``q · k`` (``Dh**-0.5`` for Llama, 1 for T5).
    logit_softcap: ``c`` of ``c * tanh(logits / c)`` applied to the scaled
      logits before bias and mask (Gemma 2); ``None``: no capping.

  Returns:
    ``[B, L, H, Dh]`` in the dtype of ``q``.
  """
  return softmax_attention(q_BLHD, k_BSKD, v_BSKD,
                           mask_BLS=as_dense_mask(mask_BLS, q_BLHD.shape[1]),
                           bias_BHLS=bias_BHLS, scale=scale, logit_softcap=logit_softcap)


# ----------------------------------------------------------------------------- front


def attention(q_BLHD: Array, k_BSKD: Array, v_BSKD: Array, *,
              mask: Array | AttentionMask | None, bias_BHLS: Array | None = None,
              scale: float = 1.0, logit_softcap: float | None = None, impl: str = "auto",
              platform: str | None = None) -> Array:
  """``[B, L, H, Dh]`` softmax attention by ``impl`` (see module docstring).

  ``mask`` may be a dense boolean ``[B, L, S]`` (xla only), an
  :class:`AttentionMask`, or ``None`` (everything visible).
  """
  platform = platform or target_platform()
  chosen = resolve_impl(impl, platform)
  if impl == "auto" and chosen == "splash" and bias_BHLS is not None:
    chosen = "flash"  # the TPU kernel that takes T5's bias
  if isinstance(mask, AttentionMask) or mask is None:
    if mask is None:
      b, s = k_BSKD.shape[:2]
      mask = AttentionMask(kv_valid_BS=jnp.ones((b, s), bool))
  reason = unsupported_reason(chosen, platform=platform, mask=mask, bias=bias_BHLS,
                              logit_softcap=logit_softcap, num_heads=q_BLHD.shape[2],
                              num_kv_heads=k_BSKD.shape[2], dtype=q_BLHD.dtype)
  if reason is not None:
    if impl != "auto" or getattr(mask, "q_slots_L", None) is None:  # cached decoding: expected
      _log_once(f"attention_impl={impl!r}: {reason}; using 'xla'")
    chosen = "xla"
  if chosen == "xla":
    dense = as_dense_mask(mask, q_BLHD.shape[1])
    return dot_product_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS=dense, bias_BHLS=bias_BHLS,
                                 scale=scale, logit_softcap=logit_softcap)
  if chosen == "cudnn":
    return cudnn_attention(q_BLHD, k_BSKD, v_BSKD, mask=mask, bias_BHLS=bias_BHLS, scale=scale)
  return tpu_attention(chosen, q_BLHD, k_BSKD, v_BSKD, mask=mask, bias_BHLS=bias_BHLS,
                       scale=scale, logit_softcap=logit_softcap, interpret=platform == "cpu")
