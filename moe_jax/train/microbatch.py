"""Gradient accumulation: one optimiser step over ``N`` microbatches of a global batch.

Memory for activations grows with the rows a device processes at once. With
``TrainerConfig.num_microbatches = N`` the train step splits its global batch
``[B, ...]`` into ``N`` microbatches of ``B / N`` rows, runs forward and
backward on each in turn (a ``jax.lax.scan``: one microbatch's activations
are alive at a time), and sums their gradients in float32 before the single
optimiser update. Only the *trainable* parameters are differentiated, so
the accumulator holds no gradient of a frozen backbone.

**Exactness.** The sum reproduces the gradient of the whole batch:

* the token loss is normalised per batch (``LossConfig.loss_normalizing_factor``):
  by the number of target tokens, the microbatch with ``n_i`` of the batch's
  ``n`` tokens is weighted ``n_i / n``; by a constant (or by nothing), the
  microbatch losses simply add up;
* auxiliary losses (load balancing, router z-loss) are means over a batch's
  tokens of products of per-batch statistics; they are averaged over the
  microbatches -- the mean of per-microbatch values, the same estimator the
  data-parallel layers already compute per token group.

Microbatch ``i`` holds rows ``i, i + N, i + 2N, ...`` of the global batch:
a ``[B, ...] -> [B / N, N, ...]`` reshape keeps every device's rows on that
device (the leading dimension stays split over the batch shards), so the split
moves no data.

Legend: N microbatches, B global batch rows.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from moe_jax.moe.layer import BUFFER_LOAD

#: Metrics that are per-token means of a microbatch (combined token-weighted).
TOKEN_MEAN_METRICS = ("accuracy",)
#: Normalised token losses: token-weighted or summed, as the loss itself.
TOKEN_LOSS_METRICS = ("cross_entropy", "z_loss")
#: Metrics that are maxima (the ragged exchange's ``model/buffer_load``): max over microbatches.
MAX_METRICS = (f"model/{BUFFER_LOAD}",)


def split_microbatches(batch: Mapping[str, jax.Array], num_microbatches: int,
                       constrain: Callable[[jax.Array], jax.Array] | None = None
                       ) -> dict[str, jax.Array]:
  """``{k: [B, ...]}`` -> ``{k: [N, B / N, ...]}``; microbatch ``i`` = rows ``i::N``.

  ``constrain`` (optional) places each ``[N, B / N, ...]`` array, e.g. with
  its second dimension over the batch mesh axes.
  """
  n = num_microbatches
  out = {}
  for key, v in batch.items():
    b = v.shape[0]
    if b % n:
      raise ValueError(f"batch feature {key!r}: {b} rows cannot be split into {n} microbatches")
    x = jnp.swapaxes(v.reshape(b // n, n, *v.shape[1:]), 0, 1)
    out[key] = constrain(x) if constrain is not None else x
  return out


def accumulate_gradients(loss_fn: Callable, params: Any, batch: Mapping[str, jax.Array],
                         rng: jax.Array | None, *, num_microbatches: int, trainable_mask: Any,
                         token_weighted: bool,
                         constrain: Callable[[jax.Array], jax.Array] | None = None
                         ) -> tuple[tuple[jax.Array, dict[str, jax.Array]], Any]:
  """``((loss, metrics), grads)`` of the whole batch, from ``N`` microbatches.

  Args:
    loss_fn: ``(params, batch, rng) -> (loss, metrics)`` (``BaseModel.loss_fn``);
      ``metrics`` has ``num_tokens`` and, with auxiliary losses, ``aux_loss``.
    params: the full parameter tree.
    batch: the global batch.
    rng: the step's key (``None``: deterministic); microbatch ``i`` uses
      ``fold_in(rng, i)``.
    num_microbatches: ``N``.
    trainable_mask: bool tree like ``params``; frozen leaves get zero gradients
      (never computed).
    token_weighted: the token loss is a per-token mean (normalised by the
      number of target tokens); otherwise it is a sum (or a sum over a constant).
    constrain: see :func:`split_microbatches`.
  """
  n = num_microbatches
  flat, treedef = jax.tree.flatten(params)
  flags = [bool(m) for m in jax.tree.leaves(trainable_mask)]
  trainable = [x for x, f in zip(flat, flags) if f]
  frozen = [x for x, f in zip(flat, flags) if not f]

  def merge(t):
    it_t, it_f = iter(t), iter(frozen)
    return jax.tree.unflatten(treedef, [next(it_t) if f else next(it_f) for f in flags])

  weights = batch.get("decoder_loss_weights")
  if weights is None:
    total_tokens = jnp.asarray(float(batch["decoder_target_tokens"].size), jnp.float32)
  else:
    total_tokens = jnp.maximum(jnp.sum(weights.astype(jnp.float32)), 1.0)

  def objective(t, mb, key):
    loss, metrics = loss_fn(merge(t), mb, key)
    aux = metrics.get("aux_loss", jnp.zeros((), jnp.float32))
    share = metrics["num_tokens"] / total_tokens if token_weighted else 1.0
    return share * (loss - aux) + aux / n, metrics

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def body(acc, xs):
    i, mb = xs
    key = None if rng is None else jax.random.fold_in(rng, i)
    (obj, metrics), g = grad_fn(trainable, mb, key)
    acc = [a + x.astype(a.dtype) for a, x in zip(acc, g)]
    return acc, (obj, metrics)

  zeros = [jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)) for x in trainable]
  mbs = split_microbatches(batch, n, constrain)
  acc, (objs, stacked) = jax.lax.scan(body, zeros, (jnp.arange(n), mbs))
  grads_t = iter([a.astype(x.dtype) for a, x in zip(acc, trainable)])
  grads = jax.tree.unflatten(
      treedef, [next(grads_t) if f else jnp.zeros_like(x) for x, f in zip(flat, flags)])
  metrics = combine_metrics(stacked, total_tokens, token_weighted=token_weighted)
  loss = jnp.sum(objs)
  metrics["loss"] = loss
  return (loss, metrics), grads


def combine_metrics(stacked: Mapping[str, jax.Array], total_tokens: jax.Array, *,
                    token_weighted: bool) -> dict[str, jax.Array]:
  """Per-microbatch metrics ``{k: [N]}`` -> the whole batch's (see the module docstring)."""
  share = stacked["num_tokens"] / total_tokens
  out = {}
  for key, v in stacked.items():
    if key == "num_tokens":
      out[key] = jnp.sum(v)
    elif key in TOKEN_MEAN_METRICS or (key in TOKEN_LOSS_METRICS and token_weighted):
      out[key] = jnp.sum(v * share)
    elif key in TOKEN_LOSS_METRICS:
      out[key] = jnp.sum(v)
    elif key in MAX_METRICS:
      out[key] = jnp.max(v, axis=0)
    else:
      out[key] = jnp.mean(v, axis=0)
  return out
