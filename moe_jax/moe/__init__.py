"""Routed mixture of experts: routers, dispatch, experts, the MoE layer, expert parallelism.

Pure functions live in ``routing`` (routers, capacity, losses), ``dispatch``
(sorted / ragged / one-hot paths), ``experts`` (expert FFN math and the
stacked-kernel module) and ``parallel`` (``shard_map`` + ``all_to_all``);
``layer.MoeLayer`` wires them into a drop-in FFN replacement.
"""

from moe_jax.moe.dispatch import DISPATCH_METHODS, moe_apply
from moe_jax.moe.experts import RoutedExperts, expert_ffn, upcycle_dense_params
from moe_jax.moe.layer import (AUX_LOSS_COLLECTION, METRICS_COLLECTION, MoeConfig, MoeLayer,
                               total_aux_loss)
from moe_jax.moe.parallel import ExpertParallelPlan, expert_parallel_apply, plan_from_context
from moe_jax.moe.routing import (ExpertsChooseRouting, RouterStats, TokensChooseRouting,
                                 compute_capacity, experts_choose_route, load_balancing_loss,
                                 router_stats, router_z_loss, tokens_choose_route)

__all__ = [
    "AUX_LOSS_COLLECTION", "DISPATCH_METHODS", "ExpertParallelPlan", "ExpertsChooseRouting",
    "METRICS_COLLECTION", "MoeConfig", "MoeLayer", "RoutedExperts", "RouterStats",
    "TokensChooseRouting", "compute_capacity", "expert_ffn", "expert_parallel_apply",
    "experts_choose_route", "load_balancing_loss", "moe_apply", "plan_from_context",
    "router_stats", "router_z_loss", "tokens_choose_route", "total_aux_loss",
    "upcycle_dense_params",
]
