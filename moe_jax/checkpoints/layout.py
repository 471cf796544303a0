"""Unrolled <-> scanned parameter layouts: one pure function pair, used by every loader.

An unrolled stack stores layer ``i`` as ``layers_{i}/...``; a scanned one
(:mod:`moe_jax.models.stack`, ``scan_layers=True``) stores all layers in one
``layers`` subtree whose leaves have a leading axis: ``layers/...`` with
``[N, ...]`` leaves for a period of one block, ``layers/block_{j}/...`` with
``[N/P, ...]`` leaves for a period of P (layer ``i`` is ``block_{i % P}`` at
index ``i // P``). The functions work on any nesting (T5's
``encoder`` / ``decoder``, CALM's ``anchor`` / ``augment_{j}``) and on any
leaves: arrays, ``ShapeDtypeStruct`` s, or flax ``LogicallyPartitioned`` boxes
(whose names gain or lose the leading ``layers`` axis).

:func:`match_layout` converts a checkpoint's tree to the layout of a target
tree (the model's parameter shapes): the HF importer / exporter, our format,
orbax restore and assignment-map partial restore all call it, so a checkpoint
written in either layout loads into either.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

LAYER_KEY = re.compile(r"^layers_(\d+)$")
BLOCK_KEY = re.compile(r"^block_(\d+)$")
AXIS = "layers"


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def _stack_leaves(*xs: Any) -> Any:
  if _is_box(xs[0]):
    names = xs[0].names
    return xs[0].replace_boxed(_stack_leaves(*[x.unbox() for x in xs])).replace(
        names=(AXIS,) + tuple(names))
  if isinstance(xs[0], jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(xs),) + tuple(xs[0].shape), xs[0].dtype,
                                sharding=_sharding_with(xs[0], lambda spec: (None,) + spec))
  if isinstance(xs[0], jax.Array):
    return jax.numpy.stack(xs)
  return np.stack([np.asarray(x) for x in xs])


def _index_leaf(x: Any, i: int) -> Any:
  if _is_box(x):
    names = tuple(x.names)
    if names[:1] != (AXIS,):
      raise ValueError(f"stacked leaf has logical axes {names}; expected a leading {AXIS!r}")
    return x.replace_boxed(_index_leaf(x.unbox(), i)).replace(names=names[1:])
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype,
                                sharding=_sharding_with(x, lambda spec: spec[1:]))
  return x[i]


def _sharding_with(x: jax.ShapeDtypeStruct, respec) -> Any:
  """``x``'s sharding with its spec gaining / losing the leading axis (a ``NamedSharding``
  only: one that names no axis, e.g. ``SingleDeviceSharding``, is kept as it is)."""
  sharding = getattr(x, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (len(x.shape) - len(sharding.spec))
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*respec(spec)))
  return sharding


def _tree_map(f, *trees):
  return jax.tree.map(f, *trees, is_leaf=_is_box)


def layer_keys(node: Mapping) -> list[str]:
  """The ``layers_{i}`` keys of ``node`` in layer order."""
  return sorted((k for k in node if LAYER_KEY.match(str(k))),
                key=lambda k: int(LAYER_KEY.match(k).group(1)))


def is_scanned(node: Any) -> bool:
  """Whether ``node`` holds a scanned ``layers`` subtree (and no ``layers_{i}``)."""
  return isinstance(node, Mapping) and isinstance(node.get(AXIS), Mapping) and not layer_keys(node)


def period(stacked: Mapping) -> int:
  """P of a scanned ``layers`` subtree (its ``block_{j}`` children; 1 if none)."""
  blocks = [k for k in stacked if BLOCK_KEY.match(str(k))]
  return len(blocks) if blocks and len(blocks) == len(stacked) else 1


def stack_layers(node: Mapping, p: int = 1) -> dict:
  """``layers_0 .. layers_{N-1}`` of ``node`` -> one stacked ``layers`` subtree (period ``p``)."""
  keys = layer_keys(node)
  n = len(keys)
  if [int(LAYER_KEY.match(k).group(1)) for k in keys] != list(range(n)):
    raise ValueError(f"layers are not numbered 0..{n - 1}: {keys}")
  if n == 0 or n % p:
    raise ValueError(f"cannot scan {n} layers with a period of {p}")
  out = {k: v for k, v in node.items() if not LAYER_KEY.match(str(k))}
  per_block = []
  for j in range(p):
    group = [node[keys[i]] for i in range(j, n, p)]
    try:
      per_block.append(_tree_map(_stack_leaves, *group))
    except ValueError as e:
      raise ValueError(f"layers {list(range(j, n, p))} differ in structure and cannot be "
                       f"stacked ({e})") from None
  out[AXIS] = per_block[0] if p == 1 else {f"block_{j}": t for j, t in enumerate(per_block)}
  return out


def unstack_layers(node: Mapping, num_layers: int | None = None) -> dict:
  """Inverse of :func:`stack_layers`: one ``layers`` subtree -> ``layers_{i}`` subtrees.

  ``num_layers`` (default: read off the first leaf) is needed only when the
  stack has no leaf to read it from (an optimizer state's masked subtree).
  """
  stacked = node[AXIS]
  p = period(stacked)
  blocks = [stacked] if p == 1 else [stacked[f"block_{j}"] for j in range(p)]
  if num_layers is not None:
    steps = num_layers // p
  else:
    steps = jax.tree.leaves(blocks[0], is_leaf=_is_box)[0]
    steps = (steps.unbox() if _is_box(steps) else steps).shape[0]
  out = {k: v for k, v in node.items() if k != AXIS}
  for i in range(steps * p):
    out[f"layers_{i}"] = _tree_map(lambda x, i=i: _index_leaf(x, i // p), blocks[i % p])
  return out


def match_layout(tree: Any, target: Any) -> Any:
  """``tree`` with every block stack in the layout ``target`` has at the same place.

  ``target`` only needs the structure (arrays, shapes or boxes). Subtrees that
  are already alike, and keys ``target`` lacks, pass through unchanged.
  """
  if not isinstance(tree, Mapping) or not isinstance(target, Mapping):
    return tree
  if layer_keys(tree) and is_scanned(target):
    tree = stack_layers(tree, period(target[AXIS]))
  elif is_scanned(tree) and layer_keys(target):
    tree = unstack_layers(tree, len(layer_keys(target)))
  return {k: match_layout(v, target[k]) if k in target else v for k, v in tree.items()}


def same_layout(tree: Any, target: Any) -> bool:
  """Whether no block stack of ``tree`` is laid out otherwise than ``target``'s."""
  if not isinstance(tree, Mapping) or not isinstance(target, Mapping):
    return True
  if (layer_keys(tree) and is_scanned(target)) or (is_scanned(tree) and layer_keys(target)):
    return False
  return all(same_layout(v, target[k]) for k, v in tree.items() if k in target)


def match_layout_within(tree: Any, params: Any, target: Any) -> Any:
  """``tree`` (an optimizer state, a train state) with every parameter-shaped subtree
  relaid out like ``target``.

  A subtree is parameter-shaped when it is a mapping with the top-level keys of
  ``params`` (the parameters ``tree`` goes with) or of ``target`` (the same
  parameters in the other layout): optax's ``mu`` / ``nu`` / ``v_row`` trees,
  masked or not. Everything else (step counts, empty states) passes through.
  """
  keys = {frozenset(params), frozenset(target)}
  shaped = lambda x: isinstance(x, Mapping) and frozenset(x) in keys  # noqa: E731
  return jax.tree.map(lambda x: match_layout(x, target) if shaped(x) else x, tree,
                      is_leaf=lambda x: shaped(x) or _is_box(x))


def with_stack_options(loaded: Any, *, scan_layers: bool | None = None,
                       remat_policy: str | None = None) -> Any:
  """A ``LoadedModel`` rebuilt with the given stack options, its parameters relaid out.

  ``None`` keeps the checkpoint's own value. Configs without these fields
  (a CALM composition: set them on its ``anchor`` / ``augments``) refuse.
  """
  import dataclasses

  from moe_jax.models import registry

  changes = {k: v for k, v in (("scan_layers", scan_layers), ("remat_policy", remat_policy))
             if v is not None and getattr(loaded.config, k, None) != v}
  if not changes:
    return loaded
  missing = [k for k in changes if not hasattr(loaded.config, k)]
  if missing:
    raise ValueError(f"{type(loaded.config).__name__} has no {missing} field; set it on the "
                     "configs of the models it holds")
  config = dataclasses.replace(loaded.config, **changes)
  kind = registry.kind_of(config)
  module = registry.build_module(config, kind)
  params = match_layout(loaded.params, registry.param_shapes(module, kind))
  return dataclasses.replace(loaded, config=config, module=module, params=params)


def has_scanned(tree: Any) -> bool:
  """Whether some subtree of ``tree`` is a scanned stack."""
  return isinstance(tree, Mapping) and (is_scanned(tree) or any(
      has_scanned(v) for v in tree.values()))


def unrolled(tree: Any) -> Any:
  """``tree`` with every scanned stack unrolled (the layout HF export and upcycling read)."""
  if not isinstance(tree, Mapping):
    return tree
  if is_scanned(tree):
    tree = unstack_layers(tree)
  return {k: unrolled(v) for k, v in tree.items()}
