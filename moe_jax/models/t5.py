"""T5 encoder-decoder (T5 v1.0 and v1.1 / LM-adapted), matching Hugging Face's ``T5ForConditionalGeneration``.

Legend: B batch, L query length, S key length (encoder length or decoder cache
slots), D model dim, V vocab, H heads, Dh head dim (``d_kv``), F ffn dim,
R relative-position buckets.

T5 has no absolute positions: every self-attention adds a learned bias per
head indexed by a *bucketed* relative distance ``key_pos - query_pos``
(:func:`relative_position_bucket`). The bias table lives once per stack (HF
stores it in block 0 and threads the computed bias through the other blocks;
we store it at the stack level, ``encoder/relpos_bias``, which says the same
thing without a special layer 0). Attention logits are not scaled
(``scale=1``): T5 folds ``Dh**-0.5`` into the query initialisation.

Padding and caching follow :mod:`moe_jax.models.decoder` (boolean ``valid``
slot masks hide *keys* only). The decoder's relative bias uses slot positions
(query slots ``index .. index+L-1`` against key slots ``0 .. S-1``), as HF does
with its cache, so incremental decoding and teacher forcing agree.

Packed rows (seqio packs examples as contiguous runs) attend within their
segment only, where ``key_pos - query_pos`` is the index difference: one
``[1, H, L, L]`` bias from the row indices is exact and shared by the batch
(no per-row float32 bias, nor its gradient in the flash kernel's backward).

Two head variants, chosen by ``tie_word_embeddings``:

* v1.0 (``True``): logits are ``(x * d_model**-0.5) · E^T`` with the shared
  input embedding ``E``; FFN is ``relu``.
* v1.1 (``False``): a separate, unscaled ``lm_head``; FFN is gated-GELU (HF's
  ``gelu_new``). The encoder and the decoder still share the input embedding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from moe_jax.models import stack
from moe_jax.nn.attention import Attention, KVCache
from moe_jax.nn.attention_kernels import AttentionMask, check_impl
from moe_jax.nn.embeddings import Embed
from moe_jax.nn.linear import Linear
from moe_jax.nn.mlp import Mlp
from moe_jax.nn.norms import RMSNorm

Array = jax.Array

FEED_FORWARD_PROJ = {
    # name: (gated, activation)
    "relu": (False, "relu"),
    "gated-gelu": (True, "gelu_new"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Config:
  """Architecture of a T5 encoder-decoder.

  Attributes:
    vocab_size, d_model, d_ff: sizes.
    d_kv: head dim Dh (T5 does not require ``num_heads * d_kv == d_model``).
    num_layers: encoder layers.
    num_decoder_layers: decoder layers; ``None`` means ``num_layers``.
    num_heads: attention heads H (always multi-head; no GQA in T5).
    relative_attention_num_buckets, relative_attention_max_distance: the
      relative-position bucketing (see :func:`relative_position_bucket`).
    feed_forward_proj: ``"relu"`` (v1.0) or ``"gated-gelu"`` (v1.1).
    tie_word_embeddings: ``True`` (v1.0): the head is the input embedding and
      the decoder output is scaled by ``d_model**-0.5`` first; ``False``
      (v1.1): separate unscaled ``lm_head``.
    layer_norm_epsilon: RMSNorm epsilon.
    dtype, param_dtype: compute and storage dtype names.
    pad_token_id, eos_token_id, decoder_start_token_id: special tokens.
    max_seq_len: default decoder cache size.
    attention_impl: fused attention by backend (``"auto"``; see
      :mod:`moe_jax.nn.attention_kernels`): on TPU the flash kernel, which takes
      the relative-position bias; ``"xla"`` materialises the scores.
    remat_policy: per-block rematerialisation of both stacks
      (:data:`moe_jax.models.stack.REMAT_POLICIES`).
    scan_layers: run each stack as one ``nn.scan`` (parameters stacked along
      ``layers``: ``encoder/layers/...``); the decode cache's per-layer
      tuples then hold one stacked ``KVCache``.
  """

  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  num_decoder_layers: int | None = None
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"
  param_dtype: str = "float32"
  pad_token_id: int = 0
  eos_token_id: int | tuple[int, ...] = 1
  decoder_start_token_id: int = 0
  max_seq_len: int = 512
  attention_impl: str = "auto"
  remat_policy: str = "none"
  scan_layers: bool = False

  def __post_init__(self):
    stack.check_remat_policy(self.remat_policy, "T5Config")
    check_impl(self.attention_impl, "T5Config.attention_impl")
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                 "max_seq_len"):
      if getattr(self, name) <= 0:
        raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
    if self.num_decoder_layers is not None and self.num_decoder_layers <= 0:
      raise ValueError(
          f"T5Config.num_decoder_layers must be positive, got {self.num_decoder_layers}")
    if self.feed_forward_proj not in FEED_FORWARD_PROJ:
      raise ValueError(f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                       f"expected one of {sorted(FEED_FORWARD_PROJ)}")
    if self.relative_attention_num_buckets < 4:
      raise ValueError("T5Config.relative_attention_num_buckets must be >= 4 (half exact, half "
                       f"logarithmic, per direction), got {self.relative_attention_num_buckets}")
    if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
      raise ValueError(
          "T5Config.relative_attention_max_distance must exceed relative_attention_num_buckets "
          f"// 2 = {self.relative_attention_num_buckets // 2} (the exact-bucket range), got "
          f"{self.relative_attention_max_distance}")
    if self.layer_norm_epsilon <= 0:
      raise ValueError(f"T5Config.layer_norm_epsilon must be positive, got "
                       f"{self.layer_norm_epsilon}")

  @property
  def decoder_layers(self) -> int:
    return self.num_decoder_layers or self.num_layers

  @property
  def gated(self) -> bool:
    return FEED_FORWARD_PROJ[self.feed_forward_proj][0]

  @property
  def activation(self) -> str:
    return FEED_FORWARD_PROJ[self.feed_forward_proj][1]

  def replace(self, **kw) -> "T5Config":
    return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------- pure functions


def relative_position_bucket(relative_position: Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
  """Bucket of ``memory_pos - query_pos``, exactly as Mesh TensorFlow / HF T5.

  Half of the buckets (per direction when ``bidirectional``) hold exact
  distances ``0 .. max_exact-1``; the rest are logarithmically wider up to
  ``max_distance``, beyond which everything shares the last bucket. In the
  unidirectional (decoder) case positive distances (the future) map to
  bucket 0. The logarithm is evaluated in float32 in the reference's order of
  operations and truncated, so bucket boundaries agree with HF bit for bit.

  Returns:
    int32 buckets in ``[0, num_buckets)``, the shape of ``relative_position``.
  """
  rel = jnp.asarray(relative_position, jnp.int32)
  buckets = jnp.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
    rel = jnp.abs(rel)
  else:
    rel = -jnp.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  # log(0) would be -inf; those entries take the exact branch anyway.
  rel_f = jnp.maximum(rel, 1).astype(jnp.float32)
  large = max_exact + (jnp.log(rel_f / max_exact) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, rel, large)


def encoder_mask(valid_BS: Array, query_len: int) -> Array:
  """``[B, L, S]``: every query may attend every valid key (encoder self- and cross-attention)."""
  valid_BS = jnp.asarray(valid_BS, bool)
  return jnp.broadcast_to(valid_BS[:, None, :],
                          (valid_BS.shape[0], query_len, valid_BS.shape[1]))


# ----------------------------------------------------------------------------- modules


class RelativePositionBias(nn.Module):
  """Learned per-head bias over relative-position buckets, table ``[R, H]``."""

  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q_pos_L: Array, k_pos_S: Array) -> Array:
    """Bias ``[1, H, L, S]`` (float32) for query and key positions.

    Positions may also be per row, ``[B, L]`` and ``[B, S]`` (packed
    sequences restart at 0 in every segment); the bias is then ``[B, H, L, S]``.
    """
    table_RH = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                                     ("relpos_buckets", "heads")),
        (self.num_buckets, self.num_heads), jnp.dtype(self.param_dtype))
    q_pos_BL = jnp.atleast_2d(q_pos_L)
    k_pos_BS = jnp.atleast_2d(k_pos_S)
    rel_BLS = k_pos_BS[:, None, :] - q_pos_BL[:, :, None]
    bucket_BLS = relative_position_bucket(rel_BLS, bidirectional=self.bidirectional,
                                          num_buckets=self.num_buckets,
                                          max_distance=self.max_distance)
    values_BLSH = jnp.take(table_RH, bucket_BLS, axis=0).astype(jnp.float32)
    return jnp.transpose(values_BLSH, (0, 3, 1, 2))


def _attention(c: T5Config) -> Attention:
  # T5 initialises q with an extra 1/d_kv variance instead of scaling logits.
  q_init = nn.initializers.variance_scaling(1.0 / c.d_kv, "fan_in", "truncated_normal",
                                            in_axis=0, out_axis=(1, 2))
  return Attention(num_heads=c.num_heads, num_kv_heads=c.num_heads, head_dim=c.d_kv,
                   out_features=c.d_model, scale=1.0, rope_theta=None, q_kernel_init=q_init,
                   dtype=c.dtype, param_dtype=c.param_dtype, attention_impl=c.attention_impl)


def _norm(c: T5Config) -> RMSNorm:
  return RMSNorm(eps=c.layer_norm_epsilon, dtype=c.dtype, param_dtype=c.param_dtype)


def _ffn(c: T5Config) -> Mlp:
  return Mlp(hidden_dim=c.d_ff, out_features=c.d_model, activation=c.activation, gated=c.gated,
             dtype=c.dtype, param_dtype=c.param_dtype)


class T5EncoderBlock(nn.Module):
  """Pre-norm block: ``x += attn(norm(x)); x += mlp(norm(x))``."""

  config: T5Config
  layer: int | None = None

  def setup(self):
    c = self.config
    self.pre_attn_norm = _norm(c)
    self.attn = self.make_attention()
    self.pre_mlp_norm = _norm(c)
    self.mlp = self.make_ffn()

  @property
  def layer_index(self) -> int:
    return self.layer if self.layer is not None else int(self.name.rsplit("_", 1)[1])

  def make_attention(self) -> nn.Module:
    """The self-attention of this block; PEFT variants override this."""
    return _attention(self.config)

  def make_ffn(self) -> nn.Module:
    """The FFN of this block; PEFT / MoE variants override this."""
    return _ffn(self.config)

  def __call__(self, x_BLD: Array, *, mask_BLS: Array, bias_BHLS: Array) -> Array:
    h, _ = self.attn(self.pre_attn_norm(x_BLD), mask_BLS=mask_BLS, bias_BHLS=bias_BHLS)
    x_BLD = x_BLD + stack.checkpoint_name(h, "attn_out")
    x_BLD = x_BLD + stack.checkpoint_name(self.mlp(self.pre_mlp_norm(x_BLD)), "ffn_out")
    return nn.with_logical_constraint(x_BLD, ("batch", "length", "embed"))


class T5DecoderBlock(nn.Module):
  """Pre-norm block: causal self-attention, cross-attention to the encoder, FFN."""

  config: T5Config
  layer: int | None = None

  def setup(self):
    c = self.config
    self.pre_self_attn_norm = _norm(c)
    self.self_attn = self.make_self_attention()
    self.pre_cross_attn_norm = _norm(c)
    self.cross_attn = self.make_cross_attention()
    self.pre_mlp_norm = _norm(c)
    self.mlp = self.make_ffn()

  @property
  def layer_index(self) -> int:
    return self.layer if self.layer is not None else int(self.name.rsplit("_", 1)[1])

  def make_self_attention(self) -> nn.Module:
    """Causal self-attention; PEFT variants override this."""
    return _attention(self.config)

  def make_cross_attention(self) -> nn.Module:
    """Cross-attention to the encoder; PEFT variants override this."""
    return _attention(self.config)

  def make_ffn(self) -> nn.Module:
    """The FFN of this block; PEFT / MoE variants override this."""
    return _ffn(self.config)

  def cross_kv(self, enc_BSD: Array) -> KVCache:
    """Cross-attention keys/values of the encoder output (computed once per sequence)."""
    return self.cross_attn.project_kv(enc_BSD)

  def stack_side(self, enc_BSD: Array) -> KVCache:  # a scanned stack's per-layer side call
    return self.cross_kv(enc_BSD)

  def __call__(self, x_BLD: Array, *, self_mask_BLS: Array, bias_BHLS: Array,
               cross_mask_BLS: Array, enc_BSD: Array | None = None,
               cross_kv: KVCache | None = None, cache: KVCache | None = None,
               cache_index: Array | None = None) -> tuple[Array, KVCache | None]:
    if enc_BSD is None and cross_kv is None:
      raise ValueError("T5DecoderBlock needs enc_BSD or a precomputed cross_kv")
    h, new_cache = self.self_attn(self.pre_self_attn_norm(x_BLD), mask_BLS=self_mask_BLS,
                                  bias_BHLS=bias_BHLS, cache=cache, cache_index=cache_index)
    x_BLD = x_BLD + stack.checkpoint_name(h, "attn_out")
    h, _ = self.cross_attn(self.pre_cross_attn_norm(x_BLD), mask_BLS=cross_mask_BLS,
                           kv_source_BSD=enc_BSD, kv=cross_kv)
    x_BLD = x_BLD + stack.checkpoint_name(h, "cross_attn_out")
    x_BLD = x_BLD + stack.checkpoint_name(self.mlp(self.pre_mlp_norm(x_BLD)), "ffn_out")
    return nn.with_logical_constraint(x_BLD, ("batch", "length", "embed")), new_cache


def _relpos(c: T5Config, bidirectional: bool) -> RelativePositionBias:
  return RelativePositionBias(num_buckets=c.relative_attention_num_buckets,
                              max_distance=c.relative_attention_max_distance,
                              num_heads=c.num_heads, bidirectional=bidirectional,
                              param_dtype=c.param_dtype)


class T5Encoder(nn.Module):
  """Encoder stack over already-embedded tokens: blocks -> final norm."""

  config: T5Config
  block_cls: type[T5EncoderBlock] = T5EncoderBlock

  def setup(self):
    c = self.config
    self.layers = stack.make_blocks(self.block_cls, c, c.num_layers, scan=c.scan_layers,
                                    remat_policy=c.remat_policy)
    self.relpos_bias = _relpos(c, bidirectional=True)
    self.final_norm = _norm(c)

  def __call__(self, x_BLD: Array, valid_BL: Array, segment_ids_BL: Array | None = None
               ) -> Array:
    l = x_BLD.shape[1]
    bias_BHLS = self.relpos_bias(jnp.arange(l), jnp.arange(l))  # packed too (module doc)
    # Structured: .dense(l) is encoder_mask(valid_BL, l) & same-segment.
    mask_BLS = AttentionMask(kv_valid_BS=valid_BL, q_valid_BL=valid_BL,
                             q_segment_ids_BL=segment_ids_BL, kv_segment_ids_BS=segment_ids_BL)
    if self.config.scan_layers:
      shared = dict(mask_BLS=mask_BLS, bias_BHLS=bias_BHLS)
      return self.final_norm(stack.run_scanned(self.layers, x_BLD, None, shared)[0])
    for layer in self.layers:
      x_BLD = layer(x_BLD, mask_BLS=mask_BLS, bias_BHLS=bias_BHLS)
    return self.final_norm(x_BLD)


@flax.struct.dataclass
class T5DecodeCache:
  """Decoder state for incremental decoding.

  Attributes:
    self_attn: per decoder layer, self-attention ``KVCache`` ``[B, S, H, Dh]``
      (scanned stacks: one ``KVCache`` ``[N, B, S, H, Dh]``).
    cross_attn: per decoder layer, the encoder's keys/values ``[B, S_enc, H, Dh]``
      (scanned stacks: one, stacked the same way).
    enc_valid_BS: which encoder positions are real tokens.
    valid_BS: which decoder slots hold real tokens.
    index: next decoder slot to write (int32 scalar, shared by the batch).
  """

  self_attn: tuple[KVCache, ...]
  cross_attn: tuple[KVCache, ...]
  enc_valid_BS: Array
  valid_BS: Array
  index: Array


class T5Decoder(nn.Module):
  """Decoder stack over already-embedded tokens: blocks -> final norm."""

  config: T5Config
  block_cls: type[T5DecoderBlock] = T5DecoderBlock

  def setup(self):
    c = self.config
    self.layers = stack.make_blocks(self.block_cls, c, c.decoder_layers, scan=c.scan_layers,
                                    remat_policy=c.remat_policy)
    self.relpos_bias = _relpos(c, bidirectional=False)
    self.final_norm = _norm(c)

  def cross_kv(self, enc_BSD: Array) -> tuple[KVCache, ...]:
    if self.config.scan_layers:
      return self.layers.call_side(enc_BSD, ({},), (enc_BSD,))[1]
    return tuple(layer.cross_kv(enc_BSD) for layer in self.layers)

  def __call__(self, x_BLD: Array, *, valid_BS: Array, index: Array, enc_valid_BS: Array,
               enc_BSD: Array | None = None, cross_kvs: tuple[KVCache, ...] | None = None,
               caches: tuple[KVCache, ...] | None = None,
               segment_ids_BL: Array | None = None, enc_segment_ids_BS: Array | None = None,
               ) -> tuple[Array, tuple[KVCache | None, ...]]:
    l = x_BLD.shape[1]
    q_slots_L = index + jnp.arange(l)
    # Structured masks (fused kernels); without caches the queries sit at slots 0..L-1.
    self_mask_BLS = AttentionMask(kv_valid_BS=valid_BS,
                                  q_valid_BL=valid_BS if caches is None else None,
                                  q_slots_L=None if caches is None else q_slots_L, causal=True)
    cross_mask_BLS = AttentionMask(kv_valid_BS=enc_valid_BS)
    if segment_ids_BL is None:
      bias_BHLS = self.relpos_bias(q_slots_L, jnp.arange(valid_BS.shape[1]))
    else:  # packed rows: positions restart per segment; attend within the segment only
      bias_BHLS = self.relpos_bias(jnp.arange(l), jnp.arange(l))  # one for all rows (module doc)
      self_mask_BLS = self_mask_BLS.replace(q_segment_ids_BL=segment_ids_BL,
                                            kv_segment_ids_BS=segment_ids_BL)
      if enc_segment_ids_BS is None:
        raise ValueError("packed decoding needs the encoder's segment ids too")
      cross_mask_BLS = cross_mask_BLS.replace(q_segment_ids_BL=segment_ids_BL,
                                              kv_segment_ids_BS=enc_segment_ids_BS)
    if self.config.scan_layers:
      layer_in = None if caches is None else ({"cache": caches[0], "cross_kv": (
          None if cross_kvs is None else cross_kvs[0])},)
      x_BLD, new_caches, _ = stack.run_scanned(
          self.layers, x_BLD, layer_in,
          dict(self_mask_BLS=self_mask_BLS, bias_BHLS=bias_BHLS, cross_mask_BLS=cross_mask_BLS,
               enc_BSD=enc_BSD, cache_index=index))
      return self.final_norm(x_BLD), new_caches
    new_caches = []
    for i, layer in enumerate(self.layers):
      x_BLD, new_cache = layer(
          x_BLD, self_mask_BLS=self_mask_BLS, bias_BHLS=bias_BHLS, cross_mask_BLS=cross_mask_BLS,
          enc_BSD=enc_BSD, cross_kv=None if cross_kvs is None else cross_kvs[i],
          cache=None if caches is None else caches[i], cache_index=index)
      new_caches.append(new_cache)
    return self.final_norm(x_BLD), tuple(new_caches)


def _bool_or_ones(valid: Array | None, shape: tuple[int, int]) -> Array:
  if valid is None:
    return jnp.ones(shape, bool)
  if tuple(valid.shape) != tuple(shape):
    raise ValueError(f"valid mask has shape {tuple(valid.shape)}, expected {tuple(shape)} "
                     "(the shape of the tokens)")
  return jnp.asarray(valid, bool)


class T5(nn.Module):
  """T5 encoder-decoder LM.

  Methods (use ``model.apply(variables, ..., method=T5.encode)`` etc.):
    ``encode(tokens_BL, valid_BL=None) -> enc_BLD``
    ``init_cache(batch, max_len=None, dtype=None) -> T5DecodeCache`` (empty; no parameters)
    ``init_decode_cache(enc_BLD, enc_valid_BL=None, max_len=None) -> T5DecodeCache``
    ``decode(tokens_BL, *, enc_BLD=None, enc_valid_BL=None, valid_BL=None, cache=None)
      -> (logits_BLV, new cache or None)``
    ``__call__(enc_tokens_BL, dec_tokens_BL, *, enc_valid_BL=None, dec_valid_BL=None)
      -> (logits_BLV, None)``

  ``valid`` masks default to all-True; padding is never inferred from
  ``pad_token_id`` (T5's decoder start token *is* the pad id).
  """

  config: T5Config
  encoder_block_cls: type[T5EncoderBlock] = T5EncoderBlock
  decoder_block_cls: type[T5DecoderBlock] = T5DecoderBlock

  def setup(self):
    c = self.config
    common = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    self.shared = Embed(c.vocab_size, c.d_model, **common)
    self.encoder = T5Encoder(config=c, block_cls=self.encoder_block_cls)
    self.decoder = T5Decoder(config=c, block_cls=self.decoder_block_cls)
    if not c.tie_word_embeddings:
      self.lm_head = Linear(c.vocab_size, ("embed", "vocab"), **common)

  def _embed(self, tokens_BL: Array) -> Array:
    x = self.shared(tokens_BL)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def _logits(self, x_BLD: Array) -> Array:
    c = self.config
    if c.tie_word_embeddings:
      logits = self.shared.attend(x_BLD * (c.d_model ** -0.5))
    else:
      logits = self.lm_head(x_BLD)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  def encode(self, tokens_BL: Array, valid_BL: Array | None = None,
             segment_ids_BL: Array | None = None) -> Array:
    """Encoder output ``[B, L, D]`` (after the final norm).

    ``segment_ids_BL`` (packed rows, 0 = padding) restricts attention to each
    segment and restarts relative positions; ``valid_BL`` then defaults to
    ``segment_ids_BL > 0``.
    """
    if valid_BL is None and segment_ids_BL is not None:
      valid_BL = jnp.asarray(segment_ids_BL) > 0
    valid_BL = _bool_or_ones(valid_BL, tokens_BL.shape)
    return self.encoder(self._embed(tokens_BL), valid_BL, segment_ids_BL)

  @nn.nowrap
  def init_cache(self, batch: int, max_len: int | None = None, dtype: Any = None) -> T5DecodeCache:
    """Empty decoder cache (no parameters); the first :meth:`decode` stores the encoder kv."""
    c = self.config
    slots = max_len or c.max_seq_len
    dtype = jnp.dtype(dtype or c.dtype)
    self_attn = tuple(KVCache.zeros(batch, slots, c.num_heads, c.d_kv, dtype)
                      for _ in range(c.decoder_layers))
    return T5DecodeCache(
        self_attn=(stack.stack_leading(self_attn),) if c.scan_layers else self_attn,
        cross_attn=(), enc_valid_BS=jnp.zeros((batch, 0), bool),
        valid_BS=jnp.zeros((batch, slots), bool), index=jnp.zeros((), jnp.int32))

  def init_decode_cache(self, enc_BLD: Array, enc_valid_BL: Array | None = None,
                        max_len: int | None = None) -> T5DecodeCache:
    """:meth:`init_cache` with the cross-attention keys/values precomputed."""
    return self._with_encoder(self.init_cache(enc_BLD.shape[0], max_len), enc_BLD, enc_valid_BL)

  def _with_encoder(self, cache: T5DecodeCache, enc_BLD: Array,
                    enc_valid_BL: Array | None) -> T5DecodeCache:
    return cache.replace(cross_attn=self.decoder.cross_kv(enc_BLD),
                         enc_valid_BS=_bool_or_ones(enc_valid_BL, enc_BLD.shape[:2]))

  def decode(self, tokens_BL: Array, *, enc_BLD: Array | None = None,
             enc_valid_BL: Array | None = None, valid_BL: Array | None = None,
             cache: T5DecodeCache | None = None, segment_ids_BL: Array | None = None,
             enc_segment_ids_BL: Array | None = None) -> tuple[Array, T5DecodeCache | None]:
    """Decoder logits; teacher-forced without ``cache``, incremental with it.

    Without a cache, ``enc_BLD`` (and optionally ``enc_valid_BL``) is required
    and the decoder is causal over ``tokens_BL``. With a cache, the tokens are
    written at slots ``cache.index ..`` and the cached encoder keys/values are
    used; ``enc_BLD`` must then be omitted, except with a cache fresh from
    :meth:`init_cache`, which stores the ones of ``enc_BLD``. The caller keeps
    ``cache.index + L <= slots`` (as with any fixed-size cache, writes past
    the end are clamped by ``dynamic_update_slice``).
    """
    b, l = tokens_BL.shape
    if valid_BL is None and segment_ids_BL is not None:
      valid_BL = jnp.asarray(segment_ids_BL) > 0
    valid_BL = _bool_or_ones(valid_BL, (b, l))
    x_BLD = self._embed(tokens_BL)
    if cache is None:
      if enc_BLD is None:
        raise ValueError("T5.decode without a cache needs enc_BLD (the encoder output)")
      if enc_valid_BL is None and enc_segment_ids_BL is not None:
        enc_valid_BL = jnp.asarray(enc_segment_ids_BL) > 0
      enc_valid_BS = _bool_or_ones(enc_valid_BL, enc_BLD.shape[:2])
      h, _ = self.decoder(x_BLD, valid_BS=valid_BL, index=jnp.zeros((), jnp.int32),
                          enc_valid_BS=enc_valid_BS, enc_BSD=enc_BLD,
                          segment_ids_BL=segment_ids_BL, enc_segment_ids_BS=enc_segment_ids_BL)
      return self._logits(h), None
    if segment_ids_BL is not None:
      raise ValueError("segment_ids_BL (packing) is for training; it cannot be used with a cache")
    if not cache.cross_attn:  # fresh from init_cache: store the encoder's keys/values
      if enc_BLD is None:
        raise ValueError("T5.decode: a cache fresh from init_cache needs enc_BLD")
      cache = self._with_encoder(cache, enc_BLD, enc_valid_BL)
    elif enc_BLD is not None or enc_valid_BL is not None:
      raise ValueError("T5.decode with a cache uses the cached encoder keys/values; "
                       "do not pass enc_BLD / enc_valid_BL (give them to init_decode_cache)")
    index = cache.index
    valid_BS = jax.lax.dynamic_update_slice(cache.valid_BS, valid_BL, (0, index))
    h, new_self = self.decoder(x_BLD, valid_BS=valid_BS, index=index,
                               enc_valid_BS=cache.enc_valid_BS, cross_kvs=cache.cross_attn,
                               caches=cache.self_attn)
    new_cache = T5DecodeCache(self_attn=new_self, cross_attn=cache.cross_attn,
                              enc_valid_BS=cache.enc_valid_BS, valid_BS=valid_BS,
                              index=index + l)
    return self._logits(h), new_cache

  def __call__(self, enc_tokens_BL: Array, dec_tokens_BL: Array, *,
               enc_valid_BL: Array | None = None, dec_valid_BL: Array | None = None,
               enc_segment_ids_BL: Array | None = None, dec_segment_ids_BL: Array | None = None
               ) -> tuple[Array, None]:
    """Teacher-forced logits ``[B, L_dec, V]`` (the cache slot is ``None``).

    Segment ids (seqio's packed ``encoder_segment_ids`` / ``decoder_segment_ids``)
    must be given for both sides or neither.
    """
    if (enc_segment_ids_BL is None) != (dec_segment_ids_BL is None):
      raise ValueError("give both enc_segment_ids_BL and dec_segment_ids_BL, or neither")
    enc_BLD = self.encode(enc_tokens_BL, enc_valid_BL, enc_segment_ids_BL)
    return self.decode(dec_tokens_BL, enc_BLD=enc_BLD, enc_valid_BL=enc_valid_BL,
                       valid_BL=dec_valid_BL, segment_ids_BL=dec_segment_ids_BL,
                       enc_segment_ids_BL=enc_segment_ids_BL)


def t5_from_config(config: T5Config) -> T5:
  return T5(config=config)
