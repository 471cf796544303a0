"""How adapters attach to any model: :func:`adapt`, by interception of its projections.

Legend: B batch, L tokens, S key tokens, D model dim.

**Nothing of the backbone is copied or rebuilt.** :func:`adapt` returns the
backbone module itself (a subclass that only adds the ``peft`` field) whose
calls run under :func:`flax.linen.intercept_methods`. The interceptor
watches two kinds of module calls:

* a *sublayer* (a module registered with :func:`register_sublayer`:
  :class:`~moe_jax.nn.attention.Attention`,
  :class:`~moe_jax.moe.attention_mixture.AttentionMixture`,
  :class:`~moe_jax.nn.mlp.Mlp`): it records the routing context of the call
  (:class:`~moe_jax.peft.routers.RouteContext`: router inputs, real-token
  mask), read off the call's own arguments (``x``, ``mask_BLS``,
  ``cache_index``, ``kv_source_BSD``);
* a *projection* of a sublayer (its ``q``/``k``/``v``/``o`` or
  ``wi*``/``wo`` child): the output (or, for the FFN hidden, the input) goes
  through the adapter of its site (:data:`SITES`), built by the method's
  adapter family (:data:`moe_jax.peft.adapters.ADAPTERS`) in the
  *sublayer's* scope.

So the blocks, attention modules and FFNs of every family (dense and MoE
decoders, BAM decoders, T5, CALM compositions) keep their own forward passes
and know nothing of adapters, and the parameter tree is the backbone's plus
``peft_<site>`` children next to the projections they adapt
(``layers_0/attn/peft_v/scale``, ``layers_0/mlp/peft_wi_0/lora_a``,
``layers_0/mlp/peft_hidden/router/kernel``): a pretrained checkpoint restores
into the adapted model as is, and :func:`moe_jax.peft.trainable_mask` is a
rule on names.

**Routing contexts** follow the block structure without knowing it: a
self-attention call (no ``kv_source_BSD`` / ``kv``) records its context for
its parent (the block) while the parent's call lasts; the block's FFN and
cross-attention read it (the FFN's routers see the FFN's normed input, its
padding mask is the self-attention's). A cross-attention without a
self-attention beside it (a CALM composition layer) reads a slot-aligned
stream: its mask is treated as the queries' own causal mask. An FFN nested
in another module (an MoE layer's shared expert) uses the nearest enclosing
block's record.

**Routed experts** (:class:`~moe_jax.moe.experts.RoutedExperts`, kind
``"experts"``) make no projection calls: they hand their stacked kernels to
the dispatch. Their kernel holders' calls (``wi_0``/``wi_1``/``wi``/``wo``)
are intercepted instead and return the kernels adapted per expert
(``expert_*`` sites, :class:`~moe_jax.peft.adapters.ExpertLora`), so every
dispatch path computes the adapted experts.

**What is not a site.** The fused output projection of a mixture of
attention (``o`` is combined with the expert weights in one contraction;
asking for ``o`` there raises). A BAM attention expert's ``q``/``k``/``v``
carry an expert axis ``[B, L, E, ...]``; one adapter serves every expert.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.models import registry
from moe_jax.moe.attention_mixture import AttentionMixture
from moe_jax.moe.experts import RoutedExperts
from moe_jax.nn.attention import Attention
from moe_jax.nn.attention_kernels import as_dense_mask
from moe_jax.nn.latent_attention import LatentAttention
from moe_jax.nn.mlp import Mlp
from moe_jax.peft.adapters import ADAPTERS, Projection
from moe_jax.peft.config import ADAPTER_PREFIX, PeftConfig
from moe_jax.peft.routers import (RouteContext, cross_attention_context, masked_mean,
                                  self_attention_context, with_query)

Array = jax.Array


# ----------------------------------------------------------------------------- registries


@dataclasses.dataclass(frozen=True, kw_only=True)
class Site:
  """Where a site's adapters sit.

  Attributes:
    sublayer: the kind of sublayer (``"attention"``, ``"ffn"`` or ``"experts"``:
      the stacked kernels of routed experts, adapted per expert).
    projections: names of the sublayer's projection children it adapts.
    on: ``"output"`` (the projection's output is adapted) or ``"input"``
      (its input is: the FFN hidden, before ``wo``).
    route: ``"query"`` (routers read the sublayer's tokens) or ``"kv"`` (the
      key/value tokens).
    adapter_name: the adapter's module name without the prefix; ``None``: the
      projection's name (``peft_q``, ``peft_wi_0``).
  """

  sublayer: str
  projections: tuple[str, ...]
  on: str = "output"
  route: str = "query"
  adapter_name: str | None = None


SITES: dict[str, Site] = {
    "q": Site(sublayer="attention", projections=("q",)),
    "k": Site(sublayer="attention", projections=("k",), route="kv"),
    "v": Site(sublayer="attention", projections=("v",), route="kv"),
    "o": Site(sublayer="attention", projections=("o",)),
    "ffn": Site(sublayer="ffn", projections=("wo",), on="input", adapter_name="hidden"),
    "ffn_in": Site(sublayer="ffn", projections=("wi", "wi_0", "wi_1")),
    "ffn_out": Site(sublayer="ffn", projections=("wo",)),
    # routed experts: the stacked kernels themselves are adapted, one adapter per expert
    "expert_ffn": Site(sublayer="experts", projections=("wo",), on="input",
                       adapter_name="hidden"),
    "expert_in": Site(sublayer="experts", projections=("wi", "wi_0", "wi_1")),
    "expert_out": Site(sublayer="experts", projections=("wo",)),
}


@dataclasses.dataclass(frozen=True)
class _Sublayer:
  kind: str
  unsupported: tuple[str, ...] = ()


_SUBLAYERS: dict[type, _Sublayer] = {}


def register_sublayer(cls: type, kind: str, unsupported: tuple[str, ...] = ()) -> None:
  """Declares that modules of ``cls`` (and subclasses) are sublayers of ``kind``.

  Attention sublayers follow :class:`~moe_jax.nn.attention.Attention`'s call
  contract (``x, *, mask_BLS, cache_index, kv_source_BSD, kv``); FFN
  sublayers take ``x`` first. Their projections are children called by name.

  Args:
    cls: the module class.
    kind: ``"attention"`` or ``"ffn"``.
    unsupported: projections this class does not call as children (asking
      for their site raises).
  """
  _SUBLAYERS[cls] = _Sublayer(kind, tuple(unsupported))


register_sublayer(Attention, "attention")
register_sublayer(AttentionMixture, "attention", unsupported=("o",))
register_sublayer(Mlp, "ffn")
# DeepSeek's latent attention: ``q`` (q_b when there is a q latent) and ``o`` are sites; its
# keys and values come out of the shared latent (``kv_a`` / ``kv_b``), no k / v projection.
register_sublayer(LatentAttention, "attention", unsupported=("k", "v"))
register_sublayer(RoutedExperts, "experts")


def _sublayer(module: Any) -> _Sublayer | None:
  if not isinstance(module, nn.Module):
    return None
  for cls in type(module).__mro__:
    if cls in _SUBLAYERS:
      return _SUBLAYERS[cls]
  return None


def _path(module: Any) -> tuple[str, ...] | None:
  scope = getattr(module, "scope", None) if isinstance(module, nn.Module) else None
  return None if scope is None else tuple(scope.path)


def _projection(module: nn.Module) -> Projection:
  """The shapes and axes of a ``Linear`` / ``ExpertLinear`` child (axes without the expert)."""
  features = module.features
  features = (features,) if isinstance(features, int) else tuple(features)
  axes = tuple(module.axes)
  return Projection(in_axes=axes[:module.in_dims], out_features=features,
                    out_axes=axes[module.in_dims:], dtype=module.dtype)


# ----------------------------------------------------------------------------- interception


@dataclasses.dataclass(frozen=True)
class _Block:
  """The self-attention context of a running block, for its FFN and cross-attention."""

  ctx: RouteContext
  mask_BLS: Array


class _Interceptor:
  """Routes the calls of one adapted model (the modules under ``root``); see the module doc."""

  def __init__(self, peft: PeftConfig, root: tuple[str, ...]):
    self.peft = peft
    self.root = root
    self.family = ADAPTERS[peft.spec.adapter]
    self.sentence = peft.router == "sentence" and peft.is_mixture
    self.blocks: dict[tuple[str, ...], _Block] = {}
    self.calls: dict[tuple[str, ...], RouteContext] = {}
    self.sites: dict[tuple[str, str], list[str]] = {}
    for name in peft.sites:
      for proj in SITES[name].projections:
        self.sites.setdefault((SITES[name].sublayer, proj), []).append(name)

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    path = _path(module)
    if (context.method_name != "__call__" or path is None
        or path[:len(self.root)] != self.root):
      return next_fun(*args, **kwargs)
    sub = _sublayer(module)
    if sub is not None:
      return self._sublayer_call(sub, module, path, next_fun, args, kwargs)
    parent = module.parent
    parent_sub = _sublayer(parent)
    if parent_sub is not None and (parent_sub.kind, module.name) in self.sites:
      if parent_sub.kind == "experts":
        return self._expert_kernel_call(module, parent, next_fun(*args, **kwargs))
      return self._projection_call(parent_sub.kind, module, parent, next_fun, args, kwargs)
    try:
      return next_fun(*args, **kwargs)
    finally:
      self.blocks.pop(path, None)  # a block's record lives as long as its call

  # -- sublayers

  def _sublayer_call(self, sub: _Sublayer, module, path, next_fun, args, kwargs):
    asked = [s for s in self.peft.sites if SITES[s].sublayer == sub.kind
             and set(SITES[s].projections) <= set(sub.unsupported)]
    if asked:
      raise ValueError(f"{module.name}: {type(module).__name__} has no separate "
                       f"{SITES[asked[0]].projections} projection to adapt (site {asked[0]!r}); "
                       "choose PeftConfig.sites without it")
    if sub.kind == "experts":  # kernel holders: no tokens, no routing context
      return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["x_BLD"]
    if sub.kind == "attention":
      ctx = self._attention_context(path, x, kwargs)
    else:
      ctx = self._ffn_context(module, path, x)
    self.calls[path] = ctx
    try:
      return next_fun(*args, **kwargs)
    finally:
      self.calls.pop(path, None)

  def _block(self, path: tuple[str, ...]) -> _Block | None:
    """The record of the nearest running block at or above ``path``."""
    for n in range(len(path), len(self.root) - 1, -1):
      if path[:n] in self.blocks:
        return self.blocks[path[:n]]
    return None

  def _attention_context(self, path, x_BLD: Array, kwargs) -> RouteContext:
    kv_source, kv = kwargs.get("kv_source_BSD"), kwargs.get("kv")
    mask = as_dense_mask(kwargs.get("mask_BLS"), x_BLD.shape[1])  # AttentionMask -> [B, L, S]
    if mask is None:
      s = x_BLD.shape[1] if kv_source is None and kv is None else (
          kv_source.shape[1] if kv_source is not None else kv.k.shape[1])
      mask = jnp.ones((x_BLD.shape[0], x_BLD.shape[1], s), bool)
    cache_index = kwargs.get("cache_index")
    if kv_source is None and kv is None:  # self-attention: the block's record
      ctx = self_attention_context(x_BLD, mask, cache_index, sentence=self.sentence)
      self.blocks[path[:-1]] = _Block(ctx, mask)
      return ctx
    block = self._block(path[:-1])
    if block is not None:  # the cross-attention of a block (T5's decoder)
      query = with_query(block.ctx, x_BLD, block.mask_BLS)
      return cross_attention_context(query, mask, kv_source)
    # A cross-attention on its own (CALM): a slot-aligned stream, causal like a self-attention.
    ctx = self_attention_context(x_BLD, mask, cache_index, sentence=self.sentence)
    if ctx.sentence and kv_source is not None:
      ctx = dataclasses.replace(ctx, kv_BSD=masked_mean(kv_source, mask))
    return ctx

  def _ffn_context(self, module, path, x_BLD: Array) -> RouteContext:
    block = self._block(path[:-1])
    if block is not None:
      return with_query(block.ctx, x_BLD, block.mask_BLS)
    if self.sentence:
      raise ValueError(f"{module.name}: sentence-level routing pools over the tokens of the "
                       "block's self-attention, and this FFN runs outside any; use "
                       "router='token'")
    return RouteContext(query_BLD=x_BLD)

  # -- projections

  def _projection_call(self, kind: str, module, parent, next_fun, args, kwargs):
    x = args[0]
    ctx = self.calls.get(_path(parent))
    proj = _projection(module)
    names = self.sites[(kind, module.name)]
    for name in names:
      if SITES[name].on == "input":  # scales the input: a projection ``x -> x`` of its dims
        hidden = Projection(in_axes=(), out_features=tuple(x.shape[x.ndim - len(proj.in_axes):]),
                            out_axes=proj.in_axes, dtype=proj.dtype)
        x = self._adapt(name, module, parent, hidden, x, x, ctx)
    y = next_fun(x, *args[1:], **kwargs)
    for name in names:
      if SITES[name].on == "output":
        y = self._adapt(name, module, parent, proj, x, y, ctx)
    return y

  def _expert_kernel_call(self, module, parent, kernel: Array) -> Array:
    """A routed experts' stacked kernel, adapted per expert (input scaling, then LoRA)."""
    names = self.sites[("experts", module.name)]
    for name in sorted(names, key=lambda n: SITES[n].on != "input"):
      spec = SITES[name]
      scope = parent.scope.push(ADAPTER_PREFIX + (spec.adapter_name or module.name), reuse=True)
      kernel = self.family.expert(self.peft, tuple(module.axes), scope)(kernel)
    return kernel

  def _adapt(self, site: str, module, parent, proj: Projection, x: Array, y: Array,
             ctx: RouteContext | None) -> Array:
    spec = SITES[site]
    scope = parent.scope.push(ADAPTER_PREFIX + (spec.adapter_name or module.name), reuse=True)
    adapter = self.family.build(self.peft, proj, scope)
    route_x, valid = self._route(spec, parent, x, ctx)
    return self.family.apply(adapter, x, y, route_x, valid)

  def _route(self, spec: Site, parent, x: Array, ctx: RouteContext | None
             ) -> tuple[Array, Array | None]:
    if spec.route == "query":
      return (x, None) if ctx is None else (ctx.query_BLD, ctx.query_valid_BL)
    if ctx is not None and ctx.kv_BSD is not None:
      return ctx.kv_BSD, ctx.kv_valid_BS
    if self.sentence:
      raise ValueError(
          f"{parent.name}: sentence-level routing of keys/values needs the padding mask, which "
          "only a full-sequence call provides; precomputed cross-attention keys "
          "(T5.init_decode_cache / cross_kv) and KV-cache decoding need router='token'")
    return x, None if ctx is None else ctx.kv_valid_BS


# ----------------------------------------------------------------------------- adapted modules


_ACTIVE = threading.local()


def _active() -> list[_Interceptor]:
  if not hasattr(_ACTIVE, "stack"):
    _ACTIVE.stack = []
  return _ACTIVE.stack


def _run(module: nn.Module, root: tuple[str, ...] | None, fn, *args, **kwargs):
  """``fn(*args, **kwargs)`` with ``module``'s interceptor active (once) for ``root``."""
  if root is None or any(i.root == root and i.peft == module.peft for i in _active()):
    return fn(*args, **kwargs)
  interceptor = _Interceptor(module.peft, root)
  _active().append(interceptor)
  try:
    with nn.intercept_methods(interceptor):
      return fn(*args, **kwargs)
  finally:
    _active().pop()


def _entry(fn):
  """A method of an adapted module: runs ``fn`` with the adapters active below its scope."""

  @functools.wraps(fn, updated=())
  def method(self, *args, **kwargs):
    return _run(self, _path(self), fn, self, *args, **kwargs)

  return method


def _top_level(fn):
  """``apply`` / ``init_with_output``: the adapters are active for the whole call."""

  @functools.wraps(fn, updated=())
  def method(self, *args, **kwargs):
    return _run(self, (), fn, self, *args, **kwargs)

  return nn.nowrap(method)


def _entry_points(base: type) -> list[str]:
  """``__call__`` and the public methods of ``base`` (not flax's own)."""
  names = []
  for cls in base.__mro__:
    if cls is nn.Module or not issubclass(cls, nn.Module):
      break
    for name, attr in vars(cls).items():
      if (inspect.isfunction(attr) and (name == "__call__" or not name.startswith("_"))
          and name != "setup" and not hasattr(attr, "nowrap") and name not in names):
        names.append(name)
  fields = {f.name for f in dataclasses.fields(base)}
  return [n for n in names if n not in fields]


@functools.cache
def _adapted_class(base: type) -> type:
  namespace: dict[str, Any] = {
      "__module__": __name__, "__qualname__": f"Peft{base.__name__}",
      "__annotations__": {"peft": PeftConfig | None}, "peft": None, "_peft_backbone": base,
      "__doc__": f"{base.__name__} with PEFT adapters (moe_jax.peft.adapt); same parameters "
                 "plus ``peft_*`` children.",
      "apply": _top_level(nn.Module.apply),
      "init_with_output": _top_level(nn.Module.init_with_output)}
  for name in _entry_points(base):
    namespace[name] = _entry(getattr(base, name))
  return type(f"Peft{base.__name__}", (base,), namespace)


def peft_config_of(module: Any) -> PeftConfig | None:
  """The :class:`PeftConfig` of a module made by :func:`adapt` (``None`` if not adapted)."""
  if getattr(type(module), "_peft_backbone", None) is None:
    return None
  return module.peft


def _require(peft: Any, owner: str) -> PeftConfig:
  if not isinstance(peft, PeftConfig):
    raise ValueError(f"{owner} needs a PeftConfig, got {peft!r}")
  return peft


def adapt(model: Any, peft: PeftConfig) -> nn.Module:
  """The backbone module with adapters, per ``peft``.

  Args:
    model: a module of any registered model family
      (:mod:`moe_jax.models.registry`: decoders, MoE and BAM decoders, T5,
      CALM compositions), or a :class:`~moe_jax.checkpoints.LoadedModel`
      (its module is used).
    peft: what to adapt.

  Returns:
    The same module (same fields, methods and forward pass, a subclass
    carrying ``peft``) with adapters at its sites; its parameter tree is the
    backbone's plus ``peft_*`` children (see
    :func:`moe_jax.peft.init_adapter_params`). Adapters are active in
    ``apply`` / ``init`` and in the module's own methods.

  Raises:
    TypeError: an unsupported module, or one that is already adapted.
  """
  _require(peft, "adapt")
  module = getattr(model, "module", model)
  if peft_config_of(module) is not None:
    raise TypeError(f"{type(module).__name__} is already adapted "
                    f"({peft_config_of(module).method}); adapt the backbone instead")
  try:
    registry.kind_of(getattr(module, "config", None))
    if not isinstance(module, nn.Module):
      raise ValueError
  except ValueError:
    raise TypeError(f"adapt: unsupported model {type(module).__name__}; expected a module of "
                    f"a registered model family ({', '.join(registry.kinds())}) or a "
                    "LoadedModel holding one") from None
  fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
            if f.init and f.name not in ("parent", "name")}
  return _adapted_class(type(module))(**fields, peft=peft)
