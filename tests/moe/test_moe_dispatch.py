"""Each dispatch path against a naive per-token loop (outputs and gradients)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import dispatch as Dp
from moe_jax.moe import routing as R
from moe_jax.moe.experts import expert_ffn

G, S, E, D, F = 2, 6, 4, 8, 16


def _ffn_one(params, e, x_D, gated):
  """One expert on one token, the obvious way."""
  if gated:
    h = jax.nn.silu(x_D @ params["wi_0"][e]) * (x_D @ params["wi_1"][e])
  else:
    h = jax.nn.silu(x_D @ params["wi"][e])
  return h @ params["wo"][e]


def tokens_choose_decisions(x_GSD, w_DE, *, k, capacity, bpr=False):
  """Top-k choices and kept (token, rank) pairs, filling slots in the documented order.

  Decisions are piecewise constant in the inputs, so they are made once on
  concrete values and held fixed under differentiation.
  """
  p = np.asarray(jax.nn.softmax(jnp.einsum("gsd,de->gse", x_GSD, w_DE), -1))
  g_, s_, e_ = p.shape
  decisions = []
  for g in range(g_):
    choices = [np.argsort(-p[g, s], kind="stable")[:k] for s in range(s_)]
    order = (sorted(range(s_), key=lambda s: (-p[g, s].max(), s)) if bpr else range(s_))
    fill, kept = [0] * e_, set()
    for r in range(k):  # all first choices, then all second choices
      for s in order:
        ex = choices[s][r]
        if fill[ex] < capacity:
          fill[ex] += 1
          kept.add((s, r))
    decisions.append((choices, kept))
  return decisions


def naive_tokens_choose(x_GSD, w_DE, params, *, decisions, renormalize=False, gated=True):
  """Token by token (a ``lax.map`` loop): its kept choices' experts, weighted by gates."""
  g_, s_, d = x_GSD.shape
  k = len(decisions[0][0][0])
  expert_TK = np.stack([np.stack(ch) for ch, _ in decisions]).reshape(g_ * s_, k)
  kept_TK = np.zeros((g_, s_, k), bool)
  for g, (_, kept) in enumerate(decisions):
    for s, r in kept:
      kept_TK[g, s, r] = True
  probs_TE = jax.nn.softmax(x_GSD.reshape(-1, d) @ w_DE, -1)

  def one_token(args):
    x_D, p_E, experts_K, kept_K = args
    gates = p_E[experts_K]
    if renormalize:
      gates = gates / gates.sum()
    y = jnp.zeros((d,), x_D.dtype)
    for r in range(k):
      y = y + jnp.where(kept_K[r], gates[r] * _ffn_one(params, experts_K[r], x_D, gated), 0.0)
    return y

  return jax.lax.map(one_token, (x_GSD.reshape(-1, d), probs_TE, jnp.asarray(expert_TK),
                                 jnp.asarray(kept_TK.reshape(-1, k)))).reshape(x_GSD.shape)


def naive_experts_choose(x_GSD, w_DE, params, *, picks):
  """Expert by expert, slot by slot (a ``lax.map`` loop): add w · expert(x) to its token."""
  g_, s_, d = x_GSD.shape
  probs = jax.nn.softmax(jnp.einsum("gsd,de->gse", x_GSD, w_DE), -1)
  slots = np.array([(g, e, t) for g, per_expert in enumerate(picks)
                    for e, tokens in enumerate(per_expert) for t in tokens])

  def one_slot(slot):
    g, e, t = slot[0], slot[1], slot[2]
    return probs[g, t, e] * _ffn_one(params, e, x_GSD[g, t], True)

  contrib = jax.lax.map(one_slot, jnp.asarray(slots))
  return jnp.zeros_like(x_GSD).at[slots[:, 0], slots[:, 2]].add(contrib)


def fast(x_GSD, w_DE, params, *, method, k, capacity, renormalize=False, bpr=False, gated=True,
         router="tokens_choose"):
  logits = R.router_logits(x_GSD, w_DE)
  if router == "tokens_choose":
    routing = R.tokens_choose_route(logits, num_selected=k, capacity=capacity,
                                    renormalize=renormalize, batch_prioritized=bpr)
  else:
    routing = R.experts_choose_route(logits, capacity=capacity)
  return Dp.moe_apply(x_GSD, routing, params, method=method, gated=gated)


def _inputs(gated=True, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(ks[0], (G, S, D))
  w = jax.random.normal(ks[1], (D, E))
  names = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
  params = {n: jax.random.normal(ks[2 + i], (E, F, D) if n == "wo" else (E, D, F)) / 3
            for i, n in enumerate(names)}
  return x, w, params


def _check_against_naive(fast_fns, f_naive, x, w, params):
  """Outputs and gradients (x, router kernel, expert kernels) of each fast fn vs naive."""
  def loss_and_grads(f):
    loss = lambda x, w, p: (jnp.sum(jnp.sin(f(x, w, p))), f(x, w, p))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  (_, y_naive), g_naive = loss_and_grads(f_naive)(x, w, params)
  for name, f in fast_fns.items():
    (_, y), g = loss_and_grads(f)(x, w, params)
    chex.assert_trees_all_close(y, y_naive, atol=1e-5, rtol=1e-5, custom_message=name)
    chex.assert_trees_all_close(g, g_naive, atol=1e-5, rtol=1e-5, custom_message=name)


@pytest.mark.parametrize("k,renormalize,bpr,gated", [
    (1, False, False, True), (2, True, True, False)])
def test_tokens_choose_no_drops_equals_naive(k, renormalize, bpr, gated):
  x, w, params = _inputs(gated)
  kw = dict(k=k, capacity=S, renormalize=renormalize, bpr=bpr, gated=gated)
  fns = {m: functools.partial(fast, method=m, **kw) for m in Dp.DISPATCH_METHODS}
  decisions = tokens_choose_decisions(x, w, k=k, capacity=S, bpr=bpr)
  assert all(len(kept) == S * k for _, kept in decisions)
  _check_against_naive(fns, functools.partial(naive_tokens_choose, decisions=decisions,
                                              renormalize=renormalize, gated=gated),
                       x, w, params)


@pytest.mark.parametrize("bpr,methods", [(False, Dp.DISPATCH_METHODS), (True, ("sorted",))])
def test_tokens_choose_with_drops_drops_documented_tokens(bpr, methods):
  x, w, params = _inputs(seed=1)
  logits = R.router_logits(x, w)
  r = R.tokens_choose_route(logits, num_selected=2, capacity=2, batch_prioritized=bpr)
  decisions = tokens_choose_decisions(x, w, k=2, capacity=2, bpr=bpr)
  # Exactly the documented assignments are kept ...
  for g, (choices, kept) in enumerate(decisions):
    np.testing.assert_array_equal(r.expert_GSK[g], np.stack(choices))
    want = np.zeros((S, 2), bool)
    for s, rank in kept:
      want[s, rank] = True
    np.testing.assert_array_equal(r.kept_GSK[g], want)
  assert 0 < float(R.router_stats(logits, r).dropped_fraction) < 1  # drops do happen
  # ... and every path computes exactly those. ("ragged" honours the router's
  # drops given the same routing; the layer routes it dropless.)
  fns = {m: functools.partial(fast, method=m, k=2, capacity=2, bpr=bpr) for m in methods}
  _check_against_naive(fns, functools.partial(naive_tokens_choose, decisions=decisions),
                       x, w, params)


def test_experts_choose_equals_naive():
  x, w, params = _inputs(seed=2)
  p = np.asarray(jax.nn.softmax(jnp.einsum("gsd,de->gse", x, w), -1))
  picks = [[np.argsort(-p[g, :, e], kind="stable")[:2] for e in range(E)] for g in range(G)]
  fns = {m: functools.partial(fast, method=m, k=1, capacity=2, router="experts_choose")
         for m in ("sorted", "onehot")}
  _check_against_naive(fns, functools.partial(naive_experts_choose, picks=picks), x, w, params)


def test_ragged_rejects_experts_choose():
  logits = jax.random.normal(jax.random.key(0), (1, 4, 2))
  r = R.experts_choose_route(logits, capacity=2)
  with pytest.raises(ValueError, match="tokens-choose"):
    Dp.moe_apply(jnp.zeros((1, 4, 3)), r, {}, method="ragged")
  with pytest.raises(ValueError, match="unknown dispatch method"):
    Dp.moe_apply(jnp.zeros((1, 4, 3)), r, {}, method="dense")


def test_sorted_path_builds_no_token_by_expert_by_capacity_tensor():
  g, s, e, k, d, f = 1, 64, 8, 2, 4, 4
  c = R.compute_capacity(s, e, num_selected=k, capacity_factor=1.0, min_capacity=1)
  x = jnp.ones((g, s, d))
  w = jnp.ones((d, e))
  params = {n: jnp.ones((e, f, d) if n == "wo" else (e, d, f)) for n in ("wi_0", "wi_1", "wo")}
  limit = g * s * e * c  # one [G, S, E, C] tensor

  def sizes(method):
    fn = functools.partial(fast, method=method, k=k, capacity=c)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w, p: fn(x, w, p).sum(), argnums=(0, 1, 2)))(
        x, w, params)
    out = []

    def walk(jp):
      for eqn in jp.eqns:
        out.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
          walk(sub)
        for p in eqn.params.values():
          if hasattr(p, "jaxpr"):
            walk(p.jaxpr)
    walk(jaxpr.jaxpr)
    return max(out)

  assert sizes("sorted") * 4 <= limit
  assert sizes("onehot") >= limit  # the baseline does build it


def test_expert_ffn_matches_per_expert_matmuls():
  x, _, params = _inputs()
  x_END = jnp.stack([x.reshape(-1, D)] * E)
  y = expert_ffn(params, x_END)
  for e in range(E):
    want = jax.vmap(lambda t, e=e: _ffn_one(params, e, t, True))(x.reshape(-1, D))
    np.testing.assert_allclose(y[e], want, atol=1e-5, rtol=1e-5)
