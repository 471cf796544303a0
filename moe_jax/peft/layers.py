"""Adapted layers and blocks, and :func:`adapt`, which puts them into a backbone.

Legend: B batch, L tokens, S key tokens, D model dim, H heads, K kv heads,
Dh head dim, F ffn dim.

**The parameter tree stays the backbone's.** :class:`PeftAttention` and
:class:`PeftMlp` are subclasses of :class:`~moe_jax.nn.attention.Attention`
and :class:`~moe_jax.nn.mlp.Mlp` with the same fields and the same ``q/k/v/o``
/ ``wi*/wo`` parameters; each adapter is an extra child named
``peft_<site>`` next to them (``layers_0/attn/peft_v/scale``,
``layers_0/mlp/peft_wi_0/lora_a``, ``layers_0/mlp/peft_hidden/router/kernel``).
A pretrained checkpoint therefore restores into the adapted model as is, and
:func:`moe_jax.peft.trainable_mask` is a rule on names.

**How the adapters hook in.** The blocks' ``make_attention`` / ``make_ffn``
factories return the Peft subclasses; those override the projection hooks
(``Attention.project_q/k/v/out``, ``Mlp.adapt_projection`` and the FFN's
``hidden_transform``). The adapted blocks also override ``__call__`` to hand
each sublayer a :class:`~moe_jax.peft.routers.RouteContext` (the router
inputs and the padding mask, derived from the block's own attention mask, so
the models' call signatures do not change): that is how the sentence-level
router learns which tokens are padding, and how an ``o`` or ``wo`` router
reads the sublayer's normed input rather than the projection's own input.
The overridden ``__call__`` does exactly what the base block does plus the
context; ``tests/peft`` checks that an adapted model at initialisation gives
the backbone's logits bit for bit, for every block variant.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax

from moe_jax.models.decoder import Decoder, DecoderBlock
from moe_jax.models.t5 import T5, T5DecoderBlock, T5EncoderBlock
from moe_jax.nn.attention import Attention, KVCache
from moe_jax.nn.mlp import Mlp
from moe_jax.peft.adapters import LoraAdapter, ScaleAdapter
from moe_jax.peft.config import ADAPTER_PREFIX, PeftConfig
from moe_jax.peft.routers import (RouteContext, cross_attention_context,
                                  self_attention_context, with_query)

Array = jax.Array


def _require(peft: PeftConfig | None, owner: str) -> PeftConfig:
  if not isinstance(peft, PeftConfig):
    raise ValueError(f"{owner} needs a PeftConfig (peft=...), got {peft!r}; build adapted "
                     "models with moe_jax.peft.adapt(module, peft_config)")
  return peft


# ----------------------------------------------------------------------------- attention


class PeftAttention(Attention):
  """:class:`Attention` with adapters on its ``q/k/v/o`` sites (``peft.attention_sites()``).

  Router inputs come from the ``context`` (:class:`RouteContext`) given to
  ``__call__``; without one, each site routes on the token representation:
  ``q``/``o`` on this call's ``x_BLD``, ``k``/``v`` on their own input (which
  is how cross-attention keys are projected from ``T5DecoderBlock.cross_kv``).
  """

  peft: PeftConfig | None = None

  def setup(self):
    super().setup()
    p = _require(self.peft, type(self).__name__)
    shapes = {"q": ((self.num_heads, self.head_dim), ("heads", "kv")),
              "k": ((self.num_kv_heads, self.head_dim), ("kv_heads", "kv")),
              "v": ((self.num_kv_heads, self.head_dim), ("kv_heads", "kv")),
              "o": ((self.out_features,), ("embed",))}
    for site in p.attention_sites():
      out, out_axes = shapes[site]
      if not p.is_lora:
        adapter = ScaleAdapter(peft=p, axes=out_axes)
      else:
        in_axes = ("heads", "kv") if site == "o" else ("embed",)
        adapter = LoraAdapter(peft=p, in_axes=in_axes, out_features=out, out_axes=out_axes,
                              dtype=self.dtype)
      setattr(self, ADAPTER_PREFIX + site, adapter)

  def _adapt(self, site: str, x: Array, y: Array, route_x: Array | None,
             valid: Array | None) -> Array:
    if site not in self.peft.sites:
      return y
    adapter = getattr(self, ADAPTER_PREFIX + site)
    if self.peft.is_lora:
      return y + adapter(x, route_x=route_x, valid=valid)
    return adapter(y, route_x=route_x, valid=valid)

  def _kv_route(self, x_BSD: Array, context: RouteContext | None
                ) -> tuple[Array, Array | None]:
    if context is not None and context.kv_BSD is not None:
      return context.kv_BSD, context.kv_valid_BS
    if self.peft.router == "sentence" and self.peft.is_mixture:
      raise ValueError(
          f"{self.name}: sentence-level routing of keys/values needs the padding mask, which "
          "only a full-sequence call provides; precomputed cross-attention keys "
          "(T5.init_decode_cache / cross_kv) and KV-cache decoding need router='token'")
    return x_BSD, None if context is None else context.kv_valid_BS

  def project_q(self, x_BLD: Array, context: Any = None) -> Array:
    route = x_BLD if context is None else context.query_BLD
    valid = None if context is None else context.query_valid_BL
    return self._adapt("q", x_BLD, self.q(x_BLD), route, valid)

  def project_k(self, x_BSD: Array, context: Any = None) -> Array:
    return self._adapt("k", x_BSD, self.k(x_BSD), *self._kv_route(x_BSD, context))

  def project_v(self, x_BSD: Array, context: Any = None) -> Array:
    return self._adapt("v", x_BSD, self.v(x_BSD), *self._kv_route(x_BSD, context))

  def project_out(self, out_BLHD: Array, context: Any = None) -> Array:
    if context is None:  # only reachable when called outside __call__
      raise ValueError(f"{self.name}: project_out needs the RouteContext of this call")
    return self._adapt("o", out_BLHD, self.o(out_BLHD), context.query_BLD,
                       context.query_valid_BL)

  def __call__(self, x_BLD: Array, *, context: RouteContext | None = None, **kwargs
               ) -> tuple[Array, KVCache | None]:
    if context is None:
      context = RouteContext(query_BLD=x_BLD)
    return super().__call__(x_BLD, context=context, **kwargs)


# ----------------------------------------------------------------------------- FFN


class PeftMlp(Mlp):
  """:class:`Mlp` with adapters: ``ffn`` scales the activated hidden (``peft_hidden``),
  ``ffn_in`` / ``ffn_out`` add LoRA to ``wi*`` / ``wo`` (``peft_wi_0`` ...).

  Every FFN router reads the FFN's input (``context.query_BLD``, by default
  ``x_BLD``), including the ``wo`` router, whose projection input is the hidden.
  """

  peft: PeftConfig | None = None

  def setup(self):
    p = _require(self.peft, type(self).__name__)
    if "ffn" in p.sites:
      setattr(self, ADAPTER_PREFIX + "hidden", ScaleAdapter(peft=p, axes=("mlp",)))
    if "ffn_in" in p.sites:
      for name in self._in_names():
        setattr(self, ADAPTER_PREFIX + name, LoraAdapter(
            peft=p, in_axes=("embed",), out_features=(self.hidden_dim,), out_axes=("mlp",),
            dtype=self.dtype))
    if "ffn_out" in p.sites:
      setattr(self, ADAPTER_PREFIX + "wo", LoraAdapter(
          peft=p, in_axes=("mlp",), out_features=(self.out_features,), out_axes=("embed",),
          dtype=self.dtype))

  def _in_names(self) -> tuple[str, ...]:
    return ("wi_0", "wi_1") if self.gated else ("wi",)

  def adapt_projection(self, name: str, x_in: Array, y_out: Array, context: Any = None
                       ) -> Array:
    site = "ffn_out" if name == "wo" else "ffn_in"
    if site not in self.peft.sites:
      return y_out
    adapter = getattr(self, ADAPTER_PREFIX + name)
    return y_out + adapter(x_in, route_x=context.query_BLD, valid=context.query_valid_BL)

  def __call__(self, x_BLD: Array, hidden_transform: Callable[[Array], Array] | None = None,
               *, context: RouteContext | None = None) -> Array:
    ctx = RouteContext(query_BLD=x_BLD) if context is None else context
    if "ffn" not in self.peft.sites:
      return super().__call__(x_BLD, hidden_transform, context=ctx)

    def scale_hidden(h_BLF: Array) -> Array:
      if hidden_transform is not None:
        h_BLF = hidden_transform(h_BLF)
      return getattr(self, ADAPTER_PREFIX + "hidden")(
          h_BLF, route_x=ctx.query_BLD, valid=ctx.query_valid_BL)

    return super().__call__(x_BLD, scale_hidden, context=ctx)


# ----------------------------------------------------------------------------- blocks


def _as(cls: type, base: nn.Module, expected: type, peft: PeftConfig) -> nn.Module:
  """``base`` rebuilt as the Peft subclass ``cls`` with the same fields."""
  if type(base) is not expected:
    raise TypeError(f"cannot adapt a {type(base).__name__}: PEFT adapters wrap "
                    f"{expected.__name__} exactly (a subclass may compute differently)")
  fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(expected)
            if f.init and f.name not in ("parent", "name")}
  return cls(**fields, peft=peft, parent=None)


def _sentence(peft: PeftConfig) -> bool:
  return peft.router == "sentence" and peft.is_mixture


class PeftDecoderBlock(DecoderBlock):
  """:class:`DecoderBlock` with PEFT attention / FFN and routing contexts."""

  peft: PeftConfig | None = None

  def make_attention(self) -> nn.Module:
    return _as(PeftAttention, super().make_attention(), Attention, self.peft)

  def make_ffn(self) -> nn.Module:
    return _as(PeftMlp, super().make_ffn(), Mlp, self.peft)

  def __call__(self, x_BLD: Array, *, mask_BLS: Array, positions_BL: Array,
               cache: KVCache | None = None, cache_index: Array | None = None
               ) -> tuple[Array, KVCache | None]:
    h = self.input_norm(x_BLD)
    ctx = self_attention_context(h, mask_BLS, cache_index, sentence=_sentence(self.peft))
    attn_out, new_cache = self.attn(h, mask_BLS=mask_BLS, positions_BL=positions_BL,
                                    cache=cache, cache_index=cache_index, context=ctx)
    if self.config.parallel_block:
      x_BLD = x_BLD + attn_out + self.mlp(h, context=ctx)
    else:
      x_BLD = x_BLD + attn_out
      h = self.post_attn_norm(x_BLD)
      x_BLD = x_BLD + self.mlp(h, context=with_query(ctx, h, mask_BLS))
    x_BLD = nn.with_logical_constraint(x_BLD, ("batch", "length", "embed"))
    return x_BLD, new_cache


class PeftT5EncoderBlock(T5EncoderBlock):
  """:class:`T5EncoderBlock` with PEFT attention / FFN and routing contexts."""

  peft: PeftConfig | None = None

  def make_attention(self) -> nn.Module:
    return _as(PeftAttention, super().make_attention(), Attention, self.peft)

  def make_ffn(self) -> nn.Module:
    return _as(PeftMlp, super().make_ffn(), Mlp, self.peft)

  def __call__(self, x_BLD: Array, *, mask_BLS: Array, bias_BHLS: Array) -> Array:
    h = self.pre_attn_norm(x_BLD)
    ctx = self_attention_context(h, mask_BLS, None, sentence=_sentence(self.peft))
    a, _ = self.attn(h, mask_BLS=mask_BLS, bias_BHLS=bias_BHLS, context=ctx)
    x_BLD = x_BLD + a
    h = self.pre_mlp_norm(x_BLD)
    x_BLD = x_BLD + self.mlp(h, context=with_query(ctx, h, mask_BLS))
    return nn.with_logical_constraint(x_BLD, ("batch", "length", "embed"))


class PeftT5DecoderBlock(T5DecoderBlock):
  """:class:`T5DecoderBlock` with PEFT self-/cross-attention / FFN and routing contexts."""

  peft: PeftConfig | None = None

  def make_self_attention(self) -> nn.Module:
    return _as(PeftAttention, super().make_self_attention(), Attention, self.peft)

  def make_cross_attention(self) -> nn.Module:
    return _as(PeftAttention, super().make_cross_attention(), Attention, self.peft)

  def make_ffn(self) -> nn.Module:
    return _as(PeftMlp, super().make_ffn(), Mlp, self.peft)

  def __call__(self, x_BLD: Array, *, self_mask_BLS: Array, bias_BHLS: Array,
               cross_mask_BLS: Array, enc_BSD: Array | None = None,
               cross_kv: KVCache | None = None, cache: KVCache | None = None,
               cache_index: Array | None = None) -> tuple[Array, KVCache | None]:
    if enc_BSD is None and cross_kv is None:
      raise ValueError("T5DecoderBlock needs enc_BSD or a precomputed cross_kv")
    h = self.pre_self_attn_norm(x_BLD)
    ctx = self_attention_context(h, self_mask_BLS, cache_index, sentence=_sentence(self.peft))
    a, new_cache = self.self_attn(h, mask_BLS=self_mask_BLS, bias_BHLS=bias_BHLS, cache=cache,
                                  cache_index=cache_index, context=ctx)
    x_BLD = x_BLD + a
    h = self.pre_cross_attn_norm(x_BLD)
    cross_ctx = cross_attention_context(with_query(ctx, h, self_mask_BLS), cross_mask_BLS,
                                        enc_BSD)
    a, _ = self.cross_attn(h, mask_BLS=cross_mask_BLS, kv_source_BSD=enc_BSD, kv=cross_kv,
                           context=cross_ctx)
    x_BLD = x_BLD + a
    h = self.pre_mlp_norm(x_BLD)
    x_BLD = x_BLD + self.mlp(h, context=with_query(ctx, h, self_mask_BLS))
    return nn.with_logical_constraint(x_BLD, ("batch", "length", "embed")), new_cache


# ----------------------------------------------------------------------------- adapt


def _block_peft(block_cls: Any) -> PeftConfig | None:
  if isinstance(block_cls, functools.partial):
    return block_cls.keywords.get("peft")
  return None


def peft_config_of(module: nn.Module) -> PeftConfig | None:
  """The :class:`PeftConfig` of a module made by :func:`adapt` (``None`` if not adapted)."""
  for attr in ("block_cls", "encoder_block_cls"):
    if hasattr(module, attr):
      return _block_peft(getattr(module, attr))
  return None


def adapt(model: Any, peft: PeftConfig) -> nn.Module:
  """The backbone module with adapters, per ``peft``.

  Args:
    model: a :class:`~moe_jax.models.decoder.Decoder` or
      :class:`~moe_jax.models.t5.T5` module, or a
      :class:`~moe_jax.checkpoints.LoadedModel` (its module is used).
    peft: what to adapt.

  Returns:
    A module of the same class whose blocks carry the adapters; its
    parameter tree is the backbone's plus ``peft_*`` children (see
    :func:`moe_jax.peft.init_adapter_params`).

  Raises:
    TypeError: an unsupported module, or one that is already adapted.
  """
  _require(peft, "adapt")
  module = getattr(model, "module", model)
  if peft_config_of(module) is not None:
    raise TypeError(f"{type(module).__name__} is already adapted "
                    f"({peft_config_of(module).method}); adapt the backbone instead")
  if isinstance(module, Decoder):
    if module.block_cls is not DecoderBlock:
      raise TypeError(f"adapt supports Decoder with the default DecoderBlock, not "
                      f"{getattr(module.block_cls, '__name__', module.block_cls)!r}")
    return module.clone(block_cls=functools.partial(PeftDecoderBlock, peft=peft))
  if isinstance(module, T5):
    if (module.encoder_block_cls is not T5EncoderBlock
        or module.decoder_block_cls is not T5DecoderBlock):
      raise TypeError("adapt supports T5 with the default T5EncoderBlock / T5DecoderBlock")
    return module.clone(
        encoder_block_cls=functools.partial(PeftT5EncoderBlock, peft=peft),
        decoder_block_cls=functools.partial(PeftT5DecoderBlock, peft=peft))
  raise TypeError(f"adapt: unsupported model {type(module).__name__}; expected a Decoder or "
                  "T5 module (or a LoadedModel holding one)")
