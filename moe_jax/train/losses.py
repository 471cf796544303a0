"""Training losses: token cross-entropy with T5's z-loss, normalisation, auxiliary losses.

Legend: B batch, L length, V vocab.

**Token loss.** ``cross_entropy_with_z_loss`` is the softmax cross-entropy of
integer targets computed in float32 whatever the logits' dtype, plus T5's
z-loss ``z_loss * logsumexp(logits)**2``, which keeps the softmax normaliser
near 1 (stabilises bfloat16 training; Mesh TF / t5x use ``1e-4``).

**Normalisation** (``LossConfig.loss_normalizing_factor``), applied to the
weighted *sum* of token losses (weights are seqio's ``decoder_loss_weights``,
0 on padding):

* ``"num_target_tokens"`` (default): divide by the number of weighted tokens
  in the batch, i.e. the mean token loss. Independent of batch size and
  packing density, so learning rates transfer between batch sizes.
* a number, like t5x's ``loss_normalizing_factor``: divide by that constant.
  Every token then has the same gradient weight whichever batch it lands in
  (what Mesh TF did with ``batch_size * target_length``); use it for
  exact comparability with t5x runs.
* ``None``: the plain sum.

**Auxiliary losses and metrics sown by the model (the convention).** The
trainer applies the model with ``mutable=list(MUTABLE_COLLECTIONS)``:

* every leaf of the ``"aux_loss"`` collection is a scalar *already multiplied
  by its coefficient* and is **added** to the loss as is (no normalisation).
  MoE layers sow their load-balancing and router z-losses there, PEFT
  modules any regulariser. A leaf sown several times (one entry per call) is
  summed.
* every leaf of ``"intermediates"`` whose path contains ``"metrics"``, and
  every leaf of a collection whose *name* contains ``"metrics"`` (e.g. the
  MoE layer's ``"moe_metrics"``), is logged as a metric: leaves with the same
  name (last path component) are averaged across layers, except those in
  ``MAX_OVER_LAYERS`` (the ragged exchange's ``buffer_load``: the buffer must
  hold the busiest layer), which take the maximum. Only scalars are
  reduced; vector leaves (e.g. per-expert usage) are skipped.
* besides, every leaf of ``"moe_metrics"`` (the routers') is logged per layer
  by :func:`collect_layer_metrics` as ``router/{path}/{name}``, the path with
  ``layer_{i}`` for the layer, e.g. ``router/layer_3/mlp/load_balancing_loss``
  and the vector ``router/layer_3/mlp/expert_usage`` (a histogram in
  TensorBoard).
* anything else sown into ``"intermediates"`` (hidden states) is dropped.

A scanned stack (``scan_layers``) sows one leaf per block of its period with a
leading axis over the scan steps (:mod:`moe_jax.models.stack`); both
collectors split that axis back into layers (layer ``i`` is ``block_{i % P}``
at index ``i // P``), so scanned and unrolled stacks log the same metrics.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from moe_jax.moe.layer import BUFFER_LOAD
from moe_jax.nn.router import (AUX_LOSS_COLLECTION, METRICS_COLLECTION, aux_loss_terms,
                               total_aux_loss)

Array = jax.Array

#: Collections the model wrappers ask for as mutable when computing a loss.
MUTABLE_COLLECTIONS: tuple[str, ...] = (AUX_LOSS_COLLECTION, "intermediates", METRICS_COLLECTION)
NUM_TARGET_TOKENS = "num_target_tokens"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
  """How the token loss is computed and normalised.

  Attributes:
    z_loss: coefficient of T5's z-loss (``1e-4`` in t5x; ``0`` disables it).
    loss_normalizing_factor: ``"num_target_tokens"``, a positive number, or
      ``None`` (see the module docstring).
  """

  z_loss: float = 1e-4
  loss_normalizing_factor: float | str | None = NUM_TARGET_TOKENS

  def __post_init__(self):
    if self.z_loss < 0:
      raise ValueError(f"LossConfig.z_loss must be >= 0, got {self.z_loss}")
    f = self.loss_normalizing_factor
    if isinstance(f, str):
      if f != NUM_TARGET_TOKENS:
        raise ValueError(f"LossConfig.loss_normalizing_factor={f!r}: expected "
                         f"{NUM_TARGET_TOKENS!r}, a positive number, or None")
    elif f is not None and not float(f) > 0:
      raise ValueError(f"LossConfig.loss_normalizing_factor must be positive, got {f}")


def cross_entropy_with_z_loss(logits_BLV: Array, targets_BL: Array, *, z_loss: float = 0.0
                              ) -> tuple[Array, Array]:
  """Per-token ``(cross_entropy_BL, z_loss_BL)`` in float32.

  The cross-entropy does not include the z-loss term; add them yourself.
  """
  logits = logits_BLV.astype(jnp.float32)
  log_z_BL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits, targets_BL[..., None].astype(jnp.int32),
                                        axis=-1)[..., 0]
  return log_z_BL - target_logit_BL, z_loss * jnp.square(log_z_BL)


def normalizing_factor(weights_BL: Array, factor: float | str | None) -> Array:
  """The divisor of the summed token losses (see the module docstring)."""
  if factor == NUM_TARGET_TOKENS:
    return jnp.maximum(jnp.sum(weights_BL.astype(jnp.float32)), 1.0)
  if factor is None:
    return jnp.ones((), jnp.float32)
  return jnp.asarray(float(factor), jnp.float32)


@dataclasses.dataclass(frozen=True)
class TokenLoss:
  """Normalised token losses of one batch (all float32 scalars)."""

  loss: Array            # cross_entropy + z_loss, normalised
  cross_entropy: Array   # normalised
  z_loss: Array          # normalised
  num_tokens: Array      # sum of weights
  num_correct: Array     # weighted count of argmax == target


def token_loss(logits_BLV: Array, targets_BL: Array, weights_BL: Array | None,
               config: LossConfig) -> TokenLoss:
  """Weighted, normalised token loss of a batch."""
  if weights_BL is None:
    weights_BL = jnp.ones(targets_BL.shape, jnp.float32)
  w = weights_BL.astype(jnp.float32)
  ce_BL, z_BL = cross_entropy_with_z_loss(logits_BLV, targets_BL, z_loss=config.z_loss)
  norm = normalizing_factor(w, config.loss_normalizing_factor)
  ce = jnp.sum(ce_BL * w) / norm
  z = jnp.sum(z_BL * w) / norm
  correct = jnp.sum((jnp.argmax(logits_BLV, axis=-1) == targets_BL) * w)
  return TokenLoss(loss=ce + z, cross_entropy=ce, z_loss=z, num_tokens=jnp.sum(w),
                   num_correct=correct)


def sequence_log_likelihood(logits_BLV: Array, targets_BL: Array, weights_BL: Array | None
                            ) -> Array:
  """``[B]`` sum of target-token log-probabilities (weights 0 skip a token)."""
  ce_BL, _ = cross_entropy_with_z_loss(logits_BLV, targets_BL)
  if weights_BL is None:
    return -jnp.sum(ce_BL, axis=-1)
  return -jnp.sum(ce_BL * weights_BL.astype(jnp.float32), axis=-1)


# ----------------------------------------------------------------------------- sown collections


def _path_names(path) -> list[str]:
  names = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      names.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      names.append(k.name)
  return names


def collect_aux_losses(state: Mapping[str, Any]) -> tuple[Array, dict[str, Array]]:
  """``(total, {name: sum over layers})`` of the ``"aux_loss"`` collection.

  ``state`` is the mutable-collection dict returned by ``module.apply``. The
  total (:func:`moe_jax.nn.router.total_aux_loss`) is 0 when nothing was sown.
  """
  by_name: dict[str, Array] = {}
  for name, value in aux_loss_terms(state):
    by_name[name] = by_name.get(name, 0.0) + value
  return total_aux_loss(state), by_name


_UNROLLED = re.compile(r"^layers_(\d+)$")
_BLOCK = re.compile(r"^block_(\d+)$")
_SCANNED = "layers"  # the nn.scan of stack.make_blocks


def _scan_period(params: Any, tree: Any, prefix: list[str]) -> int:
  """P of the scanned stack at ``prefix``: its ``block_{j}`` count in ``params`` (else ``tree``)."""
  for root in (params, tree):
    node = root
    for name in prefix:
      node = node.get(name) if isinstance(node, Mapping) else None
    if isinstance(node, Mapping):
      blocks = [int(m.group(1)) for k in node if (m := _BLOCK.match(str(k)))]
      if root is params or blocks:
        return max(blocks) + 1 if blocks else 1
  return 1


def _layer_leaves(tree: Any, params: Any = None, keep: Any = None
                  ) -> list[tuple[tuple[str, ...], Array]]:
  """``[(path, value)]`` of a collection's leaves, one per layer and call.

  Unrolled ``layers_{i}`` become ``layer_{i}``; a scanned stack's leaf
  (``layers[/block_j]/...`` with a leading axis N/P) is split into its
  layers ``layer_{k·P + j}``. ``params`` (the model's, same paths) gives P;
  ``keep(path names)`` selects leaves before any is split.
  """
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if keep is not None and not keep(_path_names(path)):
      continue
    names = [(f"layer_{m.group(1)}" if (m := _UNROLLED.match(n)) else n)
             for n in _path_names(path)]
    if _SCANNED not in names[:-1]:
      out.append((tuple(names), leaf))
      continue
    s = names.index(_SCANNED)
    m = _BLOCK.match(names[s + 1]) if s + 2 < len(names) else None
    j, rest = (int(m.group(1)), names[s + 2:]) if m else (0, names[s + 1:])
    period = _scan_period(params, tree, names[:s + 1])
    leaf = jnp.asarray(leaf)
    for k in range(leaf.shape[0] if leaf.ndim else 0):
      out.append((tuple(names[:s]) + (f"layer_{k * period + j}",) + tuple(rest), leaf[k]))
  return out


# Metrics whose layers reduce by maximum, not mean.
MAX_OVER_LAYERS = frozenset({BUFFER_LOAD})


def collect_metrics(state: Mapping[str, Any]) -> dict[str, Array]:
  """``{name: mean (or max, MAX_OVER_LAYERS) over leaves}`` of the scalar metrics sown."""
  sums: dict[str, list[Array]] = {}
  for collection, tree in state.items():
    if collection == AUX_LOSS_COLLECTION:
      continue
    whole = "metrics" in collection
    if not whole and collection != "intermediates":
      continue
    keep = None if whole else (lambda names: any("metrics" in n for n in names))
    for names, leaf in _layer_leaves(tree, keep=keep):
      if jnp.ndim(leaf) != 0:
        continue
      sums.setdefault(names[-1] if names else collection, []).append(
          jnp.asarray(leaf, jnp.float32))
  return {name: (jnp.max(jnp.stack(vals)) if name in MAX_OVER_LAYERS else sum(vals) / len(vals))
          for name, vals in sums.items()}


def collect_layer_metrics(state: Mapping[str, Any], params: Any = None) -> dict[str, Array]:
  """``{"router/{path}/{name}": value}``: each router metric per layer (see the module docstring).

  Scalars and vectors (per-expert usage) alike; a leaf sown by several calls
  is averaged. ``params`` (the applied parameters) tells a scanned stack's
  period; without them it is read from the sown tree.
  """
  groups: dict[str, list[Array]] = {}
  for names, leaf in _layer_leaves(state.get(METRICS_COLLECTION, {}), params):
    groups.setdefault("/".join(("router",) + names), []).append(jnp.asarray(leaf, jnp.float32))
  return {k: sum(v) / len(v) for k, v in groups.items()}
