"""Adapter parameters: initialisation on a pretrained backbone, freezing, and the optimizer.

**Which parameters train.** :func:`trainable_mask` is the one source of
truth: a leaf trains iff some key on its path starts with ``peft_`` (every
adapter and router lives under such a module, see :mod:`moe_jax.peft.layers`);
everything else is the frozen backbone. The trainer takes this mask.

**No optimizer state for frozen parameters.** :func:`masked_optimizer` wraps
an optax transformation with ``optax.multi_transform``: trainable leaves get
it, frozen leaves ``optax.set_to_zero()``, which is stateless, and
``multi_transform`` hands the inner optimizer only the trainable leaves, so
Adam's two moments exist for the adapters only (a 7B backbone would
otherwise carry 56 GB of float32 moments). Frozen updates are zeros that XLA
removes together with the backbone weight gradients they came from, when the
step is one ``jit``; for the same reason the step should take gradients with
respect to the trainable leaves only when it can (:func:`split_params`).

**Bit-identical backbone.** ``optax.apply_updates`` adds the zero updates,
and ``-0.0 + 0.0`` is ``+0.0``: :func:`apply_masked_updates` leaves frozen
leaves untouched instead.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_jax.checkpoints.hf_common import CheckpointError
from moe_jax.peft.config import ADAPTER_PREFIX
from moe_jax.peft.layers import SITES, peft_config_of

PyTree = Any


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def is_adapter_path(path: tuple) -> bool:
  """Whether a ``jax.tree_util`` key path is inside an adapter or router."""
  return any(_key_name(p).startswith(ADAPTER_PREFIX) for p in path)


def trainable_mask(params: PyTree) -> PyTree:
  """Bool pytree shaped like ``params``: True for adapter and router leaves."""
  return jax.tree_util.tree_map_with_path(lambda path, _: is_adapter_path(path), params)


def split_params(params: Mapping) -> tuple[dict, dict]:
  """``(backbone, adapters)``: two nested dicts that :func:`merge_params` puts back together.

  ``adapters`` keeps only the ``peft_*`` subtrees (and the dicts leading to them).
  """
  backbone: dict = {}
  adapters: dict = {}
  for key, value in params.items():
    if str(key).startswith(ADAPTER_PREFIX):
      adapters[key] = value
    elif isinstance(value, Mapping):
      b, a = split_params(value)
      backbone[key] = b
      if a:
        adapters[key] = a
    else:
      backbone[key] = value
  return backbone, adapters


def merge_params(backbone: Mapping, adapters: Mapping) -> dict:
  """Nested union of two disjoint trees (raises on a key present in both)."""
  out = dict(backbone)
  for key, value in adapters.items():
    if key not in out:
      out[key] = value
    elif isinstance(out[key], Mapping) and isinstance(value, Mapping):
      out[key] = merge_params(out[key], value)
    else:
      raise ValueError(f"merge_params: {key!r} is in both trees")
  return out


def _flat_shapes(tree: Mapping, prefix: str = "") -> dict[str, tuple[int, ...]]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(_flat_shapes(value, name))
    else:
      out[name] = tuple(np.shape(value))
  return out


def check_tree(expected: Mapping, actual: Mapping, what: str) -> None:
  """Raises :class:`CheckpointError` naming missing, unexpected or mis-shaped leaves."""
  want, got = _flat_shapes(expected), _flat_shapes(actual)
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  if missing:
    raise CheckpointError(f"{what}: missing parameter(s) {missing[:8]}"
                          + (" ..." if len(missing) > 8 else ""))
  if unexpected:
    raise CheckpointError(f"{what}: unexpected parameter(s) {unexpected[:8]}"
                          + (" ..." if len(unexpected) > 8 else ""))
  for name, shape in want.items():
    if got[name] != shape:
      raise CheckpointError(f"{what}: parameter {name!r} has shape {got[name]}, expected {shape}")


def _dummy_inputs(module: nn.Module) -> list[jax.Array]:
  n = 2 if hasattr(module, "encode") else 1
  return [jnp.zeros((1, 1), jnp.int32)] * n


def param_shapes(module: nn.Module) -> dict:
  """Unboxed ``ShapeDtypeStruct`` tree of the module's parameters (nothing allocated)."""
  tokens = _dummy_inputs(module)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *tokens))
  return nn.meta.unbox(shapes["params"])


def logical_axes(module: nn.Module) -> PyTree:
  """``PartitionSpec`` tree of logical axis names of every parameter (backbone and adapters)."""
  tokens = _dummy_inputs(module)
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *tokens))
  return nn.get_partition_spec(boxed)["params"]


def _adapter_names(tree: Mapping) -> set[str]:
  names = set()
  for key, value in tree.items():
    if str(key).startswith(ADAPTER_PREFIX):
      names.add(str(key)[len(ADAPTER_PREFIX):])
    elif isinstance(value, Mapping):
      names |= _adapter_names(value)
  return names


def _check_sites(adapted: nn.Module, adapter_shapes: Mapping) -> None:
  """Raises when a site of the config matches no module of the model."""
  peft = peft_config_of(adapted)
  if peft is None:
    return
  found = _adapter_names(adapter_shapes)
  for site in peft.sites:
    spec = SITES[site]
    if not {spec.adapter_name or p for p in spec.projections} & found:
      raise ValueError(
          f"init_adapter_params: site {site!r} of {peft.method} matches no module of "
          f"{type(adapted).__name__} (the ffn sites adapt dense FFNs and the expert_* sites "
          "routed experts; the output projection of a mixture of attention takes no "
          "adapters); remove it from "
          f"PeftConfig.sites (adapted here: {sorted(found)})")


def init_adapter_params(adapted: nn.Module, base_params: Mapping, rng: jax.Array) -> dict:
  """Backbone parameters untouched plus freshly initialised adapters.

  Only the adapters are initialised: the model is applied to one token with
  the backbone's parameters given and ``params`` mutable, so flax creates
  just the missing (adapter) parameters; no backbone initialiser is traced,
  and the backbone is never copied.

  Args:
    adapted: a module from :func:`moe_jax.peft.adapt`.
    base_params: the backbone's (unboxed) parameters, e.g. ``load_hf(...).params``.
    rng: PRNG key for the adapters (LoRA ``A``, routers).

  Raises:
    CheckpointError: ``base_params`` does not fit the backbone (names the leaf).
  """
  if isinstance(base_params, Mapping) and set(base_params) == {"params"}:
    base_params = base_params["params"]
  backbone_shapes, adapter_shapes = split_params(param_shapes(adapted))
  if not adapter_shapes:
    raise ValueError("init_adapter_params: the module has no adapters; use moe_jax.peft.adapt")
  check_tree(backbone_shapes, base_params, "backbone parameters")
  _check_sites(adapted, adapter_shapes)
  tokens = _dummy_inputs(adapted)

  @jax.jit
  def init(key, base):
    _, state = adapted.apply({"params": base}, *tokens, rngs={"params": key},
                             mutable=["params"])
    return split_params(nn.meta.unbox(state["params"]))[1]

  adapters = init(rng, base_params)
  check_tree(adapter_shapes, adapters, "adapter parameters")
  return merge_params(base_params, adapters)


def masked_optimizer(tx: optax.GradientTransformation, mask: PyTree
                     ) -> optax.GradientTransformation:
  """``tx`` on the leaves where ``mask`` is True, stateless zero updates elsewhere."""
  labels = jax.tree.map(lambda m: "trainable" if m else "frozen", mask)
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def apply_masked_updates(params: PyTree, updates: PyTree, mask: PyTree) -> PyTree:
  """``params + updates`` on trainable leaves; frozen leaves are returned as they are."""
  return jax.tree.map(lambda p, u, m: optax.apply_updates(p, u) if m else p,
                      params, updates, mask)


def parameter_report(params: Mapping) -> dict[str, Any]:
  """Trainable (adapter + router) vs backbone parameter counts.

  Returns:
    ``{"trainable", "backbone", "total", "share", "share_percent", "by_site"}``:
    ``share`` is trainable / backbone (the papers' "% of parameters updated");
    ``by_site`` counts per adapter name (``peft_k``, ``peft_hidden``, ...),
    routers included.
  """
  if isinstance(params, Mapping) and set(params) == {"params"}:
    params = params["params"]
  counts = {"trainable": 0, "backbone": 0}
  by_site: dict[str, int] = {}

  def visit(path, leaf):
    n = int(np.prod(np.shape(leaf), dtype=np.int64))
    names = [_key_name(p) for p in path]
    site = next((k for k in names if k.startswith(ADAPTER_PREFIX)), None)
    if site is None:
      counts["backbone"] += n
    else:
      counts["trainable"] += n
      by_site[site] = by_site.get(site, 0) + n

  jax.tree_util.tree_map_with_path(visit, params)
  share = counts["trainable"] / max(counts["backbone"], 1)
  return {"trainable": counts["trainable"], "backbone": counts["backbone"],
          "total": counts["trainable"] + counts["backbone"], "share": share,
          "share_percent": 100.0 * share, "by_site": dict(sorted(by_site.items()))}
