"""Routers as pure functions: who goes to which expert, in which slot, with what weight.

Legend: G groups, S tokens per group, D model dim, E experts, K experts per
token (top-k), C capacity (slots per expert per group).

Tokens are routed within *groups* (GShard): a group of S tokens shares one
capacity budget of C slots per expert. Groups are independent, so splitting
them over devices never changes which tokens are kept -- the property that
lets the expert-parallel layer equal the single-device one exactly.

Two routers:

* **Tokens choose** (Switch / GShard / ST-MoE): every token picks its top-k
  experts. Experts have C slots; slots are filled in *priority order* and an
  assignment that finds its expert full is **dropped** (its combine weight is
  0; the residual carries the token). Priority order, which decides exactly
  which assignments are dropped:

    1. choice rank first: all tokens' first choices, then all second
       choices, ... (a token loses its 2nd expert before anyone loses a 1st);
    2. within a rank, token order in the group -- or, with
       ``batch_prioritized=True`` (BPR, Riquelme et al. 2021), descending
       top-1 router probability, ties broken by token index.

  Slots are computed by a stable sort of the S·K assignments by expert -- no
  ``[S, E, C]`` one-hot tensor is ever built.

* **Experts choose** (Zhou et al. 2022): every expert picks its top-C tokens
  by router probability (ties: lower token index). Perfect load balance by
  construction, but a token may get 0 or several experts, and in a causal LM
  the choice depends on future tokens of the group (use it for encoders, or
  with groups that do not span a sequence's future, knowingly).

Router math is float32 whatever the model dtype: softmax over E logits and
top-k ties are where bfloat16 rounding flips decisions and blows up the
z-loss (ST-MoE, section 3.3).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

# Shared router math (one copy for MoE, attention mixture and PEFT routers); the
# losses and logits are re-exported here as part of this module's API.
from moe_jax.nn.router import (group_limited_top_k_gates, load_balancing_loss,
                               router_confidence, router_logits, router_z_loss, top_k_gates)

Array = jax.Array

#: How tokens-choose routing scores experts: softmax over experts, or DeepSeek-V3's sigmoids.
SCORINGS = ("softmax", "sigmoid")

__all__ = [
    "ExpertsChooseRouting", "RouterStats", "Routing", "SCORINGS", "TokensChooseRouting",
    "assign_slots", "compute_capacity", "experts_choose_route", "load_balancing_loss",
    "router_logits", "router_stats", "router_z_loss", "token_priority", "tokens_choose_route",
]


@flax.struct.dataclass
class TokensChooseRouting:
  """Result of tokens-choose routing.

  Attributes:
    expert_GSK: chosen experts, best first.
    weight_GSK: combine weight of each choice (float32); 0 where dropped.
    position_GSK: slot of the choice in its expert's buffer; ``capacity``
      where dropped.
    token_GEC: which token sits in each slot (``S`` for an empty slot): the
      inverse of (expert, position), used by gather-based dispatch.
    probs_GSE: router probabilities (float32), for losses and metrics.
    capacity: C, static.
  """

  expert_GSK: Array
  weight_GSK: Array
  position_GSK: Array
  token_GEC: Array
  probs_GSE: Array
  capacity: int = flax.struct.field(pytree_node=False)

  @property
  def kept_GSK(self) -> Array:
    return self.position_GSK < self.capacity

  @property
  def num_experts(self) -> int:
    return self.probs_GSE.shape[-1]


@flax.struct.dataclass
class ExpertsChooseRouting:
  """Result of experts-choose routing.

  Attributes:
    token_GEC: token chosen for each slot of each expert (always a real token).
    weight_GEC: its combine weight (router probability, float32).
    probs_GSE: router probabilities (float32).
    capacity: C, static.
  """

  token_GEC: Array
  weight_GEC: Array
  probs_GSE: Array
  capacity: int = flax.struct.field(pytree_node=False)

  @property
  def num_experts(self) -> int:
    return self.probs_GSE.shape[-1]


Routing = TokensChooseRouting | ExpertsChooseRouting


@flax.struct.dataclass
class RouterStats:
  """Router losses (unweighted) and metrics, averaged over groups.

  Attributes:
    load_balancing_loss: Switch loss ``E · Σ_i f_i P_i``; 1 when balanced.
    z_loss: ST-MoE ``mean(logsumexp(logits)^2)``.
    expert_usage_E: fraction of the group's S·K assignments each expert
      processed (after capacity); sums to ``1 - dropped_fraction``.
    dropped_fraction: fraction of the S·K assignments dropped by capacity.
    dropped_token_fraction: fraction of tokens that no expert processed.
    router_confidence: mean top-1 router probability.
  """

  load_balancing_loss: Array
  z_loss: Array
  expert_usage_E: Array
  dropped_fraction: Array
  dropped_token_fraction: Array
  router_confidence: Array


def compute_capacity(tokens_per_group: int, num_experts: int, *, num_selected: int = 1,
                     capacity_factor: float | None = 1.0, min_capacity: int = 4) -> int:
  """Slots per expert per group: ``clip(ceil(S·K·cf / E), min_capacity, S)``.

  Rounded *up* so that ``cf = 1`` with perfectly balanced routing drops
  nothing; floored at ``min_capacity`` because tiny groups (decoding one
  token at a time) would otherwise get C = 1 and drop on any collision; capped
  at S because a token picks distinct experts, so no expert can receive more
  than S assignments. ``capacity_factor=None`` means dropless: C = S.
  """
  if tokens_per_group < 1 or num_experts < 1 or num_selected < 1:
    raise ValueError(f"compute_capacity: need positive sizes, got S={tokens_per_group}, "
                     f"E={num_experts}, K={num_selected}")
  if num_selected > num_experts:
    raise ValueError(f"compute_capacity: top-{num_selected} of only {num_experts} experts")
  if capacity_factor is None:
    return tokens_per_group
  if capacity_factor <= 0:
    raise ValueError(f"compute_capacity: capacity_factor must be > 0, got {capacity_factor}")
  c = math.ceil(tokens_per_group * num_selected * capacity_factor / num_experts - 1e-9)
  return int(min(max(c, min_capacity, 1), tokens_per_group))


def token_priority(probs_GSE: Array, batch_prioritized: bool) -> Array:
  """``[G, S]`` permutation: tokens in the order they claim slots."""
  g, s, _ = probs_GSE.shape
  if not batch_prioritized:
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (g, s))
  return jnp.argsort(-probs_GSE.max(axis=-1), axis=-1, stable=True).astype(jnp.int32)


def assign_slots(expert_GSK: Array, num_experts: int, capacity: int,
                 order_GS: Array | None = None) -> tuple[Array, Array]:
  """Slot of every (token, choice) and the token of every slot, by a stable sort.

  Args:
    expert_GSK: chosen experts.
    num_experts: E.
    capacity: C.
    order_GS: token priority order (a permutation per group); default token
      order.

  Returns:
    ``position_GSK`` (``capacity`` where dropped) and ``token_GEC`` (``S``
    for empty slots). Cost O(S·K log(S·K) + E·C) per group.
  """
  g, s, k = expert_GSK.shape
  a = s * k
  if order_GS is None:
    order_GS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (g, s))
  # Assignments in priority order: a = rank_k * S + priority position.
  token_GA = jnp.tile(order_GS, (1, k))
  choice_GA = jnp.repeat(jnp.arange(k, dtype=jnp.int32), s)[None]
  expert_GA = jnp.take_along_axis(expert_GSK.astype(jnp.int32).transpose(0, 2, 1),
                                  order_GS[:, None, :], axis=2).reshape(g, a)
  sort_GA = jnp.argsort(expert_GA, axis=-1, stable=True)
  sorted_expert_GA = jnp.take_along_axis(expert_GA, sort_GA, axis=-1)
  experts_E = jnp.arange(num_experts, dtype=jnp.int32)
  # O(A·E) compares: cheaper to compile and run than a binary search for E <= a few hundred.
  search = lambda side: jax.vmap(lambda e: jnp.searchsorted(
      e, experts_E, side=side, method="compare_all"))(sorted_expert_GA).astype(jnp.int32)
  starts_GE, ends_GE = search("left"), search("right")
  rank_GA = jnp.arange(a, dtype=jnp.int32)[None] - jnp.take_along_axis(
      starts_GE, sorted_expert_GA, axis=-1)
  rank_GA = jnp.minimum(rank_GA, capacity)  # >= capacity: dropped
  # Scatter ranks back to (token, choice); indices are a permutation, so .set is exact.
  sorted_token_GA = jnp.take_along_axis(token_GA, sort_GA, axis=-1)
  sorted_choice_GA = jnp.take_along_axis(jnp.broadcast_to(choice_GA, (g, a)), sort_GA, axis=-1)
  position_GSK = jax.vmap(lambda t, ch, r: jnp.zeros((s, k), jnp.int32).at[t, ch].set(
      r, unique_indices=True))(sorted_token_GA, sorted_choice_GA, rank_GA)
  # Slot (e, c) holds sorted assignment starts[e] + c if c < count[e].
  c_idx = jnp.arange(capacity, dtype=jnp.int32)
  src_GEC = starts_GE[:, :, None] + c_idx[None, None, :]
  filled_GEC = src_GEC < ends_GE[:, :, None]
  token_GEC = jnp.take_along_axis(sorted_token_GA, jnp.minimum(src_GEC, a - 1).reshape(g, -1),
                                  axis=-1).reshape(g, num_experts, capacity)
  token_GEC = jnp.where(filled_GEC, token_GEC, s)
  return position_GSK, token_GEC


def tokens_choose_route(logits_GSE: Array, *, num_selected: int, capacity: int,
                        renormalize: bool = False, batch_prioritized: bool = False,
                        scoring: str = "softmax", score_bias_E: Array | None = None,
                        num_expert_groups: int = 1, topk_groups: int = 1,
                        gate_scale: float = 1.0) -> TokensChooseRouting:
  """Top-k tokens-choose routing with capacity (see module docstring for order).

  ``renormalize`` divides the k gates by their sum (Mixtral / ST-MoE top-2);
  without it the gates are the raw softmax probabilities (Switch). With k=1,
  renormalising makes every gate 1 and cuts the router's gradient through the
  output -- keep it off for top-1.

  ``scoring="sigmoid"`` is DeepSeek-V3's router
  (:func:`~moe_jax.nn.router.group_limited_top_k_gates`): independent sigmoid
  scores, the experts chosen by ``scores + score_bias_E`` within the
  ``topk_groups`` best of ``num_expert_groups`` groups, gates the unbiased
  scores (renormalised with ``renormalize``) times ``gate_scale``. Its
  ``probs_GSE`` (for the losses and metrics) are the scores normalised over
  the experts, as DeepSeek-V3's sequence-wise balance loss defines them.
  """
  logits_GSE = logits_GSE.astype(jnp.float32)
  e = logits_GSE.shape[-1]
  if not 1 <= num_selected <= e:
    raise ValueError(f"tokens_choose_route: num_selected={num_selected} must be in [1, E={e}]")
  if scoring == "softmax":
    if score_bias_E is not None or num_expert_groups != 1 or gate_scale != 1.0:
      raise ValueError("tokens_choose_route: score_bias_E, num_expert_groups and gate_scale "
                       "belong to scoring='sigmoid'")
    probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
    gate_GSK, expert_GSK = top_k_gates(probs_GSE, num_selected, renormalize=renormalize)
  elif scoring == "sigmoid":
    scores_GSE = jax.nn.sigmoid(logits_GSE)
    gate_GSK, expert_GSK = group_limited_top_k_gates(
        scores_GSE, num_selected, bias_E=score_bias_E, num_groups=num_expert_groups,
        topk_groups=topk_groups, renormalize=renormalize, scaling=gate_scale)
    probs_GSE = scores_GSE / jnp.sum(scores_GSE, axis=-1, keepdims=True)
  else:
    raise ValueError(f"tokens_choose_route: scoring {scoring!r} unknown; known: {SCORINGS}")
  order_GS = token_priority(probs_GSE, batch_prioritized)
  position_GSK, token_GEC = assign_slots(expert_GSK, e, capacity, order_GS)
  weight_GSK = jnp.where(position_GSK < capacity, gate_GSK, 0.0)
  return TokensChooseRouting(expert_GSK=expert_GSK, weight_GSK=weight_GSK,
                             position_GSK=position_GSK, token_GEC=token_GEC,
                             probs_GSE=probs_GSE, capacity=capacity)


def experts_choose_route(logits_GSE: Array, *, capacity: int) -> ExpertsChooseRouting:
  """Every expert takes its top-``capacity`` tokens by softmax-over-experts probability."""
  logits_GSE = logits_GSE.astype(jnp.float32)
  s = logits_GSE.shape[1]
  if capacity > s:
    raise ValueError(f"experts_choose_route: capacity {capacity} > tokens per group {s}")
  probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
  weight_GEC, token_GEC = jax.lax.top_k(probs_GSE.transpose(0, 2, 1), capacity)
  return ExpertsChooseRouting(token_GEC=token_GEC.astype(jnp.int32), weight_GEC=weight_GEC,
                              probs_GSE=probs_GSE, capacity=capacity)


def router_stats(logits_GSE: Array, routing: Routing) -> RouterStats:
  """Losses and metrics of one routing decision (all float32 scalars but usage)."""
  probs_GSE = routing.probs_GSE
  g, s, e = probs_GSE.shape
  if isinstance(routing, TokensChooseRouting):
    k = routing.expert_GSK.shape[-1]
    kept_GSK = routing.kept_GSK
    lb = load_balancing_loss(probs_GSE, routing.expert_GSK)
    usage_GE = jnp.sum(jax.nn.one_hot(routing.expert_GSK, e) * kept_GSK[..., None],
                       axis=(1, 2)) / (s * k)
    dropped = 1.0 - jnp.mean(kept_GSK.astype(jnp.float32))
    token_dropped = 1.0 - jnp.mean(jnp.any(kept_GSK, axis=-1).astype(jnp.float32))
  else:
    # Balanced by construction: no balancing loss. A token is dropped if no
    # expert picked it; usage is each expert's share of the E·C slots.
    lb = jnp.zeros((), jnp.float32)
    c = routing.capacity
    usage_GE = jnp.full((g, e), 1.0 / e, jnp.float32)
    # vmapped (batched) scatter: GSPMD keeps it on each device's groups.
    hit_GS = jax.vmap(lambda t: jnp.bincount(t, length=s) > 0)(
        routing.token_GEC.reshape(g, e * c))
    token_dropped = 1.0 - jnp.mean(hit_GS.astype(jnp.float32))
    dropped = token_dropped
  return RouterStats(load_balancing_loss=lb, z_loss=router_z_loss(logits_GSE),
                     expert_usage_E=usage_GE.mean(axis=0), dropped_fraction=dropped,
                     dropped_token_fraction=token_dropped,
                     router_confidence=router_confidence(probs_GSE))
