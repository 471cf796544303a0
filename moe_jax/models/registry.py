"""Model kinds: config dataclass <-> name <-> flax module, and config (de)serialisation.

Our own checkpoints store ``{"kind": NAME, "config": {...}}`` beside the
weights so a directory alone rebuilds the model. Model families of other
packages (CALM compositions, ``calm_jax.plugin``) register themselves here
with :func:`register_model` from their ``moe_jax.plugins`` entry point
(:mod:`moe_jax.plugins`, loaded on the first lookup this module cannot
answer); nothing else in the checkpoint code needs to change.

A kind may also name *hooks* the Python API calls for models of that kind
(:func:`hook`): ``trainable_mask`` (``params -> bool tree``: what
``moe_jax.api.finetune`` trains by default) and ``save`` (``(model, path) ->
Path``: what ``moe_jax.api.save`` writes).
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from typing import Any, Callable

_KINDS: dict[str, tuple[str, str]] = {
    # kind: ("module.path:ConfigClass", "module.path:factory(config) -> flax module")
    "decoder": ("moe_jax.models.decoder:DecoderConfig", "moe_jax.models.decoder:Decoder"),
    "t5": ("moe_jax.models.t5:T5Config", "moe_jax.models.t5:T5"),
    "moe_decoder": ("moe_jax.models.moe_decoder:MoeDecoderConfig",
                    "moe_jax.models.moe_decoder:MoeDecoder"),
    "bam_decoder": ("moe_jax.models.bam_decoder:BamDecoderConfig",
                    "moe_jax.models.bam_decoder:BamDecoder"),
    "deepseek_decoder": ("moe_jax.models.deepseek:DeepseekConfig",
                         "moe_jax.models.deepseek:DeepseekDecoder"),
}
# How many ``[B, L]`` token arrays the module's ``__call__`` takes positionally
# (1 for decoder-only, 2 for encoder-decoder); used to derive parameter shapes.
_TOKEN_INPUTS: dict[str, int] = {"decoder": 1, "t5": 2, "moe_decoder": 1, "bam_decoder": 1,
                                 "deepseek_decoder": 1}
#: kind -> {hook name: "pkg.mod:function"} (see the module docstring).
_HOOKS: dict[str, dict[str, str]] = {}
HOOKS = ("trainable_mask", "save")


def register_model(kind: str, config_cls: str, factory: str, token_inputs: int = 1, *,
                   hooks: dict[str, str] | None = None) -> None:
  """Registers a model kind by import paths (``"pkg.mod:Name"``); idempotent.

  ``hooks``: ``{name: "pkg.mod:function"}`` for names in :data:`HOOKS`.
  """
  if kind in _KINDS and _KINDS[kind] != (config_cls, factory):
    raise ValueError(f"model kind {kind!r} is already registered as {_KINDS[kind]}")
  unknown = sorted(set(hooks or {}) - set(HOOKS))
  if unknown:
    raise ValueError(f"model kind {kind!r}: unknown hooks {unknown}; known: {HOOKS}")
  _KINDS[kind] = (config_cls, factory)
  _TOKEN_INPUTS[kind] = token_inputs
  _HOOKS[kind] = dict(hooks or {})


def _load_plugins() -> None:
  from moe_jax import plugins
  plugins.load()


def hook(config: Any, name: str) -> Callable | None:
  """The ``name`` hook of ``config``'s model kind, or ``None`` (none, or not a registered kind)."""
  try:
    kind = kind_of(config)
  except ValueError:
    return None
  path = _HOOKS.get(kind, {}).get(name)
  return None if path is None else _resolve(path)


def is_encoder_decoder(config: Any) -> bool:
  """Whether ``config``'s model takes the prompt in an encoder (``encode`` / ``decode``)."""
  return _TOKEN_INPUTS[kind_of(config)] == 2


def param_shapes(module: Any, kind: str) -> dict:
  """Parameter shape tree (``jax.ShapeDtypeStruct`` leaves, unboxed) without allocating."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  tokens = [jnp.zeros((1, 1), jnp.int32)] * _TOKEN_INPUTS.get(kind, 1)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *tokens))
  return nn.meta.unbox(shapes["params"])


def init_params(module: Any, kind: str, seed: int = 0) -> dict:
  """Freshly initialised (unboxed) parameters."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  tokens = [jnp.zeros((1, 1), jnp.int32)] * _TOKEN_INPUTS.get(kind, 1)
  return nn.meta.unbox(jax.jit(module.init)(jax.random.key(seed), *tokens)["params"])


def _resolve(path: str) -> Any:
  module, name = path.split(":")
  return getattr(importlib.import_module(module), name)


def kinds() -> list[str]:
  _load_plugins()
  return sorted(_KINDS)


def _find_kind(config: Any) -> str | None:
  for kind, (cls_path, _) in _KINDS.items():
    module, name = cls_path.split(":")
    if type(config).__name__ == name and type(config).__module__ == module:
      return kind
  return None


def kind_of(config: Any) -> str:
  kind = _find_kind(config)
  if kind is None:
    _load_plugins()
    kind = _find_kind(config)
  if kind is not None:
    return kind
  raise ValueError(f"{type(config).__name__} is not a registered model config; "
                   f"known kinds: {kinds()}")


def build_module(config: Any, kind: str | None = None, *, name: str | None = None) -> Any:
  """The flax module for ``config`` (``name``: its name as a submodule of another's setup)."""
  kind = kind or kind_of(config)
  if kind not in _KINDS:
    _load_plugins()
  factory = _resolve(_KINDS[kind][1])
  return factory(config=config) if name is None else factory(config=config, name=name)


def config_to_dict(config: Any) -> dict[str, Any]:
  """JSON-ready dict; nested dataclasses become dicts, tuples become lists."""
  def convert(v):
    if dataclasses.is_dataclass(v):
      return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (tuple, list)):
      return [convert(x) for x in v]
    if isinstance(v, dict):
      return {k: convert(x) for k, x in v.items()}
    return v
  return convert(config)


def config_from_dict(kind: str, data: dict[str, Any], source: str = "config") -> Any:
  """Rebuilds a registered config from :func:`config_to_dict` output."""
  if kind not in _KINDS:
    _load_plugins()
  if kind not in _KINDS:
    raise ValueError(f"{source}: unknown model kind {kind!r}; known: {kinds()}")
  return _build(_resolve(_KINDS[kind][0]), data, source)


def _build(cls: type, data: Any, source: str) -> Any:
  if not isinstance(data, dict):
    raise ValueError(f"{source}: expected an object for {cls.__name__}, got {data!r}")
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - names)
  if unknown:
    raise ValueError(f"{source}: unknown field(s) {unknown} for {cls.__name__}")
  kwargs = {k: _coerce(hints.get(k), v, f"{source}.{k}") for k, v in data.items()}
  return cls(**kwargs)


def _coerce(hint: Any, value: Any, source: str) -> Any:
  if value is None or hint is None:
    return value
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    for arg in typing.get_args(hint):
      if arg is type(None):
        continue
      if dataclasses.is_dataclass(arg) and isinstance(value, dict):
        return _build(arg, value, source)
      if typing.get_origin(arg) is tuple and isinstance(value, list):
        return _coerce(arg, value, source)
    return value
  if dataclasses.is_dataclass(hint) and isinstance(value, dict):
    return _build(hint, value, source)
  if origin is tuple and isinstance(value, list):
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_coerce(args[0], v, source) for v in value)
    return tuple(_coerce(a, v, source) for a, v in zip(args, value))
  return value


ModuleFactory = Callable[..., Any]
