"""The routed mixture-of-experts FFN layer: a drop-in replacement for ``Mlp``.

Legend: B batch, L length, G groups, S tokens per group, D model dim,
E experts, K experts per token, C capacity, F expert ffn dim.

``MoeLayer(config=MoeConfig(...), hidden_dim=F)(x_BLD) -> y_BLD``. The
module only creates parameters and calls the pure functions of
``routing``, ``dispatch`` and ``parallel``::

    router/kernel        [D, E]     ("embed", "unmodeled")   float32 math
    score_bias           [E]        ("unmodeled",)  DeepSeek-V3's correction bias (not trained)
    experts/wi_0/kernel  [E, D, F]  ("expert", "embed", "mlp")
    experts/wi_1/kernel  [E, D, F]  ("expert", "embed", "mlp")
    experts/wo/kernel    [E, F, D]  ("expert", "mlp", "embed")
    shared_expert/...    a dense ``Mlp`` (optional, always on: DeepSeek / Qwen2-MoE)
    shared_expert_gate/kernel  [D, 1]  ("embed", "unmodeled")  Qwen2-MoE's sigmoid gate

**Groups.** Tokens are routed within groups of S tokens (see ``routing``);
by default one group per sequence (G = B, S = L), so capacity scales with
sequence length, groups never straddle devices when the batch is split, and
decoding one token at a time is one group of 1. ``num_groups`` overrides it
(flaxformer style: fewer, larger groups make capacity less noisy but the
one-hot baseline quadratically more expensive).

**Parallelism** is automatic: when a mesh is in context (``jax.set_mesh``)
together with logical rules (``nn.logical_axis_rules``) that split tokens,
experts or the expert FFN dimension, routing, dispatch and experts run inside
``shard_map`` (``parallel.py``) -- with an ``all_to_all`` when the ``expert``
axis has size > 1. Without a mesh (or with everything on one device) the
plain path runs. Both give the same numbers: routing is per group.

``init`` returns the sown collections too; pass only ``{"params": ...}`` to
``apply``, or the new values are appended to the old ones.

**Outputs for the trainer** (``self.sow``; ask for them with
``mutable=[AUX_LOSS_COLLECTION, METRICS_COLLECTION]``; each leaf is a tuple
with one entry per call):

* ``"aux_loss"`` collection: ``load_balancing_loss`` and ``router_z_loss``,
  already multiplied by their coefficients -- add the sum of all leaves
  (``total_aux_loss``) to the training loss.
* ``"moe_metrics"`` collection: unweighted ``load_balancing_loss``,
  ``router_z_loss``, ``expert_usage`` ``[E]``, ``dropped_fraction``,
  ``dropped_token_fraction``, ``router_confidence`` -- for logging. The
  ragged expert-parallel exchange also sows ``buffer_dropped`` (int32): the
  exact number of assignments that did not fit a receive buffer
  (``ragged_buffer_factor``), summed over the devices; ``dropped_fraction``
  includes them (``dropped_token_fraction`` and ``expert_usage`` count
  capacity drops only). ``TrainerConfig.dropless_fallback`` replays a step
  whose ``buffer_dropped`` is not 0 with worst-case buffers. With it comes
  ``buffer_load`` (float32): the most assignments any device was sent, over
  the balanced load -- the smallest ``ragged_buffer_factor`` that would have
  dropped nothing (the trainer logs its maximum over layers).

**Jitter** (Switch) is applied iff the caller provides a ``"jitter"`` rng
(``apply(..., rngs={"jitter": key})``): the trainer passes it in training and
evaluation simply does not. The decoder backbone calls its FFN as
``mlp(h_BLD)`` with no ``deterministic`` flag, so the rng is the switch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.moe.dispatch import DISPATCH_METHODS, moe_apply
from moe_jax.moe.experts import RAGGED_KERNELS, RoutedExperts, resolve_ragged_kernel
from moe_jax.moe.parallel import expert_parallel_apply, plan_from_context, route_local
from moe_jax.moe.ragged_parallel import EXCHANGES, effective_buffer_factor, resolve_exchange
from moe_jax.moe.routing import (SCORINGS, compute_capacity, experts_choose_route,
                                 router_stats, tokens_choose_route)
from moe_jax.nn.attention_kernels import target_platform
from moe_jax.nn.linear import Linear
from moe_jax.nn.mlp import Mlp
# The collections and their total are shared by every router (nn.router); re-exported here.
from moe_jax.nn.router import (AUX_LOSS_COLLECTION, METRICS_COLLECTION, router_logits,
                               total_aux_loss)

Array = jax.Array

__all__ = ["AUX_LOSS_COLLECTION", "BUFFER_DROPPED", "BUFFER_LOAD", "METRICS_COLLECTION", "ROUTERS",
           "MoeConfig", "MoeLayer", "RouterKernel", "total_aux_loss"]

ROUTERS = ("tokens_choose", "experts_choose")
#: The ``"moe_metrics"`` leaf counting assignments past a ragged receive buffer.
BUFFER_DROPPED = "buffer_dropped"
#: The ``"moe_metrics"`` leaf: the busiest receiver's assignments over its balanced load.
BUFFER_LOAD = "buffer_load"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoeConfig:
  """Routed experts of one MoE FFN.

  Attributes:
    num_experts: E.
    num_selected: K, experts per token (tokens-choose). Ignored by experts-choose,
      whose average experts per token is ``capacity_factor``.
    router: ``"tokens_choose"`` (top-k) or ``"experts_choose"``.
    capacity_factor: slots per expert = ``ceil(S·K·cf / E)`` (experts-choose:
      ``ceil(S·cf / E)``). 1.0 drops whatever overflows perfectly balanced
      routing; 1.25 (Switch) buys headroom with 25% padded FLOPs; ``None`` is
      dropless (C = S). The ``"ragged"`` dispatch is always dropless.
    min_capacity: floor on C (small groups, decoding).
    renormalize: divide the top-k gates by their sum (Mixtral; HF's
      ``norm_topk_prob`` of Qwen-MoE / OLMoE / DeepSeek-V3). Off for top-1.
    scoring: how tokens-choose scores experts: ``"softmax"`` over experts, or
      ``"sigmoid"`` (DeepSeek-V3: independent sigmoid scores, the gates the
      chosen experts' scores; :func:`~moe_jax.nn.router.group_limited_top_k_gates`).
    score_bias: sigmoid scoring chooses experts by ``score + b`` with a
      per-expert ``score_bias [E]`` (DeepSeek-V3's ``e_score_correction_bias``,
      its auxiliary-loss-free load balancing). It changes which experts are
      picked, never a gate, so it has no gradient: DeepSeek adjusts it by a
      rule outside the optimizer, which this library does not implement (it
      is read from and written to checkpoints and stays fixed; the layer
      stops its gradient).
    num_expert_groups, topk_groups: sigmoid scoring: the experts form
      ``num_expert_groups`` contiguous groups and only the ``topk_groups`` best
      (by the sum of their two best biased scores) are eligible (HF
      ``n_group`` / ``topk_group``).
    routed_scaling_factor: multiplies the routed experts' gates (after
      ``renormalize``; DeepSeek-V3's 2.5). Sigmoid scoring only.
    jitter_noise: Switch multiplicative router-input noise amplitude; only
      used when a ``"jitter"`` rng is supplied.
    batch_prioritized: BPR -- confident tokens claim slots first.
    dispatch: ``"sorted"`` (gather into capacity buffers; default),
      ``"ragged"`` (dropless grouped matmul; GPU/TPU), ``"onehot"`` (GShard
      einsum baseline). See ``dispatch.py``.
    ragged_kernel: grouped matmul of ``"ragged"``: ``"auto"`` (megablox
      ``gmm`` on TPU, ``ragged_dot`` elsewhere), ``"gmm"`` (Pallas interpret
      mode on CPU: tests) or ``"ragged_dot"``.
    ragged_exchange: how ``"ragged"`` moves tokens under expert parallelism:
      ``"auto"`` (``ragged_all_to_all`` on TPU / GPU; on CPU, which has no
      ragged all-to-all, padded buffers with C = S), ``"ragged"``,
      ``"padded"``, or ``"emulated"`` (the ragged path's exact semantics over a
      padded all_to_all: the CPU check of it). See ``ragged_parallel.py``.
    ragged_buffer_factor: receive buffer of the ragged exchange in units of a
      device's own assignments; ``None``: the worst case, truly dropless;
      ``f``: ``f·A`` rows, overflow dropped (less memory) and counted
      (``buffer_dropped``); ``TrainerConfig.dropless_fallback`` re-runs a
      step that overflowed with the worst case.
    num_groups: routing groups; ``None``: one per sequence.
    expert_dim: F of each expert; ``None``: the backbone's ``d_ff`` (upcycling).
    shared_expert_dim: F of each always-on shared expert added to the output;
      ``None``: no shared expert.
    num_shared_experts: how many shared experts of width ``shared_expert_dim``
      (0: none, like ``shared_expert_dim=None``). They see every token with
      weight one, so n of them are one ``Mlp`` of width ``n·shared_expert_dim``
      (DeepSeek stores them so too): one ``shared_expert`` subtree either way.
    shared_expert_gate: scale the shared experts' output by
      ``sigmoid(x · w)`` with ``w [D, 1]`` (``shared_expert_gate/kernel``,
      Qwen2-MoE); off: added as is (DeepSeek).
    load_balancing_loss_coef: Switch loss coefficient (1e-2 in Switch).
    z_loss_coef: router z-loss coefficient (1e-3 in ST-MoE).
    expert_parallel: use the ``shard_map`` path (all_to_all over the expert
      axis, local routing and dispatch on each device's token groups) when a
      mesh and rules are in context; off leaves everything to GSPMD (correct,
      but it all-gathers the routing).
  """

  num_experts: int
  num_selected: int = 2
  router: str = "tokens_choose"
  capacity_factor: float | None = 1.25
  min_capacity: int = 4
  renormalize: bool = False
  scoring: str = "softmax"
  score_bias: bool = False
  num_expert_groups: int = 1
  topk_groups: int = 1
  routed_scaling_factor: float = 1.0
  jitter_noise: float = 0.0
  batch_prioritized: bool = False
  dispatch: str = "sorted"
  ragged_kernel: str = "auto"
  ragged_exchange: str = "auto"
  ragged_buffer_factor: float | None = None
  num_groups: int | None = None
  expert_dim: int | None = None
  shared_expert_dim: int | None = None
  num_shared_experts: int = 1
  shared_expert_gate: bool = False
  load_balancing_loss_coef: float = 1e-2
  z_loss_coef: float = 1e-3
  expert_parallel: bool = True

  def __post_init__(self):
    if self.num_experts < 1:
      raise ValueError(f"MoeConfig.num_experts must be >= 1, got {self.num_experts}")
    if self.router not in ROUTERS:
      raise ValueError(f"MoeConfig.router {self.router!r} unknown; known: {ROUTERS}")
    if self.router == "tokens_choose" and not 1 <= self.num_selected <= self.num_experts:
      raise ValueError(f"MoeConfig.num_selected={self.num_selected} must be in "
                       f"[1, num_experts={self.num_experts}]")
    self._check_scoring()
    if self.dispatch not in DISPATCH_METHODS:
      raise ValueError(f"MoeConfig.dispatch {self.dispatch!r} unknown; known: "
                       f"{DISPATCH_METHODS}")
    if self.ragged_kernel not in RAGGED_KERNELS:
      raise ValueError(f"MoeConfig.ragged_kernel {self.ragged_kernel!r} unknown; known: "
                       f"{RAGGED_KERNELS}")
    if self.ragged_exchange not in EXCHANGES:
      raise ValueError(f"MoeConfig.ragged_exchange {self.ragged_exchange!r} unknown; known: "
                       f"{EXCHANGES}")
    if self.ragged_buffer_factor is not None and self.ragged_buffer_factor <= 0:
      raise ValueError(f"MoeConfig.ragged_buffer_factor must be > 0 or None, got "
                       f"{self.ragged_buffer_factor}")
    if self.dispatch == "ragged" and self.router == "experts_choose":
      raise ValueError("MoeConfig: dispatch 'ragged' needs router 'tokens_choose'")
    if self.capacity_factor is not None and self.capacity_factor <= 0:
      raise ValueError(f"MoeConfig.capacity_factor must be > 0 or None, got "
                       f"{self.capacity_factor}")
    if self.min_capacity < 1:
      raise ValueError(f"MoeConfig.min_capacity must be >= 1, got {self.min_capacity}")
    if not 0 <= self.jitter_noise < 1:
      raise ValueError(f"MoeConfig.jitter_noise must be in [0, 1), got {self.jitter_noise}")
    for name in ("num_groups", "expert_dim", "shared_expert_dim"):
      v = getattr(self, name)
      if v is not None and v < 1:
        raise ValueError(f"MoeConfig.{name} must be positive or None, got {v}")
    if self.num_shared_experts < 0:
      raise ValueError(f"MoeConfig.num_shared_experts must be >= 0, got "
                       f"{self.num_shared_experts}")
    if self.shared_expert_gate and self.shared_hidden_dim is None:
      raise ValueError("MoeConfig.shared_expert_gate needs a shared expert (shared_expert_dim "
                       "and num_shared_experts >= 1)")

  def _check_scoring(self) -> None:
    if self.scoring not in SCORINGS:
      raise ValueError(f"MoeConfig.scoring {self.scoring!r} unknown; known: {SCORINGS}")
    if self.scoring == "softmax":
      for name, default in (("score_bias", False), ("num_expert_groups", 1), ("topk_groups", 1),
                            ("routed_scaling_factor", 1.0)):
        if getattr(self, name) != default:
          raise ValueError(f"MoeConfig.{name}={getattr(self, name)!r} needs scoring='sigmoid'")
      return
    if self.router != "tokens_choose":
      raise ValueError("MoeConfig.scoring='sigmoid' needs router='tokens_choose'")
    g, tg = self.num_expert_groups, self.topk_groups
    if g < 1 or self.num_experts % g or not 1 <= tg <= g:
      raise ValueError(f"MoeConfig: num_expert_groups={g} must divide num_experts="
                       f"{self.num_experts} and topk_groups={tg} be in [1, {g}]")
    if self.num_selected > self.num_experts // g * tg:
      raise ValueError(f"MoeConfig.num_selected={self.num_selected} exceeds the "
                       f"{self.num_experts // g * tg} experts of topk_groups={tg} groups")

  @property
  def shared_hidden_dim(self) -> int | None:
    """Width of the fused shared-expert ``Mlp`` (``None``: no shared expert)."""
    if self.shared_expert_dim is None or self.num_shared_experts == 0:
      return None
    return self.shared_expert_dim * self.num_shared_experts

  def replace(self, **kw) -> "MoeConfig":
    return dataclasses.replace(self, **kw)


class MoeLayer(nn.Module):
  """Routed-experts FFN ``[..., D] -> [..., D]`` (see module docstring).

  Attributes:
    config: routing / capacity / dispatch settings.
    hidden_dim: F of each expert.
    activation: expert activation (``silu`` for SwiGLU, ``gelu`` for GeGLU).
    gated: gated (``wi_0``, ``wi_1``, ``wo``) or plain (``wi``, ``wo``) experts.
    dtype, param_dtype: compute and storage dtypes (router math is float32).
    kernel_init: optional initializer for the ``[E, in, out]`` expert kernels.
  """

  config: MoeConfig
  hidden_dim: int
  activation: str = "silu"
  gated: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Any = None

  def _groups(self, shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 2:
      raise ValueError(f"MoeLayer expects [..., D] with a token axis, got shape {shape}")
    tokens = math.prod(shape[:-1])
    g = self.config.num_groups or (shape[0] if len(shape) >= 3 else 1)
    if tokens % g:
      raise ValueError(f"MoeLayer: {tokens} tokens (shape {shape}) do not split into "
                       f"num_groups={g} equal groups")
    return g, tokens // g

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    d = x.shape[-1]
    g, s = self._groups(x.shape)
    x_GSD = nn.with_logical_constraint(x.reshape(g, s, d), ("batch", None, "embed"))

    # Router: float32, replicated kernel.
    kernel_DE = RouterKernel(num_experts=c.num_experts, name="router")(d)
    rng = None
    if c.jitter_noise > 0 and self.has_rng("jitter"):
      rng = self.make_rng("jitter")
    logits_GSE = router_logits(x_GSD, kernel_DE, jitter_noise=c.jitter_noise, rng=rng)

    method = c.dispatch
    if c.router == "experts_choose":
      cap = compute_capacity(s, c.num_experts, num_selected=1,
                             capacity_factor=c.capacity_factor, min_capacity=c.min_capacity)
      route = functools.partial(experts_choose_route, capacity=cap)
    else:
      cf = None if method == "ragged" else c.capacity_factor
      cap = compute_capacity(s, c.num_experts, num_selected=c.num_selected,
                             capacity_factor=cf, min_capacity=c.min_capacity)
      route = functools.partial(tokens_choose_route, num_selected=c.num_selected, capacity=cap,
                                renormalize=c.renormalize, batch_prioritized=c.batch_prioritized,
                                **self._scoring_options())
    plan = plan_from_context() if c.expert_parallel else None
    if plan is not None and not plan.is_trivial:
      routing = route_local(route, logits_GSE, plan)
    else:
      plan = None
      routing = route(logits_GSE)

    params = RoutedExperts(num_experts=c.num_experts, hidden_dim=self.hidden_dim,
                           gated=self.gated, param_dtype=self.param_dtype,
                           kernel_init=self.kernel_init, name="experts")(d)
    common = dict(activation=self.activation, gated=self.gated, dtype=self.dtype)
    y_GSD, exchange = self._apply_experts(x_GSD, routing, params, plan, common)
    self._sow_stats(logits_GSE, routing, exchange)
    y_GSD = nn.with_logical_constraint(y_GSD.astype(self.dtype), ("batch", None, "embed"))
    y = y_GSD.reshape(x.shape)
    if c.shared_hidden_dim is not None:
      y = y + self._shared_experts(x)
    return y

  def _scoring_options(self) -> dict[str, Any]:
    """Keywords of the sigmoid (DeepSeek-V3) router; creates ``score_bias`` when configured."""
    c = self.config
    if c.scoring == "softmax":
      return {}
    bias_E = None
    if c.score_bias:
      bias_E = jax.lax.stop_gradient(self.param(
          "score_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("unmodeled",)),
          (c.num_experts,), jnp.float32))
    return dict(scoring=c.scoring, score_bias_E=bias_E, num_expert_groups=c.num_expert_groups,
                topk_groups=c.topk_groups, gate_scale=c.routed_scaling_factor)

  def _shared_experts(self, x: Array) -> Array:
    """The always-on experts' output, gated by ``sigmoid(x · w)`` when configured."""
    c = self.config
    y = Mlp(hidden_dim=c.shared_hidden_dim, out_features=x.shape[-1], activation=self.activation,
            gated=self.gated, dtype=self.dtype, param_dtype=self.param_dtype,
            name="shared_expert")(x)
    if c.shared_expert_gate:
      gate = Linear(1, ("embed", "unmodeled"), dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=nn.initializers.zeros, name="shared_expert_gate")(x)
      y = jax.nn.sigmoid(gate) * y
    return y

  def _apply_experts(self, x_GSD, routing, params, plan, common
                     ) -> tuple[Array, tuple[Array, Array] | None]:
    """The dispatch path for this backend: one device, padded or ragged expert parallelism.

    Returns ``(y_GSD, exchange)``; ``exchange`` is ``(buffer_dropped,
    buffer_load)`` when the ragged exchange (which has receive buffers) runs,
    else ``None``.
    """
    c = self.config
    method = c.dispatch
    platform = target_platform()
    kernel = resolve_ragged_kernel(c.ragged_kernel, platform)
    if kernel == "gmm" and platform not in ("tpu", "cpu"):
      raise ValueError(f"MoeConfig.ragged_kernel='gmm' is a TPU kernel (building for "
                       f"{platform}); use 'ragged_dot' or 'auto'")
    ragged = dict(kernel=kernel, interpret=platform == "cpu")
    if plan is None:
      return moe_apply(x_GSD, routing, params, method=method, ragged_kernel=kernel,
                       interpret=ragged["interpret"], **common), None
    if method == "ragged":
      exchange = resolve_exchange(c.ragged_exchange, platform)
      if exchange == "padded":  # dropless padded buffers (C = S): the CPU path
        method = "sorted"
      elif plan.expert_axes:
        ragged.update(exchange=exchange,
                      buffer_factor=effective_buffer_factor(c.ragged_buffer_factor))
        y, dropped, load = expert_parallel_apply(x_GSD, routing, params, plan=plan,
                                                 method=method, ragged=ragged,
                                                 return_exchange_stats=True, **common)
        return y, (dropped, load)
    return expert_parallel_apply(x_GSD, routing, params, plan=plan, method=method,
                                 ragged=ragged, **common), None

  def _sow_stats(self, logits_GSE: Array, routing,
                 exchange: tuple[Array, Array] | None) -> None:
    c = self.config
    stats = router_stats(logits_GSE, routing)
    if exchange is not None:  # past the receive buffers: dropped too
      buffer_dropped, load = exchange
      self.sow(METRICS_COLLECTION, BUFFER_DROPPED, jax.lax.stop_gradient(buffer_dropped))
      self.sow(METRICS_COLLECTION, BUFFER_LOAD, jax.lax.stop_gradient(load))
      stats = stats.replace(dropped_fraction=stats.dropped_fraction + buffer_dropped.astype(
          jnp.float32) / routing.expert_GSK.size)
    self.sow(AUX_LOSS_COLLECTION, "load_balancing_loss",
             c.load_balancing_loss_coef * stats.load_balancing_loss)
    self.sow(AUX_LOSS_COLLECTION, "router_z_loss", c.z_loss_coef * stats.z_loss)
    for name, value in (("load_balancing_loss", stats.load_balancing_loss),
                        ("router_z_loss", stats.z_loss),
                        ("expert_usage", stats.expert_usage_E),
                        ("dropped_fraction", stats.dropped_fraction),
                        ("dropped_token_fraction", stats.dropped_token_fraction),
                        ("router_confidence", stats.router_confidence)):
      self.sow(METRICS_COLLECTION, name, jax.lax.stop_gradient(value))


class RouterKernel(nn.Module):
  """``kernel [D, E]``, logical axes ``("embed", "unmodeled")``: replicated, float32-stored.

  Default init is fan-in truncated normal scaled by 0.1 (Switch: "reduce the
  init scale by 10"), so routing starts near uniform and the softmax is not
  saturated before the balancing loss can act.
  """

  num_experts: int
  kernel_init: Any = None

  @nn.compact
  def __call__(self, d_model: int) -> Array:
    init = self.kernel_init or nn.initializers.variance_scaling(
        0.1, "fan_in", "truncated_normal")
    return self.param("kernel", nn.with_logical_partitioning(init, ("embed", "unmodeled")),
                      (d_model, self.num_experts), jnp.float32)
