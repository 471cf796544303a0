"""Peak memory of a traced program: a liveness walk over its jaxpr, in program order.

The eval_shape plan used to add the backward pass's residuals to the largest
rematerialised block's working set. That misses where a train step actually
peaks: at the loss (logits, their softmax and their gradient, all
``[B, L, vocab]`` float32, alive together) or inside a block's backward pass
(its recomputed forward, plus the gradient of its input), with only the
residuals *still* alive at that point. This module walks the jaxpr of the
whole gradient computation (forward, then backward, as ``jax.grad`` emits
them: the schedule XLA starts from) and keeps a running sum of the arrays
alive:

* an equation's outputs are allocated when it runs; its inputs are freed
  after their last use; the program's own inputs (parameters, batch) and
  outputs (the gradients: the plan counts them on their own) are not counted;
* calls (``jit``, ``checkpoint``, custom derivatives, ``shard_map``) are
  inlined, as XLA inlines them; an equation with a body (``scan``,
  ``while``, ``cond``) adds the body's own peak while it runs: a scanned stack's layer-sized working set, not ``num_layers``
  times it, with the stacked outputs (a scan's residuals) allocated whole;
* ``pallas_call`` kernels count their outputs only (their scratch is VMEM);
* an elementwise op, a scatter or an update whose operand dies there writes
  its output over that operand (XLA's buffer reuse); an elementwise value read
  once (or a cheap one: a cast, a broadcast, a select) by ordinary ops is
  fused into its readers and takes no memory, but keeps its operands alive
  until they run (XLA's loop fusion);
* a scatter-add of one value per row into a filled buffer (the gradient of
  ``take_along_axis``: the target logit of a cross-entropy) is fusible too:
  XLA rewrites it as a select over an iota compare (a one-hot), so no
  ``[B, L, vocab]`` buffer is written for it;
* an input of the program (or of a loop body) that a caller's
  ``gathered_of(aval, local)`` says is gathered before use (an FSDP-sharded
  weight: XLA all-gathers it for the matmul that reads it) holds its gathered
  bytes from its first use to its last; a weight that is only cast is
  gathered after the cast (the cast's output is sized by ``size_of``).

Sizes per device come from a caller's ``size_of(aval, local)`` (``local``:
the shapes inside a ``shard_map`` body, already per device). What it does
not model: the rest of XLA's fusion (reductions, multi-output fusions), its
rescheduling, collective buffers.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable

#: Equations that run their body many times.
_LOOPS = frozenset(("scan", "while"))
#: Equations whose bodies are kernels: only their outputs count.
_OPAQUE = ("pallas_call",)
#: Equations whose output XLA writes into an operand that dies there (elementwise
#: ops fused or done in place, scatters and updates into their operand): a dying
#: operand of the output's size is reused, not kept beside it.
_IN_PLACE = frozenset((
    "add", "add_any", "sub", "mul", "div", "max", "min", "neg", "exp", "exp2", "log", "log1p",
    "tanh", "logistic", "rsqrt", "sqrt", "integer_pow", "pow", "abs", "sign", "square",
    "convert_element_type", "select_n", "and", "or", "not", "xor", "eq", "ne", "lt", "le",
    "gt", "ge", "erf", "sin", "cos", "copy", "copy_p", "stop_gradient", "reshape", "squeeze",
    "expand_dims", "scatter-add", "scatter_add", "scatter", "dynamic_update_slice", "clamp",
    "erf_inv", "nextafter", "rem", "floor", "ceil", "round", "is_finite", "optimization_barrier",
))


#: Elementwise producers XLA fuses into their consumers (recomputed there, never
#: materialised): cheap ones whatever the consumers, the rest when read once.
_CHEAP = frozenset((
    "convert_element_type", "broadcast_in_dim", "iota", "reshape", "squeeze", "expand_dims",
    "select_n", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "add", "sub", "mul",
    "neg", "max", "min", "stop_gradient", "copy",
))
_FUSIBLE = _CHEAP | frozenset((
    "div", "exp", "exp2", "log", "log1p", "tanh", "logistic", "rsqrt", "sqrt", "integer_pow",
    "pow", "abs", "sign", "square", "erf", "sin", "cos", "clamp", "is_finite",
))
#: Consumers that need their operands materialised (calls, kernels, collectives, loops).
_MATERIALISES = frozenset((
    "pallas_call", "all_to_all", "ragged_all_to_all", "all_gather", "psum", "psum_scatter",
    "reduce_scatter", "ppermute", "custom_call",
))


#: Calls XLA inlines: their bodies are walked as part of the caller.
_INLINE = frozenset(("jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint",
                     "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"))


class _Var:
  """A variable of the inlined program: a jaxpr variable in one call of its jaxpr."""

  __slots__ = ("key", "aval", "local")

  def __init__(self, key: Any, aval: Any, local: bool):
    self.key, self.aval, self.local = key, aval, local

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, _Var) and self.key == other.key


class _Eqn:
  """An equation of the inlined program."""

  __slots__ = ("name", "invars", "outvars", "subs", "local")

  def __init__(self, name: str, invars: list, outvars: list, subs: list, local: bool):
    self.name, self.invars, self.outvars, self.subs = name, invars, outvars, subs
    self.local = local


def _sub_jaxprs(eqn: Any) -> list[Any]:
  """The jaxprs an equation runs (``cond``'s branches, a scan's body, ...)."""
  found = []
  for value in eqn.params.values():
    for sub in value if isinstance(value, (list, tuple)) else (value,):
      inner = getattr(sub, "jaxpr", sub)
      if hasattr(inner, "eqns"):
        found.append(inner)
  return found


def _is_var(v: Any) -> bool:
  return hasattr(v, "aval") and type(v).__name__ not in ("Literal", "DropVar")


def _inline(jaxpr: Any, env: dict, out: list, ids: itertools.count, local: bool) -> list:
  """Appends ``jaxpr``'s equations to ``out``, calls inlined; returns its outputs.

  A ``shard_map`` is inlined too (XLA compiles one SPMD program): its body's
  variables are marked ``local`` (per-device shapes).
  """
  cid = next(ids)

  def ref(v):
    if not _is_var(v):
      return None
    if v not in env:
      env[v] = _Var((cid, v), v.aval, local)
    return env[v]

  for eqn in jaxpr.eqns:
    subs = _sub_jaxprs(eqn)
    name = eqn.primitive.name
    if (name in _INLINE or name == "shard_map") and len(subs) == 1:
      inner_env = {iv: ref(ov) for iv, ov in zip(subs[0].invars, eqn.invars)
                   if ref(ov) is not None}
      results = _inline(subs[0], inner_env, out, ids, local or name == "shard_map")
      for ov, r in zip(eqn.outvars, results):
        if _is_var(ov) and r is not None:
          env[ov] = r
      continue
    out.append(_Eqn(name, [r for r in map(ref, eqn.invars) if r is not None],
                    [r for r in map(ref, eqn.outvars) if r is not None], subs, local))
  return [ref(v) for v in jaxpr.outvars]


def _one_hot_scatter(eqn: _Eqn, filled: set) -> bool:
  """A scatter-add of one update per row along one axis into a filled buffer."""
  if eqn.name not in ("scatter-add", "scatter_add") or len(eqn.invars) < 3:
    return False
  operand, updates = eqn.invars[0], eqn.invars[-1]
  shape, upd = tuple(operand.aval.shape), tuple(updates.aval.shape)
  if operand not in filled or not shape:
    return False
  size = math.prod(shape)
  return any(math.prod(upd) * n == size and n > 1 for n in shape)


def _virtual(eqns: list, results: set, consumers: dict) -> set:
  """Outputs of fusible equations that XLA would recompute in their consumers."""
  out = set()
  for eqn in eqns:
    one_hot = _one_hot_scatter(eqn, out)
    if (eqn.name not in _FUSIBLE and not one_hot) or len(eqn.outvars) != 1:
      continue
    v = eqn.outvars[0]
    users = consumers.get(v, [])
    if v in results or not users:
      continue
    if eqn.name in ("broadcast_in_dim", "iota") and all(not x.aval.shape for x in eqn.invars):
      out.add(v)  # a filled buffer (zeros): XLA sinks it into loops and fuses it into readers
      continue
    if any(u.name in _MATERIALISES or u.subs for u in users):
      continue
    if eqn.name in _CHEAP or len(users) == 1:
      out.add(v)
  return out


def _gathered_inputs(owned: set, consumers: dict, gathered_of: Callable | None) -> dict:
  """``{input: gathered bytes}`` for inputs read (not only cast) by the program."""
  if gathered_of is None:
    return {}
  found = {}
  for v in owned:
    users = consumers.get(v, [])
    if not users or all(u.name == "convert_element_type" for u in users):
      continue
    b = gathered_of(v.aval, v.local)
    if b:
      found[v] = b
  return found


def peak_bytes(jaxpr: Any, size_of: Callable[[Any, bool], float], *,
               local: bool = False, skip_outputs: bool = False,
               gathered_of: Callable[[Any, bool], float] | None = None) -> float:
  """The most bytes a jaxpr's intermediate arrays hold at once (inputs not counted).

  Args:
    jaxpr: a ``Jaxpr`` (or ``ClosedJaxpr``).
    size_of: bytes per device of an aval; ``local`` says whether it is a
      per-device shape (inside ``shard_map``).
    local: whether ``jaxpr`` is a ``shard_map`` body (or inside one).
    skip_outputs: leave the program's outputs uncounted (the gradients).
    gathered_of: bytes of the gathered copy XLA makes of an input (0: none),
      alive from the input's first use to its last (module doc).
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  eqns: list[_Eqn] = []
  env: dict = {}
  results = set(r for r in _inline(jaxpr, env, eqns, itertools.count(), local)
                if r is not None)
  owned = set(env[v] for v in (*jaxpr.invars, *jaxpr.constvars) if v in env)
  last_use: dict[Any, int] = {}
  consumers: dict[Any, list] = {}
  for i, eqn in enumerate(eqns):
    for v in eqn.invars:
      last_use[v] = i
      consumers.setdefault(v, []).append(eqn)
  for v in results:
    last_use[v] = len(eqns)
  virtual = _virtual(eqns, results, consumers)
  for eqn in reversed(eqns):  # a fused value keeps its operands alive in its stead
    if eqn.outvars and eqn.outvars[0] in virtual:
      for v in eqn.invars:
        last_use[v] = max(last_use[v], last_use[eqn.outvars[0]])
  skip = virtual | (results if skip_outputs else set()) | owned
  dies_at: dict[int, list] = {}
  for v, i in last_use.items():
    dies_at.setdefault(i, []).append(v)
  gathered = _gathered_inputs(owned, consumers, gathered_of)
  first_use = {}
  for v in gathered:
    first_use.setdefault(min(i for i, e in enumerate(eqns) if v in e.invars), []).append(v)
  size = lambda v: gathered.get(v, 0.0) if v in skip else size_of(v.aval, v.local)  # noqa: E731
  live = peak = 0.0
  for i, eqn in enumerate(eqns):
    live += sum(gathered[v] for v in first_use.get(i, ()))
    out_bytes = sum(size(v) for v in eqn.outvars)
    inner = 0.0
    if eqn.name not in _OPAQUE:
      inner = max((peak_bytes(sub, size_of, local=eqn.local, gathered_of=gathered_of)
                   for sub in eqn.subs), default=0.0)
    dying = dies_at.get(i, [])
    reused = 0.0
    if eqn.name in _IN_PLACE:
      free = sorted((size(v) for v in dying), reverse=True)
      for b in sorted((size(v) for v in eqn.outvars), reverse=True):
        if b in free:
          free.remove(b)
          reused += b
    # A call's outputs are its body's last values (already in ``inner``); a loop's
    # stacked outputs are written beside its body's working set.
    loop = eqn.name in _LOOPS
    peak = max(peak, live + (inner + out_bytes if loop else max(inner, out_bytes)) - reused)
    live += out_bytes - sum(size(v) for v in dying)
    for v in eqn.outvars:
      if v not in last_use:  # never read: freed at once
        live -= size(v)
  return max(peak, live)
