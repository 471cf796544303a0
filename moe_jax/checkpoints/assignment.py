"""Partial restore by assignment map: initialise a model from a checkpoint of another.

**Partial restore** (:class:`InitFromCheckpoint`, :func:`apply_assignment_map`)
initialises a model from a checkpoint of a *different* model -- a Hugging Face
or moe-jax dense checkpoint into a larger model with adapters, experts or
routers that the checkpoint lacks. The assignment map is t5x's: a list of
``(target_regex, source)`` pairs tried in order against each target parameter
name (``/``-joined path, ``re.fullmatch``):

* ``source`` a string: load the source tensor ``match.expand(source)``
  (``r"\\1"`` back-references work), e.g. ``(r"(.*)/layers_1/(.*)",
  r"\\1/layers_0/\\2")`` copies layer 0 into layer 1;
* ``source`` ``None``: keep the fresh initialisation (new adapters, routers);
* no rule matches: load the tensor of the same name.

A missing source tensor is an error naming it (``fallback_to_init=True``
keeps the fresh value instead); a shape mismatch always is. Values are cast
to the target parameter's dtype (a bfloat16 checkpoint into float32 training).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from moe_jax.checkpoints.hf_common import CheckpointError
from moe_jax.checkpoints.native import flatten, unflatten
from moe_jax.checkpoints.orbax import is_training_dir, load_latest

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InitFromCheckpoint:
  """Initialise (part of) a fresh model from a checkpoint (see the module docstring).

  Attributes:
    path: Hugging Face directory, ``save_model`` directory, or training ``model_dir``.
    assignment_map: ``(target_regex, source_name_or_None)`` pairs.
    fallback_to_init: keep the fresh value for targets the source lacks.
    step: for a training ``model_dir``: the step (default the newest).
  """

  path: str
  assignment_map: tuple[tuple[str, str | None], ...] = ()
  fallback_to_init: bool = False
  step: int | None = None

  def __post_init__(self):
    rules = []
    for rule in self.assignment_map:
      if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str) \
          or not (rule[1] is None or isinstance(rule[1], str)):
        raise ValueError(f"assignment_map entry {rule!r}: expected (target_regex, "
                         "source_name or None)")
      try:
        re.compile(rule[0])
      except re.error as e:
        raise ValueError(f"assignment_map regex {rule[0]!r} is invalid: {e}") from None
      rules.append((rule[0], rule[1]))
    object.__setattr__(self, "assignment_map", tuple(rules))


def load_source_params(path: str | os.PathLike, *, step: int | None = None) -> dict[str, Any]:
  """Flat ``{name: np.ndarray}`` parameters of any checkpoint we read."""
  from moe_jax.checkpoints import load_checkpoint

  if is_training_dir(path):
    params = load_latest(path, step=step).params
  else:
    params = load_checkpoint(path).params
  return flatten(params)


@dataclasses.dataclass
class AssignmentReport:
  """What :func:`apply_assignment_map` did, by target parameter name."""

  loaded: dict[str, str]        # target -> source
  fresh: list[str]              # kept at initialisation
  unused_source: list[str]      # source tensors nothing loaded

  def summary(self) -> str:
    return (f"{len(self.loaded)} parameters loaded, {len(self.fresh)} freshly initialised"
            + (f", {len(self.unused_source)} source tensors unused" if self.unused_source else ""))


def apply_assignment_map(target: Mapping, source: Mapping[str, Any],
                         assignment_map: Sequence[tuple[str, str | None]] = (), *,
                         fallback_to_init: bool = False, source_name: str = "checkpoint"
                         ) -> tuple[dict, AssignmentReport]:
  """Which source tensor each target parameter takes.

  Args:
    target: the target parameter tree (arrays or ``ShapeDtypeStruct``).
    source: flat ``{name: array}`` source parameters, in either stack layout
      (:mod:`moe_jax.checkpoints.layout`); rules name the target's layout.
    assignment_map: ``(target_regex, source_name_or_None)`` rules.
    fallback_to_init: targets whose source tensor is missing stay fresh
      instead of raising.
    source_name: for error messages.

  Returns:
    ``(tree, report)``: ``tree`` has the target's structure with the source
    value (a numpy array in the target's dtype) or ``None`` (keep fresh) at
    each leaf.
  """
  from moe_jax.checkpoints.layout import match_layout

  # Stack layouts (unrolled layers_{i} / scanned layers) follow the target's first.
  source = flatten(match_layout(unflatten(dict(source)), target))
  compiled = [(re.compile(t), s) for t, s in assignment_map]
  flat_target = flatten(target, leaf=lambda x: x)
  chosen: dict[str, Any] = {}
  loaded: dict[str, str] = {}
  fresh: list[str] = []
  missing: list[tuple[str, str]] = []
  for name, leaf in flat_target.items():
    src = name
    for regex, repl in compiled:
      m = regex.fullmatch(name)
      if m:
        src = None if repl is None else m.expand(repl)
        break
    if src is None:
      chosen[name] = None
      fresh.append(name)
      continue
    if src not in source:
      if fallback_to_init:
        chosen[name] = None
        fresh.append(name)
        continue
      missing.append((name, src))
      continue
    value = np.asarray(source[src])
    want = tuple(leaf.shape)
    if tuple(value.shape) != want:
      raise CheckpointError(f"{source_name}: tensor {src!r} has shape {tuple(value.shape)}, but "
                            f"target parameter {name!r} has shape {want}")
    chosen[name] = value.astype(np.dtype(leaf.dtype))
    loaded[name] = src
  if missing:
    shown = ", ".join(f"{t!r} <- {s!r}" for t, s in missing[:6])
    raise CheckpointError(
        f"{source_name}: {len(missing)} target parameter(s) have no source tensor ({shown}"
        f"{' ...' if len(missing) > 6 else ''}); add assignment_map rules "
        "(target_regex, None) to keep them freshly initialised, or set fallback_to_init=True")
  unused = sorted(set(source) - set(loaded.values()))
  return unflatten(chosen), AssignmentReport(loaded=loaded, fresh=fresh, unused_source=unused)


def restore_into(params: Any, init: InitFromCheckpoint, shardings: Any = None, *,
                 abstract: Any = None) -> tuple[Any, AssignmentReport]:
  """``params`` with the leaves ``init`` assigns replaced by checkpoint values.

  Args:
    params: the fresh parameters (sharded arrays), or a zero-argument callable
      returning them. A callable is only called when some parameter stays
      fresh, so a full restore never pays for initialising (or compiling the
      initialisation of) the model; ``abstract`` is then required.
    init: what to load and how (assignment map).
    shardings: a tree like ``params`` of target shardings; by default each
      loaded value takes its fresh leaf's (or abstract leaf's) sharding.
    abstract: with a callable ``params``: the ``ShapeDtypeStruct`` tree (with
      shardings) of the parameters.

  Returns:
    ``(params, report)``.
  """
  fresh_fn = params if callable(params) else None
  if fresh_fn is not None:
    if abstract is None:
      raise ValueError("restore_into(callable, ...) needs the abstract parameters")
    if shardings is None:
      shardings = jax.tree.map(lambda s: s.sharding, abstract)
  else:
    abstract = params
  source = load_source_params(init.path, step=init.step)
  values, report = apply_assignment_map(abstract, source, init.assignment_map,
                                        fallback_to_init=init.fallback_to_init,
                                        source_name=str(init.path))
  if fresh_fn is not None:
    params = fresh_fn() if report.fresh else None
  flat_params = None if params is None else flatten(params, leaf=lambda x: x)
  flat_values = flatten(values, leaf=lambda x: x)
  flat_shardings = None if shardings is None else flatten(shardings, leaf=lambda x: x)
  out = {}
  for name, value in flat_values.items():
    if value is None:
      out[name] = flat_params[name]
      continue
    sharding = (flat_params[name].sharding if flat_shardings is None
                else flat_shardings[name])
    out[name] = jax.make_array_from_callback(value.shape, sharding,
                                             lambda idx, v=value: v[idx])
  logger.info("init from %s: %s", init.path, report.summary())
  return unflatten(out), report
