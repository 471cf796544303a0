"""Router math shared by every mixture: collections, logits, top-k, balancing and z-losses.

Legend: G groups, S tokens per group, D model dim, E experts, K experts per
token (top-k). ``...`` is any number of leading axes.

One copy of the math for the three kinds of router in this library: the
routed-expert layer (:mod:`moe_jax.moe.layer`), the mixture of attention
experts (:mod:`moe_jax.moe.attention_mixture`) and the soft-merging PEFT
routers (:mod:`moe_jax.peft.routers`). They differ in what they do with the
weights (dispatch tokens, mix attention layers, merge adapters), not in how
the weights, the losses or the sown collections are defined.

**float32 whatever the model dtype.** Softmax over E logits and top-k ties
are where bfloat16 rounding flips decisions and blows up the z-loss (ST-MoE,
section 3.3), so every function here computes in float32.

**Collections** (the convention the trainer reads, :mod:`moe_jax.train.losses`):
modules ``sow`` their auxiliary losses, already multiplied by their
coefficients, into :data:`AUX_LOSS_COLLECTION` (the training loss adds
:func:`total_aux_loss`), and unweighted losses and metrics into
:data:`METRICS_COLLECTION` (logged). Each leaf is a tuple, one entry per call.

**Groups and padding.** The losses average a per-group statistic over the
groups on axis 0 (GShard groups for routed experts; batch rows for the
attention mixture; one group of all tokens for the PEFT routers), and every
axis between the first and the last is a token axis of the group. With
``valid`` (1 for real tokens, 0 for padding) the per-group means become means
over the real tokens only.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array

#: Collection of the auxiliary losses, already weighted: summed into the training loss.
AUX_LOSS_COLLECTION = "aux_loss"
#: Collection of the unweighted router losses and metrics: logged, never optimised.
METRICS_COLLECTION = "moe_metrics"


# ----------------------------------------------------------------------------- routing


def router_logits(x_SD: Array, kernel_DE: Array, *, jitter_noise: float = 0.0,
                  rng: Array | None = None) -> Array:
  """float32 ``x · W`` over the last axis (no bias); with ``rng``, Switch jitter on ``x``.

  Jitter multiplies the router *input* by ``U(1 - eps, 1 + eps)``: it
  explores routing without perturbing the experts' inputs.
  """
  x = x_SD.astype(jnp.float32)
  if rng is not None and jitter_noise > 0:
    x = x * jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - jitter_noise, 1.0 + jitter_noise)
  return jnp.einsum("...d,de->...e", x, kernel_DE.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def top_k_gates(probs_SE: Array, k: int, *, renormalize: bool = False) -> tuple[Array, Array]:
  """``(gate_SK, expert_SK)``: the ``k`` largest probabilities and their experts, best first.

  Ties go to the lower expert index. ``renormalize`` divides the k gates by
  their sum (Mixtral / ST-MoE top-2), so a token's weights sum to one; with
  k=1 that makes every gate 1 and cuts the router's gradient through the
  output.
  """
  gate_SK, expert_SK = jax.lax.top_k(probs_SE.astype(jnp.float32), k)
  if renormalize:
    gate_SK = gate_SK / jnp.sum(gate_SK, axis=-1, keepdims=True)
  return gate_SK, expert_SK.astype(jnp.int32)


def top_k_weights(probs_SE: Array, k: int, *, renormalize: bool = False
                  ) -> tuple[Array, Array]:
  """``(weights_SE, expert_SK)``: :func:`top_k_gates` scattered back to a dense ``[..., E]``.

  The experts outside the top-k get weight exactly 0 (so no gradient). For
  mixtures that stay dense (merging E small adapters, or E attention layers
  whose keys are needed anyway) rather than dispatching tokens.
  """
  gate_SK, expert_SK = top_k_gates(probs_SE, k, renormalize=renormalize)
  onehot_SKE = jax.nn.one_hot(expert_SK, probs_SE.shape[-1], dtype=jnp.float32)
  return jnp.sum(gate_SK[..., None] * onehot_SKE, axis=-2), expert_SK


def group_limited_top_k_gates(scores_SE: Array, k: int, *, bias_E: Array | None = None,
                              num_groups: int = 1, topk_groups: int = 1,
                              renormalize: bool = False, scaling: float = 1.0
                              ) -> tuple[Array, Array]:
  """``(gate_SK, expert_SK)`` of DeepSeek-V3's router from its (sigmoid) scores.

  The *choice* uses ``scores + bias`` (the auxiliary-loss-free balancing
  bias, ``e_score_correction_bias``); the *gates* are the unbiased scores of
  the chosen experts, so the bias steers load without entering the output.
  Group-limited: the E experts form ``num_groups`` contiguous groups, each
  scored by the sum of its two best biased scores; only the ``topk_groups``
  best groups compete for the k experts (device-limited routing). Then
  ``renormalize`` divides the k gates by their sum (``norm_topk_prob``;
  ``1e-20`` guards a zero sum) and ``scaling`` multiplies them
  (``routed_scaling_factor``). Experts come best first by biased score; ties
  go to the lower index (groups and experts alike).
  """
  scores_SE = scores_SE.astype(jnp.float32)
  e = scores_SE.shape[-1]
  if e % num_groups or not 1 <= topk_groups <= num_groups:
    raise ValueError(f"group_limited_top_k_gates: {e} experts in num_groups={num_groups} "
                     f"groups, topk_groups={topk_groups}: groups must divide E and "
                     "1 <= topk_groups <= num_groups")
  if not 1 <= k <= e // num_groups * topk_groups:
    raise ValueError(f"group_limited_top_k_gates: top-{k} of the {e // num_groups * topk_groups} "
                     "experts of the kept groups")
  choice_SE = scores_SE if bias_E is None else scores_SE + jnp.asarray(bias_E, jnp.float32)
  if num_groups > 1:
    per = e // num_groups
    grouped = choice_SE.reshape(*choice_SE.shape[:-1], num_groups, per)
    group_score = jnp.sum(jax.lax.top_k(grouped, min(2, per))[0], axis=-1)
    _, kept = jax.lax.top_k(group_score, topk_groups)
    keep_SG = jnp.sum(jax.nn.one_hot(kept, num_groups, dtype=jnp.int32), axis=-2) > 0
    keep_SE = jnp.repeat(keep_SG, per, axis=-1)
    choice_SE = jnp.where(keep_SE, choice_SE, -jnp.inf)
  _, expert_SK = jax.lax.top_k(choice_SE, k)
  gate_SK = jnp.take_along_axis(scores_SE, expert_SK, axis=-1)
  if renormalize:
    gate_SK = gate_SK / (jnp.sum(gate_SK, axis=-1, keepdims=True) + 1e-20)
  return gate_SK * scaling, expert_SK.astype(jnp.int32)


# ----------------------------------------------------------------------------- losses


def _token_axes(x_GSE: Array) -> tuple[int, ...]:
  if x_GSE.ndim < 3:
    raise ValueError(f"router losses expect [G, S..., E] (groups, tokens, experts), got shape "
                     f"{x_GSE.shape}")
  return tuple(range(1, x_GSE.ndim - 1))


def _token_weights(valid_GS: Array, shape: tuple[int, ...]) -> Array:
  """Per-token weights summing to 1 over each group's real tokens (0 on padding)."""
  w = jnp.broadcast_to(jnp.asarray(valid_GS, jnp.float32), shape)
  axes = tuple(range(1, len(shape)))
  return w / jnp.maximum(jnp.sum(w, axis=axes, keepdims=True), 1.0)


def load_balancing_loss(probs_GSE: Array, expert_GSK: Array, valid_GS: Array | None = None
                        ) -> Array:
  """Switch auxiliary loss ``E · Σ_e f_e · P_e`` per group, averaged over groups.

  ``f_e``: fraction of the group's S·K choices (before any capacity) that
  picked expert e; ``P_e``: mean router probability of expert e. Both sum to
  1 over experts, so the loss is 1 under uniform routing for any k, and E
  when every token picks the same expert with probability 1; ``f`` carries
  no gradient (only ``P`` does). Soft-merging routers pass their top-1 expert as the choice
  ("everyone picks everything" would make the loss constant). The
  ``[S, K, E]`` one-hot is O(S·K·E), never O(S·E·C).

  Args:
    probs_GSE: router probabilities ``[G, S..., E]``.
    expert_GSK: chosen experts ``[G, S..., K]`` (distinct per token).
    valid_GS: real tokens ``[G, S...]``; ``None``: all.
  """
  probs_GSE = probs_GSE.astype(jnp.float32)
  e = probs_GSE.shape[-1]
  axes = _token_axes(probs_GSE)
  onehot_GSKE = jax.nn.one_hot(expert_GSK, e, dtype=jnp.float32)
  if valid_GS is None:
    f_GE = onehot_GSKE.mean(axis=axes + (probs_GSE.ndim - 1,))
    p_GE = probs_GSE.mean(axis=axes)
  else:
    tw_GS1 = _token_weights(valid_GS, probs_GSE.shape[:-1])[..., None]
    picked_GSE = jnp.sum(onehot_GSKE, axis=-2) / expert_GSK.shape[-1]
    f_GE = jnp.sum(picked_GSE * tw_GS1, axis=axes)
    p_GE = jnp.sum(probs_GSE * tw_GS1, axis=axes)
  return jnp.mean(e * jnp.sum(jax.lax.stop_gradient(f_GE) * p_GE, axis=-1))


def router_z_loss(logits_SE: Array, valid_S: Array | None = None) -> Array:
  """ST-MoE z-loss: mean over (real) tokens of ``logsumexp(logits)^2``; keeps logits small."""
  z = jax.nn.logsumexp(logits_SE.astype(jnp.float32), axis=-1)
  if valid_S is None:
    return jnp.mean(z * z)
  return jnp.sum(z * z * _token_weights(valid_S, (1,) + z.shape)[0])


def router_confidence(probs_SE: Array, valid_S: Array | None = None) -> Array:
  """Mean over (real) tokens of the top router probability (1/E uniform .. 1 one-hot)."""
  top = jnp.max(probs_SE.astype(jnp.float32), axis=-1)
  if valid_S is None:
    return jnp.mean(top)
  return jnp.sum(top * _token_weights(valid_S, (1,) + top.shape)[0])


# ----------------------------------------------------------------------------- collections


def _leaf_name(path, default: str) -> str:
  """The sown name of a leaf: its last dict key or attribute (tuple indices skipped)."""
  for k in reversed(path):
    if isinstance(k, jax.tree_util.DictKey):
      return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
      return k.name
  return default


def aux_loss_terms(state: Mapping[str, Any]) -> list[tuple[str, Array]]:
  """``[(name, float32 sum of the leaf)]`` for every leaf of the ``"aux_loss"`` collection.

  ``state`` is the mutable-collection dict ``module.apply(..., mutable=...)``
  returns; a leaf sown several times (a tuple) counts once, summed.
  """
  leaves = jax.tree_util.tree_flatten_with_path(state.get(AUX_LOSS_COLLECTION, {}))[0]
  return [(_leaf_name(path, AUX_LOSS_COLLECTION), jnp.sum(jnp.asarray(leaf, jnp.float32)))
          for path, leaf in leaves]


def total_aux_loss(state: Mapping[str, Any]) -> Array:
  """Sum of every sown auxiliary loss in a ``mutable`` state (float32; 0 if none)."""
  return sum((v for _, v in aux_loss_terms(state)), jnp.zeros((), jnp.float32))
