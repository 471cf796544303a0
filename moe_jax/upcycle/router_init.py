"""Router initialisation from prompts, as practitioners do with mergekit-moe ("hidden" gates).

Legend: L layers, E experts, D model dim, B batch, T tokens.

A fresh random router sends tokens to experts arbitrarily; when each expert
is known to be good at something (a domain branch of BTX/BAM, or an expert
meant to specialise), its router row can start as a *direction* in the
router's input space that points at that something. Per layer and expert::

    v_e = mean(router input over e's positive prompts)
          - mean(router input over e's negative prompts)     (if any)
    kernel[:, e] = scale * v_e / |v_e|

Means are over every real token of a prompt, then over prompts. mergekit
reads the raw residual stream; we read the *router's actual input* -- the
output of the norm in front of it (``input_norm`` for attention routers and
parallel blocks, ``post_attn_norm`` for the FFN of a sequential block) -- so
the directions live in the space the router's dot product is taken in.

Which dense model the states come from is the caller's choice; the CLI uses
the average of the dense inputs (for sparse upcycling, the model itself): it
is the trunk the merged model shares.

The logits a token gets are ``scale * |h| cos(h, v_e)`` with ``|h| ~ sqrt(D)``
after an RMS norm, so ``scale=1`` already gives confident routing at
``D >= 64``; lower it to start softer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.checkpoints.native import flatten, unflatten
from moe_jax.nn.norms import RMSNorm

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertPrompts:
  """Token-id prompts describing one expert: what it should get, and what it should not."""

  positive: tuple[tuple[int, ...], ...]
  negative: tuple[tuple[int, ...], ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "positive", tuple(tuple(int(t) for t in p) for p in self.positive))
    object.__setattr__(self, "negative", tuple(tuple(int(t) for t in p) for p in self.negative))
    if not self.positive:
      raise ValueError("ExpertPrompts needs at least one positive prompt")
    if any(len(p) == 0 for p in self.positive + self.negative):
      raise ValueError("ExpertPrompts: empty prompt")


@functools.lru_cache(maxsize=8)
def _per_prompt_means_fn(module: Any):
  """Jitted ``(params, tokens_BT, valid_BT) -> (attn_BLD, mlp_BLD)`` token-mean router inputs."""
  config = module.config
  ffn_norm = "input_norm" if config.parallel_block else "post_attn_norm"
  is_norm = lambda mdl, method: isinstance(mdl, RMSNorm) and method == "__call__"  # noqa: E731

  def means(p, tokens_BT, valid_BT):
    _, state = module.apply({"params": p}, tokens_BT, valid_BL=valid_BT,
                            capture_intermediates=is_norm, mutable=["intermediates"])
    inter = state["intermediates"]
    w_BT = valid_BT.astype(jnp.float32) / jnp.maximum(valid_BT.sum(1, keepdims=True), 1)

    def mean(norm):
      h_LBTD = jnp.stack([inter[f"layers_{i}"][norm]["__call__"][0]
                          for i in range(config.num_layers)]).astype(jnp.float32)
      return jnp.einsum("lbtd,bt->bld", h_LBTD, w_BT)

    return mean("input_norm"), mean(ffn_norm)

  return jax.jit(means)


def per_prompt_router_inputs(module: Any, params: Mapping, prompts: Sequence[Sequence[int]],
                             batch_size: int = 16) -> dict[str, np.ndarray]:
  """Token-mean router inputs of each prompt: ``{"attn": [P, L, D], "mlp": [P, L, D]}``.

  ``module`` is a dense decoder. Prompts run in right-padded batches of one
  shape (one compilation): ``batch_size`` rows, as long as the longest prompt.
  """
  from moe_jax.checkpoints.hf import unbox
  from moe_jax.checkpoints.layout import unrolled
  from moe_jax.decoding import pad_prompts

  if getattr(module.config, "scan_layers", False):  # read per-layer norms of an unrolled copy
    module = module.clone(config=module.config.replace(scan_layers=False))
  fn = _per_prompt_means_fn(module)
  p = unrolled(unbox(params))
  length = max(len(x) for x in prompts)
  outs: dict[str, list[np.ndarray]] = {"attn": [], "mlp": []}
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    n = len(chunk)
    chunk += [chunk[0]] * (batch_size - n)
    ids, valid = pad_prompts(chunk, side="right")
    ids = np.pad(ids, ((0, 0), (0, length - ids.shape[1])))
    valid = np.pad(valid, ((0, 0), (0, length - valid.shape[1])))
    attn_BLD, mlp_BLD = fn(p, jnp.asarray(ids), jnp.asarray(valid))
    outs["attn"].append(np.asarray(attn_BLD)[:n])
    outs["mlp"].append(np.asarray(mlp_BLD)[:n])
  return {k: np.concatenate(v) for k, v in outs.items()}


def router_input_means(module: Any, params: Mapping, prompts: Sequence[Sequence[int]]
                       ) -> dict[str, np.ndarray]:
  """Mean router inputs ``{"attn": [L, D], "mlp": [L, D]}`` of a dense decoder over prompts.

  Each prompt contributes the mean over its tokens; prompts are weighted equally.
  """
  return {k: v.mean(axis=0) for k, v in per_prompt_router_inputs(module, params, prompts).items()}


def prompt_router_vectors(module: Any, params: Mapping, experts: Sequence[ExpertPrompts]
                          ) -> dict[str, np.ndarray]:
  """Unit router directions ``{"attn": [L, E, D], "mlp": [L, E, D]}`` (module docstring)."""
  prompts = [p for ex in experts for p in ex.positive + ex.negative]
  per_prompt = per_prompt_router_inputs(module, params, prompts)
  out: dict[str, list[np.ndarray]] = {"attn": [], "mlp": []}
  start = 0
  for e, ex in enumerate(experts):
    npos, nneg = len(ex.positive), len(ex.negative)
    for key in out:
      h_PLD = per_prompt[key][start:start + npos + nneg]
      v_LD = h_PLD[:npos].mean(axis=0)
      if nneg:
        v_LD = v_LD - h_PLD[npos:].mean(axis=0)
      norm_L1 = np.linalg.norm(v_LD, axis=-1, keepdims=True)
      if np.any(norm_L1 == 0):
        raise ValueError(f"expert {e}: its positive and negative prompts give the same mean "
                         f"router input; no routing direction")
      out[key].append(v_LD / norm_L1)
    start += npos + nneg
  return {k: np.stack(v, axis=1).astype(np.float32) for k, v in out.items()}


def init_routers_from_vectors(params: Mapping, vectors: Mapping[str, np.ndarray], *,
                              scale: float = 1.0) -> dict:
  """Sets every ``layers_i/{mlp,attn}/router/kernel [D, E]`` to ``scale * vectors[.][i].T``.

  Routers absent from ``params`` are skipped (dense layers, BTX's attention);
  a router whose E differs from the vectors' is an error naming it. Scanned
  ``params`` come back scanned.
  """
  from moe_jax.checkpoints.hf import unbox
  from moe_jax.checkpoints.layout import match_layout, unrolled

  original = unbox(params)
  flat = flatten(unrolled(original))
  for key, v_LED in vectors.items():
    for i in range(v_LED.shape[0]):
      name = f"layers_{i}/{key}/router/kernel"
      if name not in flat:
        continue
      want = flat[name].shape
      kernel = scale * v_LED[i].T
      if kernel.shape != want:
        raise ValueError(f"router {name!r} has shape {want}, the prompt vectors give "
                         f"{kernel.shape} ({v_LED.shape[1]} experts)")
      flat[name] = kernel.astype(flat[name].dtype)
  return match_layout(unflatten(flat), original)
