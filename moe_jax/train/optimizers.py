"""Optimizers through optax: Adafactor (t5x defaults) and AdamW, schedules, clipping, masks.

``make_optimizer(config, params, trainable=...)`` returns an :class:`Optimizer`
(the optax transformation, its learning-rate schedule and the trainable mask).

**Trainable masks.** Parameter-efficient fine-tuning trains a few parameters
of a large frozen model. Frozen parameters must cost nothing: they go through
``optax.set_to_zero`` inside ``optax.multi_transform``, so the real optimizer
is initialised on the trainable subset only and frozen parameters get **no
optimizer state** (Adam's two moments for a 7B backbone would otherwise be
56 GB). The mask comes from

* a list of regexes (t5x's ``TRAINABLE_REGEX`` style), matched with
  ``re.fullmatch`` against ``/``-joined parameter paths such as
  ``decoder/layers_0/attn/q/kernel``; a regex that matches nothing is an
  error (it is almost always a typo), or
* a bool pytree with the structure of the parameters (e.g. from
  ``moe_jax.peft.trainable_mask(params)``), or a callable ``params -> mask``.

**Clipping** is by global norm over the trainable gradients only.

**Schedules** (``ScheduleConfig.kind``):

* ``"constant"``: ``lr`` (after the optional linear warm-up).
* ``"rsqrt"``: linear warm-up to ``lr`` over ``warmup_steps``, then
  ``lr * sqrt(warmup_steps / step)``: t5x's ``rsqrt_decay`` scaled so that it
  is continuous at the end of warm-up. (t5x's default, ``1/sqrt(max(step,
  10k))`` with a constant warm-up, is ``kind="rsqrt"``, ``warmup_steps=10000``,
  ``lr=0.01``, ``linear_warmup=False``.)
* ``"cosine"``: linear warm-up, then cosine decay to ``end_lr`` at
  ``decay_steps``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "rsqrt", "cosine")
OPTIMIZERS = ("adafactor", "adamw")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
  """Learning-rate schedule (see the module docstring).

  Attributes:
    kind: ``"constant"``, ``"rsqrt"`` or ``"cosine"``.
    lr: peak learning rate.
    warmup_steps: length of the warm-up.
    linear_warmup: ramp linearly from 0 during warm-up; ``False`` holds
      ``lr`` constant instead (t5x's default rsqrt schedule).
    decay_steps: cosine only: step at which ``end_lr`` is reached.
    end_lr: cosine only: final learning rate.
  """

  kind: str = "constant"
  lr: float = 1e-3
  warmup_steps: int = 0
  linear_warmup: bool = True
  decay_steps: int | None = None
  end_lr: float = 0.0

  def __post_init__(self):
    if self.kind not in SCHEDULES:
      raise ValueError(f"ScheduleConfig.kind={self.kind!r}; expected one of {SCHEDULES}")
    if self.warmup_steps < 0:
      raise ValueError(f"ScheduleConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
    if self.kind == "rsqrt" and self.warmup_steps < 1:
      raise ValueError("ScheduleConfig(kind='rsqrt') needs warmup_steps >= 1 (the decay is "
                       "lr * sqrt(warmup_steps / step))")
    if self.kind == "cosine" and (self.decay_steps is None
                                  or self.decay_steps <= self.warmup_steps):
      raise ValueError(f"ScheduleConfig(kind='cosine') needs decay_steps > warmup_steps, got "
                       f"decay_steps={self.decay_steps}, warmup_steps={self.warmup_steps}")


def make_schedule(config: ScheduleConfig) -> optax.Schedule:
  """The learning rate as a function of the (0-based) step."""
  c = config

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = float(max(c.warmup_steps, 1))
    if c.warmup_steps and c.linear_warmup:
      ramp = jnp.minimum(1.0, (step + 1.0) / warm)
    else:
      ramp = jnp.ones((), jnp.float32)
    if c.kind == "constant":
      decay = jnp.ones((), jnp.float32)
    elif c.kind == "rsqrt":
      decay = jnp.sqrt(warm / jnp.maximum(step, warm))
    else:
      frac = jnp.clip((step - c.warmup_steps) / (c.decay_steps - c.warmup_steps), 0.0, 1.0)
      cos = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
      return ramp * (c.end_lr + (c.lr - c.end_lr) * cos)
    return ramp * c.lr * decay

  return schedule


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
  """Optimizer, schedule, clipping and the trainable subset.

  Attributes:
    name: ``"adafactor"`` or ``"adamw"``.
    schedule: learning-rate schedule.
    clip_grad_norm: clip gradients to this global norm (``None``: no clipping).
    weight_decay: decoupled weight decay (AdamW; Adafactor's
      ``weight_decay_rate``). Applied to parameters with ndim >= 2 only
      (not to norms and biases).
    b1, b2, eps: AdamW moments and epsilon.
    adafactor_decay_rate, adafactor_min_dim_size_to_factor,
    adafactor_clipping_threshold, adafactor_multiply_by_parameter_scale,
    adafactor_momentum, adafactor_factored: Adafactor settings (defaults are
      t5x's: decay 0.8, factor dims >= 128, update clipping 1.0, relative
      step size, no momentum).
    trainable_regexes: regexes of the trainable parameters (``None``: all).
  """

  name: str = "adafactor"
  schedule: ScheduleConfig = ScheduleConfig()
  clip_grad_norm: float | None = None
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  adafactor_decay_rate: float = 0.8
  adafactor_min_dim_size_to_factor: int = 128
  adafactor_clipping_threshold: float | None = 1.0
  adafactor_multiply_by_parameter_scale: bool = True
  adafactor_momentum: float | None = None
  adafactor_factored: bool = True
  trainable_regexes: tuple[str, ...] | None = None

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f"OptimizerConfig.name={self.name!r}; expected one of {OPTIMIZERS}")
    if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
      raise ValueError(f"OptimizerConfig.clip_grad_norm must be positive, got "
                       f"{self.clip_grad_norm}")
    if isinstance(self.trainable_regexes, str):
      raise ValueError("OptimizerConfig.trainable_regexes must be a list of regexes, not a "
                       f"string ({self.trainable_regexes!r})")
    if self.trainable_regexes is not None:  # gin gives lists; keep the config hashable
      object.__setattr__(self, "trainable_regexes", tuple(self.trainable_regexes))


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """What the trainer needs: the transformation, its schedule, and the mask."""

  tx: optax.GradientTransformation
  schedule: optax.Schedule
  trainable_mask: Any  # bool pytree with the params' structure


# ----------------------------------------------------------------------------- masks


def param_names(params: Mapping) -> Any:
  """A pytree of ``/``-joined path strings with the structure of ``params``."""
  def name(path, _):
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
  return jax.tree_util.tree_map_with_path(name, params)


def trainable_mask_from_regexes(params: Mapping, regexes: Sequence[str]) -> Any:
  """Bool pytree: ``True`` where the parameter's path fully matches one regex."""
  if isinstance(regexes, str):
    regexes = [regexes]
  compiled = []
  for r in regexes:
    try:
      compiled.append(re.compile(r))
    except re.error as e:
      raise ValueError(f"trainable regex {r!r} is not a valid regex: {e}") from None
  names = param_names(params)
  mask = jax.tree.map(lambda n: any(c.fullmatch(n) for c in compiled), names)
  flat = jax.tree.leaves(names)
  unused = [r.pattern for r in compiled if not any(r.fullmatch(n) for n in flat)]
  if unused:
    raise ValueError(f"trainable regex(es) {unused} match no parameter; parameter names look "
                     f"like {flat[:3]} (matched with re.fullmatch)")
  return mask


def resolve_trainable_mask(params: Mapping, trainable: Any = None) -> Any:
  """A bool pytree from ``None`` (all trainable), regexes, a callable, or a bool pytree."""
  if trainable is None:
    return jax.tree.map(lambda _: True, params)
  if isinstance(trainable, str) or (isinstance(trainable, (list, tuple))
                                    and all(isinstance(t, str) for t in trainable)):
    mask = trainable_mask_from_regexes(params, trainable)
  elif callable(trainable):
    mask = trainable(params)
  else:
    mask = trainable
  try:
    mask = jax.tree.map(lambda _, m: bool(m), params, mask)
  except ValueError as e:
    raise ValueError(f"trainable mask does not have the parameters' structure: {e}") from None
  if not any(jax.tree.leaves(mask)):
    raise ValueError("the trainable mask selects no parameter: nothing would be trained")
  return mask


# ----------------------------------------------------------------------------- optimizer


def _decay_mask(params):
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def _base_transform(config: OptimizerConfig, schedule: optax.Schedule
                    ) -> optax.GradientTransformation:
  c = config
  if c.name == "adamw":
    return optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                       mask=_decay_mask)
  return optax.adafactor(
      schedule, min_dim_size_to_factor=c.adafactor_min_dim_size_to_factor,
      decay_rate=c.adafactor_decay_rate,
      multiply_by_parameter_scale=c.adafactor_multiply_by_parameter_scale,
      clipping_threshold=c.adafactor_clipping_threshold, momentum=c.adafactor_momentum,
      weight_decay_rate=c.weight_decay or None, factored=c.adafactor_factored,
      weight_decay_mask=_decay_mask if c.weight_decay else None)


def make_optimizer(config: OptimizerConfig, params: Mapping, *, trainable: Any = None
                   ) -> Optimizer:
  """Builds the optimizer for ``params`` (arrays or ``ShapeDtypeStruct`` leaves).

  Args:
    config: the optimizer configuration.
    params: the (unboxed) parameter tree; only its structure and names are used.
    trainable: overrides ``config.trainable_regexes``: regexes, a bool pytree,
      or a callable ``params -> bool pytree``. ``None`` uses the config.
  """
  schedule = make_schedule(config.schedule)
  spec = trainable if trainable is not None else config.trainable_regexes
  mask = resolve_trainable_mask(params, spec)
  inner = _base_transform(config, schedule)
  if config.clip_grad_norm is not None:
    inner = optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), inner)
  if all(jax.tree.leaves(mask)):
    tx = inner
  else:
    labels = jax.tree.map(lambda m: "trainable" if m else "frozen", mask)
    tx = optax.multi_transform({"trainable": inner, "frozen": optax.set_to_zero()}, labels)
  return Optimizer(tx=tx, schedule=schedule, trainable_mask=mask)


def masked_global_norm(grads: Any, mask: Any) -> jax.Array:
  """Global L2 norm of the trainable gradients."""
  leaves = [g for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(mask)) if m]
  return optax.global_norm(leaves)


def count_state_elements(opt_state: Any) -> int:
  """Number of array elements in an optimizer state (for tests and logging)."""
  return sum(int(jnp.size(x)) for x in jax.tree.leaves(opt_state))
