"""CALM: a frozen anchor LM composed with frozen augmenting LMs (arXiv 2401.02412).

Legend: B batch, L length (query tokens this call), S cache slots, D_A / D_B
augmenting / anchor model dims, H heads of the composition cross-attention.

For every chosen pair ``(a, b)`` of augmenting layer ``a`` and anchor layer
``b``, a composition layer adds to the anchor's residual stream after layer
``b``::

    x_B += CrossAttn(q = norm(x_B), k = v = W_proj h_A[a])

Both LMs read the same tokens (their tokenizers must agree), so augmenting
state ``t`` and anchor state ``t`` describe the same prefix. The cross-attention
therefore uses *the anchor's own causal, padding-aware mask*: anchor position
``t`` sees augmenting states ``<= t`` only. (Attending to all of ``h_A``, as
published implementations do, leaks the future during teacher-forced training
and silently breaks at generation time; a test checks that no future token
changes a past logit.) For the same reason the augmenting states are cached
and advanced token by token alongside the anchor at generation time.

Stack options of the frozen LMs (:mod:`moe_jax.models.stack`): each config's
``remat_policy`` applies as in any decoder. An augmenting model may be
scanned (``scan_layers=True``): the scan outputs every layer's hidden state
and the paired ones are read from it. The anchor must stay unrolled: the
composition layers add to its residual stream *between* its layers, which a
single scan over the stack cannot do (the config refuses a scanned anchor).

Parameter tree: ``{"anchor": <Decoder params>, "augment_0": <Decoder params>,
..., "composition_a{j}_l{a}_b{b}": {"proj", "norm", "cross_attn"}}``: the
frozen models' subtrees are exactly their checkpoints' trees, and everything
trainable sits under keys starting with ``composition_``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from moe_jax.models import registry
from moe_jax.models.decoder import DecoderConfig, DecodeCache, attention_mask
from moe_jax.nn.attention import Attention, KVCache
from moe_jax.nn.linear import Linear
from moe_jax.nn.norms import RMSNorm

Array = jax.Array


def select_layer_pairs(num_layers_a: int, num_layers_b: int, n: int) -> tuple[tuple[int, int], ...]:
  """The paper's rule: every ``N_A/n``-th layer of m_A paired with every ``N_B/n``-th of m_B.

  Layer ``k`` of the selection (``k = 1..n``) is layer ``k * N / n - 1``
  (0-based) of each model, i.e. the last layer of each of ``n`` equal
  blocks, so the final layers of both models are always paired.
  """
  if not 1 <= n <= min(num_layers_a, num_layers_b):
    raise ValueError(f"number of composition layers n={n} must be in [1, "
                     f"min(N_A={num_layers_a}, N_B={num_layers_b})]")
  for name, total in (("N_A", num_layers_a), ("N_B", num_layers_b)):
    if total % n:
      raise ValueError(f"{name}={total} is not divisible by n={n}; give explicit layer pairs")
  return tuple(((k + 1) * num_layers_a // n - 1, (k + 1) * num_layers_b // n - 1)
               for k in range(n))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompositionConfig:
  """A composed model.

  Attributes:
    anchor: config of the frozen anchor m_B.
    augments: configs of the frozen augmenting models m_A (any sizes/depths).
    layer_pairs: per augmenting model, ``((a, b), ...)`` pairs; ``None`` uses
      :func:`select_layer_pairs` with ``num_composition_layers``.
    num_composition_layers: n of the paper's selection rule.
    num_heads: heads of the cross-attention; default the anchor's.
    zero_init_output: zero the cross-attention output projection so the
      composed model starts exactly as m_B.
    query_norm: RMS-normalise the anchor stream before it forms queries
      (pre-norm, as every other sublayer of the anchor).
  """

  anchor: DecoderConfig
  augments: tuple[DecoderConfig, ...]
  layer_pairs: tuple[tuple[tuple[int, int], ...], ...] | None = None
  num_composition_layers: int = 2
  num_heads: int | None = None
  zero_init_output: bool = True
  query_norm: bool = True

  def __post_init__(self):
    # Lists (gin, JSON) become tuples: the config must stay hashable (it is a
    # flax module attribute, and jit keys on it).
    object.__setattr__(self, "augments", tuple(self.augments))
    if self.layer_pairs is not None:
      object.__setattr__(self, "layer_pairs", tuple(
          tuple((int(a), int(b)) for a, b in ps) for ps in self.layer_pairs))
    if not self.augments:
      raise ValueError("CompositionConfig needs at least one augmenting model")
    if getattr(self.anchor, "scan_layers", False):
      raise ValueError("CompositionConfig: the anchor must be unrolled (scan_layers=False): "
                       "composition layers add to its residual stream between layers; "
                       "augmenting models may be scanned")
    for j, aug in enumerate(self.augments):
      if aug.vocab_size != self.anchor.vocab_size:
        raise ValueError(f"augmenting model {j} has vocab_size {aug.vocab_size} but the anchor "
                         f"has {self.anchor.vocab_size}: their tokenizers must agree")
    pairs = self.pairs
    for j, (aug, ps) in enumerate(zip(self.augments, pairs)):
      for a, b in ps:
        if not (0 <= a < aug.num_layers and 0 <= b < self.anchor.num_layers):
          raise ValueError(f"layer pair ({a}, {b}) for augmenting model {j} is out of range "
                           f"(N_A={aug.num_layers}, N_B={self.anchor.num_layers})")
    if self.layer_pairs is not None and len(self.layer_pairs) != len(self.augments):
      raise ValueError(f"layer_pairs has {len(self.layer_pairs)} entries for "
                       f"{len(self.augments)} augmenting models")
    if self.anchor.d_model % self.heads:
      raise ValueError(f"anchor d_model={self.anchor.d_model} not divisible by "
                       f"num_heads={self.heads}")

  @property
  def pairs(self) -> tuple[tuple[tuple[int, int], ...], ...]:
    if self.layer_pairs is not None:
      return tuple(tuple(tuple(p) for p in ps) for ps in self.layer_pairs)
    return tuple(select_layer_pairs(aug.num_layers, self.anchor.num_layers,
                                    self.num_composition_layers) for aug in self.augments)

  @property
  def heads(self) -> int:
    return self.num_heads or self.anchor.num_heads

  @property
  def vocab_size(self) -> int:
    return self.anchor.vocab_size

  # decoding reads these from ``module.config``
  @property
  def eos_token_id(self):
    return self.anchor.eos_token_id

  @property
  def pad_token_id(self):
    return self.anchor.pad_token_id

  def replace(self, **kw) -> "CompositionConfig":
    return dataclasses.replace(self, **kw)


def layer_name(j: int, a: int, b: int) -> str:
  return f"a{j}_l{a}_b{b}"


class CompositionLayer(nn.Module):
  """Projection ``D_A -> D_B`` then cross-attention from the anchor stream."""

  d_model: int
  num_heads: int
  zero_init_output: bool = True
  query_norm: bool = True
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.proj = Linear(self.d_model, ("embed_aug", "embed"), **common)
    if self.query_norm:
      self.norm = RMSNorm(eps=self.norm_eps, **common)
    head_dim = self.d_model // self.num_heads
    self.cross_attn = Attention(
        num_heads=self.num_heads, num_kv_heads=self.num_heads, head_dim=head_dim,
        out_features=self.d_model, rope_theta=None,
        o_kernel_init=nn.initializers.zeros if self.zero_init_output else None, **common)

  def __call__(self, x_BLD: Array, h_aug_BLA: Array, *, mask_BLS: Array,
               cache: KVCache | None = None, cache_index: Array | None = None
               ) -> tuple[Array, KVCache | None]:
    q_in = self.norm(x_BLD) if self.query_norm else x_BLD
    out, new_cache = self.cross_attn(q_in, mask_BLS=mask_BLS, kv_source_BSD=self.proj(h_aug_BLA),
                                     cache=cache, cache_index=cache_index)
    return x_BLD + out, new_cache


@flax.struct.dataclass
class ComposedCache:
  """Caches of the anchor, every augmenting model and every composition layer."""

  anchor: DecodeCache
  augments: tuple[DecodeCache, ...]
  composition: tuple[tuple[KVCache, ...], ...]


class ComposedModel(nn.Module):
  """Anchor + augmenting decoders + composition layers; the decoder call contract.

  ``__call__(tokens_BL, valid_BL=None, segment_ids_BL=None, cache=None)``
  returns ``(logits_BLV, cache)`` like :class:`moe_jax.models.decoder.Decoder`,
  so :func:`moe_jax.decoding.generate` and the trainer use it unchanged.
  """

  config: CompositionConfig

  def setup(self):
    c = self.config
    # Through the registry: any decoder-only family (dense, MoE, DeepSeek) composes.
    self.anchor = registry.build_module(c.anchor)
    self.augment_models = [registry.build_module(a, name=f"augment_{j}")
                           for j, a in enumerate(c.augments)]
    self.composition = {
        layer_name(j, a, b): CompositionLayer(
            d_model=c.anchor.d_model, num_heads=c.heads, zero_init_output=c.zero_init_output,
            query_norm=c.query_norm, norm_eps=c.anchor.norm_eps, dtype=c.anchor.dtype,
            param_dtype=c.anchor.param_dtype)
        for j, ps in enumerate(c.pairs) for a, b in ps}

  @nn.nowrap
  def init_cache(self, batch: int, max_len: int | None = None, dtype: Any = None
                 ) -> ComposedCache:
    """Empty caches for every model (needs no parameters); the decoders' cache protocol."""
    c = self.config
    max_len = max_len or c.anchor.max_seq_len
    d_head = c.anchor.d_model // c.heads
    comp_dtype = jnp.dtype(dtype or c.anchor.dtype)
    return ComposedCache(
        anchor=registry.build_module(c.anchor).init_cache(batch, max_len, dtype),
        augments=tuple(registry.build_module(a).init_cache(batch, max_len, dtype)
                       for a in c.augments),
        composition=tuple(tuple(KVCache.zeros(batch, max_len, c.heads, d_head, comp_dtype)
                                for _ in ps) for ps in c.pairs))

  def __call__(self, tokens_BL: Array, *, valid_BL: Array | None = None,
               segment_ids_BL: Array | None = None, positions_BL: Array | None = None,
               cache: ComposedCache | None = None, sow_hidden: bool = False
               ) -> tuple[Array, ComposedCache | None]:
    c = self.config
    b, l = tokens_BL.shape
    if valid_BL is None:
      valid_BL = (jnp.ones((b, l), bool) if segment_ids_BL is None
                  else jnp.asarray(segment_ids_BL) > 0)
    valid_BL = jnp.asarray(valid_BL, bool)
    kw = dict(valid_BL=valid_BL, segment_ids_BL=segment_ids_BL, positions_BL=positions_BL)

    # 1. Augmenting models: keep the hidden states of the paired layers.
    hidden: dict[tuple[int, int], Array] = {}
    new_aug = []
    for j, model in enumerate(self.augment_models):
      wanted = {a for a, _ in c.pairs[j]}

      def keep(i, x, j=j, wanted=wanted):
        if i in wanted:
          hidden[(j, i)] = x
        return x

      _, aug_cache = model(tokens_BL, cache=None if cache is None else cache.augments[j],
                           after_layer=keep, **kw)
      new_aug.append(aug_cache)

    # 2. The composition layers' mask is the anchor's: causal over slots, padding-aware.
    if cache is None:
      valid_BS, index = valid_BL, jnp.zeros((), jnp.int32)
    else:
      index = cache.anchor.index
      valid_BS = jax.lax.dynamic_update_slice(cache.anchor.valid_BS, valid_BL, (0, index))
    mask_BLS = attention_mask(valid_BS, index + jnp.arange(l), None)
    if segment_ids_BL is not None:
      mask_BLS &= segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]

    # 3. Anchor, with composition layers added after their paired layers.
    by_anchor_layer: dict[int, list[tuple[int, int, int]]] = {}
    for j, ps in enumerate(c.pairs):
      for k, (a, b_layer) in enumerate(ps):
        by_anchor_layer.setdefault(b_layer, []).append((j, k, a))
    new_comp = [[None] * len(ps) for ps in c.pairs]

    def compose(i, x):
      for j, k, a in by_anchor_layer.get(i, ()):
        layer = self.composition[layer_name(j, a, i)]
        x, new = layer(x, hidden[(j, a)], mask_BLS=mask_BLS,
                       cache=None if cache is None else cache.composition[j][k],
                       cache_index=index)
        new_comp[j][k] = new
      return x

    logits, anchor_cache = self.anchor(tokens_BL, cache=None if cache is None else cache.anchor,
                                       after_layer=compose, sow_hidden=sow_hidden, **kw)
    if cache is None:
      return logits, None
    return logits, ComposedCache(anchor=anchor_cache, augments=tuple(new_aug),
                                 composition=tuple(tuple(x) for x in new_comp))
