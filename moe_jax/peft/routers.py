"""Routers of the parameter-efficient mixtures (MoV, MoLoRA): pure math plus one thin module.

Legend: B batch, L tokens, S key tokens, D model dim, E experts.

**Soft merging.** A router is a bias-free linear map ``x W`` (``W [D, E]``)
followed by a softmax; the E adapters of a site are merged with those
probabilities, per token (Zadouri et al. 2023). The router is float32 in
parameters *and* compute whatever the model's dtype: with E ~ 10 the logits
differ by small amounts that bfloat16 (8 bits of mantissa) would round away,
and the softmax of rounded logits is what the experts are trained against.
``W`` starts random (fan-in scaled), not zero: with all experts identical at
initialisation (vectors of ones, ``B = 0``), a uniform router would give
every expert the same gradient forever, and the router none.

**Top-k** (an ablation of the paper): only the k most probable experts keep
their probability, optionally renormalised to sum to 1. Computation stays
dense (merging E small adapters costs less than gathering k of them); the
masked experts simply get weight 0, so they receive no gradient.

**Sentence-level routing.** The router reads, for each token, the mean of the
representations of the tokens *it may attend to* in that block (its
self-attention mask): in an encoder that is the whole non-padding sentence
(per segment when rows are packed), which is the paper's definition; in a
causal decoder it is the token's prefix. Pooling over the whole sequence in a
causal model would leak later tokens into earlier tokens' routing (the model
could read the next token off its routing weights), so the prefix is the only
honest choice there. A cross-attention key (an encoder token) pools over the
encoder tokens of its own sentence. Pooling needs the representations of all
attended tokens, so sentence-level routing runs on full sequences (training,
scoring), not on incremental decoding with a KV cache, which raises.

**Losses and metrics.** Each mixture site sows, when the collections are
mutable (``apply(..., mutable=[AUX_LOSS_COLLECTION, METRICS_COLLECTION])``;
each leaf is a tuple with one entry per call):

* ``"aux_loss"``: ``load_balancing_loss`` and ``router_z_loss`` times their
  coefficients, only when the coefficient is positive; add
  :func:`total_aux_loss` to the training loss.
* ``"moe_metrics"``: unweighted ``load_balancing_loss``, ``router_z_loss``,
  ``expert_usage`` ``[E]``, ``usage_entropy`` (entropy of the mean merge
  weights, ``log E`` when balanced) and ``router_confidence`` (mean top
  probability). :func:`summarize_metrics` averages them over sites.

The collection names and the losses are the shared router math of
:mod:`moe_jax.nn.router`, the routed-MoE layer's too, so one trainer collects
both. Padding tokens are excluded when the block knows them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

# The collections, the losses and their total are the shared router math (nn.router), the
# same the routed-expert layer and the attention mixture use; re-exported here.
from moe_jax.nn import router as router_math
from moe_jax.nn.router import AUX_LOSS_COLLECTION, METRICS_COLLECTION, total_aux_loss

Array = jax.Array

__all__ = [
    "AUX_LOSS_COLLECTION", "METRICS_COLLECTION", "RouteContext", "Router", "Routing",
    "cross_attention_context", "expert_usage", "load_balancing_loss", "masked_mean",
    "query_valid", "route", "router_confidence", "router_logits", "router_z_loss",
    "self_attention_context", "summarize_metrics", "top_k_mask", "total_aux_loss",
    "usage_entropy", "with_query",
]


# ----------------------------------------------------------------------------- routing math


@flax.struct.dataclass
class Routing:
  """One routing decision.

  Attributes:
    logits: router logits ``[..., E]`` (float32).
    probs: softmax of the logits ``[..., E]``.
    weights: merge weights ``[..., E]``: ``probs``, or their top-k part.
    top_k: the top-k it was made with (``None``: soft merging).
  """

  logits: Array
  probs: Array
  weights: Array
  top_k: int | None = flax.struct.field(pytree_node=False, default=None)


def router_logits(x: Array, kernel_DE: Array) -> Array:
  """``x · W`` in float32 (no bias)."""
  return router_math.router_logits(x, kernel_DE)


def top_k_mask(probs: Array, k: int) -> Array:
  """Boolean ``[..., E]``: the ``k`` largest entries of each row (ties: lower index)."""
  _, idx = router_math.top_k_gates(probs, k)
  return jnp.any(jax.nn.one_hot(idx, probs.shape[-1], dtype=bool), axis=-2)


def route(logits: Array, *, top_k: int | None = None, renormalize: bool = True) -> Routing:
  """Softmax probabilities and merge weights of router logits."""
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  if top_k is None or top_k >= probs.shape[-1]:
    return Routing(logits=logits, probs=probs, weights=probs)
  weights, _ = router_math.top_k_weights(probs, top_k, renormalize=renormalize)
  return Routing(logits=logits, probs=probs, weights=weights, top_k=top_k)


def _valid(shape: tuple[int, ...], valid: Array | None) -> Array:
  """Real tokens as floats (all ones without a mask): every statistic here is a weighted mean."""
  return jnp.ones(shape, jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)


def _token_weights(shape: tuple[int, ...], valid: Array | None) -> Array:
  """Per-token float weights (1 for real tokens, 0 for padding), normalised to sum 1."""
  w = jnp.broadcast_to(_valid(shape, valid), shape)
  return w / jnp.maximum(jnp.sum(w), 1.0)


def load_balancing_loss(routing: Routing, valid: Array | None = None) -> Array:
  """Switch loss ``E · Σ_e f_e · P_e`` over real tokens (``nn.router.load_balancing_loss``).

  ``f_e`` is the share of token choices that picked expert e (top-k
  selection, or the top-1 expert under soft merging, where "everyone picks
  everything" would make the loss constant); ``P_e`` the mean probability.
  All tokens of the call form one group. It is 1 under uniform routing and
  only ``P`` carries gradient.
  """
  probs = routing.probs
  _, expert = router_math.top_k_gates(probs, routing.top_k or 1)
  return router_math.load_balancing_loss(probs[None], expert[None],
                                         _valid(probs.shape[:-1], valid)[None])


def router_z_loss(logits: Array, valid: Array | None = None) -> Array:
  """ST-MoE z-loss: mean over real tokens of ``logsumexp(logits)^2``."""
  return router_math.router_z_loss(logits, _valid(logits.shape[:-1], valid))


def expert_usage(routing: Routing, valid: Array | None = None) -> Array:
  """Mean merge weight of each expert over real tokens, ``[E]``, summing to 1."""
  w = routing.weights / jnp.maximum(jnp.sum(routing.weights, -1, keepdims=True), 1e-9)
  tw = _token_weights(w.shape[:-1], valid)[..., None]
  return jnp.sum(w * tw, axis=tuple(range(w.ndim - 1)))


def usage_entropy(usage_E: Array) -> Array:
  """Entropy (nats) of an expert-usage distribution: ``log E`` when balanced, 0 when collapsed."""
  p = usage_E.astype(jnp.float32)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))


def router_confidence(routing: Routing, valid: Array | None = None) -> Array:
  """Mean over real tokens of the top router probability (1/E uniform .. 1 one-hot)."""
  return router_math.router_confidence(routing.probs, _valid(routing.probs.shape[:-1], valid))


# ----------------------------------------------------------------------------- routing context


@dataclasses.dataclass(frozen=True)
class RouteContext:
  """What the routers of one sublayer read, built by the adapted block.

  Attributes:
    query_BLD: router input of the sites on the sublayer's own tokens (``q``,
      ``o`` and every FFN site): the sublayer's normed input (token routing)
      or its sentence-pooled version.
    kv_BSD: router input of the ``k``/``v`` sites; ``None`` means the k/v
      input itself (token routing: the normed input in self-attention, the
      encoder output in cross-attention).
    query_valid_BL, kv_valid_BS: real (non-padding) tokens, for losses and
      metrics; ``None`` means all.
  """

  query_BLD: Array
  kv_BSD: Array | None = None
  query_valid_BL: Array | None = None
  kv_valid_BS: Array | None = None
  sentence: bool = False


def masked_mean(x_BSD: Array, pool_BLS: Array) -> Array:
  """``[B, L, D]``: for each row l the float32 mean of the ``x_s`` with ``pool[l, s]``."""
  pool = jnp.asarray(pool_BLS, jnp.float32)
  total = jnp.einsum("bls,bsd->bld", pool, x_BSD.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
  return total / jnp.maximum(jnp.sum(pool, axis=-1, keepdims=True), 1.0)


def query_valid(mask_BLS: Array, cache_index: Array | int | None = None) -> Array:
  """Which queries are real tokens: a real token in slot ``t`` may attend itself.

  Query ``l`` sits in slot ``cache_index + l`` (slot ``l`` without a cache).
  """
  b, l, s = mask_BLS.shape
  slots = jnp.arange(l) + (0 if cache_index is None else jnp.asarray(cache_index, jnp.int32))
  slots = jnp.clip(slots, 0, s - 1)
  return jnp.take_along_axis(jnp.asarray(mask_BLS, bool),
                             jnp.broadcast_to(slots[None, :, None], (b, l, 1)), axis=2)[..., 0]


def self_attention_context(h_BLD: Array, mask_BLS: Array, cache_index: Array | None,
                           *, sentence: bool) -> RouteContext:
  """Routing context of a self-attention sublayer (and of an FFN in the same block).

  Raises:
    ValueError: sentence-level routing with a KV cache (keys beyond this call).
  """
  valid = query_valid(mask_BLS, cache_index)
  if not sentence:
    return RouteContext(query_BLD=h_BLD, query_valid_BL=valid, kv_valid_BS=valid)
  if mask_BLS.shape[1] != mask_BLS.shape[2]:
    raise ValueError(
        "sentence-level routing pools over the tokens each token attends to and needs their "
        f"representations, so it runs on full sequences only (got {mask_BLS.shape[1]} queries "
        f"against {mask_BLS.shape[2]} cache slots); use router='token' for incremental decoding")
  pooled = masked_mean(h_BLD, mask_BLS)
  return RouteContext(query_BLD=pooled, kv_BSD=pooled, query_valid_BL=valid, kv_valid_BS=valid,
                      sentence=True)


def with_query(ctx: RouteContext, h_BLD: Array, self_mask_BLS: Array) -> RouteContext:
  """``ctx`` for another sublayer of the same block whose normed input is ``h_BLD``."""
  if not ctx.sentence:
    return RouteContext(query_BLD=h_BLD, query_valid_BL=ctx.query_valid_BL,
                        kv_valid_BS=ctx.query_valid_BL)
  pooled = masked_mean(h_BLD, self_mask_BLS)
  return RouteContext(query_BLD=pooled, kv_BSD=pooled, query_valid_BL=ctx.query_valid_BL,
                      kv_valid_BS=ctx.query_valid_BL, sentence=True)


def cross_attention_context(query_ctx: RouteContext, cross_mask_BLS: Array,
                            enc_BSD: Array | None) -> RouteContext:
  """Context of a cross-attention sublayer: queries as ``query_ctx``, keys are encoder tokens.

  An encoder token's sentence is the set of encoder tokens that some decoder
  query attends together with it (``cross^T · cross > 0``): its non-padding
  source sentence, per segment when packed.
  """
  mask = jnp.asarray(cross_mask_BLS, bool)
  kv_valid = jnp.any(mask, axis=1)
  kv = None
  if query_ctx.sentence and enc_BSD is not None:
    m = mask.astype(jnp.float32)
    pool_BSS = jnp.einsum("bls,blt->bst", m, m) > 0
    kv = masked_mean(enc_BSD, pool_BSS)
  return RouteContext(query_BLD=query_ctx.query_BLD, kv_BSD=kv,
                      query_valid_BL=query_ctx.query_valid_BL, kv_valid_BS=kv_valid,
                      sentence=query_ctx.sentence)


# ----------------------------------------------------------------------------- module


class Router(nn.Module):
  """``W [D, E]`` (float32, logical axes ``("embed", "unmodeled")``) -> merge weights.

  Sows losses and metrics (module docstring) on every call.

  Attributes:
    num_experts: E.
    top_k, renormalize: see :func:`route`.
    load_balance_coef, z_loss_coef: weights of the sown ``aux_loss`` terms.
  """

  num_experts: int
  top_k: int | None = None
  renormalize: bool = True
  load_balance_coef: float = 0.0
  z_loss_coef: float = 0.0

  @nn.compact
  def __call__(self, x: Array, valid: Array | None = None) -> Array:
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
            ("embed", "unmodeled")),
        (x.shape[-1], self.num_experts), jnp.float32)
    routing = route(router_logits(x, kernel), top_k=self.top_k, renormalize=self.renormalize)
    self._sow(routing, valid)
    return routing.weights

  def _sow(self, routing: Routing, valid: Array | None) -> None:
    if not (self.is_mutable_collection(AUX_LOSS_COLLECTION)
            or self.is_mutable_collection(METRICS_COLLECTION)):
      return  # nobody asked: do not even trace the statistics
    lb = load_balancing_loss(routing, valid)
    z = router_z_loss(routing.logits, valid)
    if self.load_balance_coef > 0:
      self.sow(AUX_LOSS_COLLECTION, "load_balancing_loss", self.load_balance_coef * lb)
    if self.z_loss_coef > 0:
      self.sow(AUX_LOSS_COLLECTION, "router_z_loss", self.z_loss_coef * z)
    usage = expert_usage(routing, valid)
    for name, value in (("load_balancing_loss", lb), ("router_z_loss", z),
                        ("expert_usage", usage), ("usage_entropy", usage_entropy(usage)),
                        ("router_confidence", router_confidence(routing, valid))):
      self.sow(METRICS_COLLECTION, name, jax.lax.stop_gradient(value))


def summarize_metrics(state: Mapping[str, Any]) -> dict[str, Array]:
  """Each scalar router metric averaged over every site and call (empty without routers)."""
  sums: dict[str, list[Array]] = {}

  def visit(path, leaf):
    name = str(getattr(path[-2], "key", path[-2])) if len(path) >= 2 else ""
    if jnp.ndim(leaf) == 0:
      sums.setdefault(name, []).append(leaf)

  jax.tree_util.tree_map_with_path(visit, state.get(METRICS_COLLECTION, {}))
  return {k: jnp.mean(jnp.stack(v)) for k, v in sums.items()}
