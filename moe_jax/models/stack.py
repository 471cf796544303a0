"""Block stacks of every model family: per-block rematerialisation, unrolled or scanned layers.

Legend: N layers, P period (blocks per scan step), B batch, L length, D model dim.

Two config fields choose how a family runs its stack of blocks (dense, MoE
and BAM decoders, T5's encoder and decoder, CALM's frozen LMs all go through
:func:`make_blocks` / :func:`run_scanned`):

* ``remat_policy`` (:data:`REMAT_POLICIES`): every block is wrapped in
  ``nn.remat`` with a ``jax.checkpoint_policies`` policy, so the backward
  pass recomputes what the policy does not save. ``"none"`` (default) keeps
  the plain block. ``"full"`` saves only the block inputs (least memory, one
  extra forward); ``"dots_no_batch"`` saves matmul outputs without batch
  dimensions (weights-only products, cheap to keep); ``"dots"`` every matmul
  output; ``"sublayer_outputs"`` the outputs of each attention and FFN / MoE
  layer (named with :func:`jax.ad_checkpoint.checkpoint_name` in the blocks:
  :data:`CHECKPOINT_NAMES`), so recomputation never crosses a sublayer
  boundary and an MoE's all-to-all is not replayed;
  ``"dots_no_batch_and_sublayer_outputs"`` the union of the two. Remat never
  changes values: gradients equal the plain ones (float32).
* ``scan_layers``: the stack runs as one ``nn.scan`` over the layers instead
  of N unrolled calls, so compile time does not grow with depth. Parameters
  (and every other variable: sown aux losses, adapters) are stacked along a
  leading ``layers`` logical axis under one ``layers`` subtree, instead of
  ``layers_0 .. layers_{N-1}``. Layers that differ in structure (MoE only
  every other layer, Gemma's local / global attention with its own RoPE
  base) scan a *period* of P blocks per step, the smallest P dividing N for
  which ``layer_kind(i)`` repeats; the scanned tree is then
  ``layers/block_0 .. layers/block_{P-1}``, each with a leading axis N/P
  (layer ``i`` is ``block_{i % P}`` at index ``i // P``). A stack with no
  shorter period scans one step of N blocks (correct, but no faster to
  compile). :mod:`moe_jax.checkpoints.layout` converts between the layouts.

A block learns its layer index from its ``layer`` field (scanned blocks get
the index of their first occurrence: the period makes every per-layer
decision the same for all of its occurrences) or, unrolled, from its
``layers_{i}`` name.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name as _checkpoint_name
import jax.numpy as jnp

Array = jax.Array

#: The activations blocks name with ``checkpoint_name`` (saved by ``sublayer_outputs``).
CHECKPOINT_NAMES = ("attn_out", "cross_attn_out", "ffn_out")


def _policies() -> dict[str, Callable[..., bool] | None]:
  cp = jax.checkpoint_policies
  names = cp.save_only_these_names(*CHECKPOINT_NAMES)
  return {
      "full": cp.nothing_saveable,
      "dots": cp.checkpoint_dots,
      "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
      "sublayer_outputs": names,
      "dots_no_batch_and_sublayer_outputs": cp.save_from_both_policies(
          cp.dots_with_no_batch_dims_saveable, names),
  }


#: Remat policy names accepted by the model configs' ``remat_policy``.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "sublayer_outputs",
                  "dots_no_batch_and_sublayer_outputs")


def check_remat_policy(name: str, owner: str) -> None:
  """Raises ``ValueError`` naming ``owner`` for an unknown policy name."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"{owner}.remat_policy={name!r} is not a remat policy; use one of "
                     f"{list(REMAT_POLICIES)}")


def checkpoint_name(x: Array, name: str) -> Array:
  """Names ``x`` for the remat policies (identity on values)."""
  return _checkpoint_name(x, name)


def remat_block(block_cls: type, policy: str) -> type:
  """``block_cls`` wrapped in ``nn.remat`` with the named policy (itself for ``"none"``)."""
  check_remat_policy(policy, "config")
  if policy == "none":
    return block_cls
  return nn.remat(block_cls, policy=_policies()[policy], prevent_cse=True)


def find_period(kinds: Sequence[Hashable]) -> int:
  """The smallest ``P`` dividing ``len(kinds)`` with ``kinds[i] == kinds[i % P]``."""
  n = len(kinds)
  for p in range(1, n + 1):
    if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
      return p
  return n


def block_kwargs(block_cls: type, config: Any, layer: int, shared: dict, layer_in: dict
                 ) -> dict:
  """Call keywords of a block: its family's ``stack_kwargs`` or ``shared | layer_in``."""
  hook = getattr(block_cls, "stack_kwargs", None)
  if hook is not None:
    return hook(config, layer, shared, layer_in)
  return {**shared, **layer_in}


def _split(out) -> tuple[Array, Any]:
  return (out[0], out[1]) if isinstance(out, tuple) else (out, None)


class ScanPeriod(nn.Module):
  """One scan step: the P blocks of one repetition of the stack's pattern.

  ``__call__(x, layer_in, shared) -> (x, (extras, hidden))`` where
  ``layer_in[j]`` are block ``j``'s per-layer keywords (scanned: a KV cache),
  ``shared`` the keywords every layer sees (broadcast: masks, positions),
  ``extras[j]`` block ``j``'s second output (its new cache, or ``None``) and
  ``hidden[j]`` its output hidden state (stacked over the steps; dropped by
  XLA's dead-code elimination when nobody reads it).
  """

  block_cls: Any
  config: Any
  layers: tuple[int, ...]

  def setup(self):
    blocks = [self.block_cls(config=self.config, layer=layer, name=f"block_{j}")
              for j, layer in enumerate(self.layers)]
    if len(blocks) == 1:  # P = 1: the block's parameters sit directly under ``layers``
      nn.share_scope(self, blocks[0])
    self.blocks = blocks

  def __call__(self, x, layer_in: tuple[dict, ...], shared: dict):
    extras, hidden = [], []
    for j, (block, layer) in enumerate(zip(self.blocks, self.layers)):
      x, extra = _split(block(x, **block_kwargs(type(block), self.config, layer, shared,
                                                  layer_in[j])))
      extras.append(extra)
      hidden.append(x)
    return x, (tuple(extras), tuple(hidden))

  def call_side(self, carry, layer_in: tuple[dict, ...], args: tuple):
    """Calls every block's ``stack_side(*args)`` (a per-layer side computation, e.g.
    T5's cross-attention keys / values); the carry passes through."""
    del layer_in
    return carry, tuple(block.stack_side(*args) for block in self.blocks)


def make_blocks(block_cls: type, config: Any, num_layers: int, *, scan: bool,
                remat_policy: str, kinds: Sequence[Hashable] | None = None) -> Any:
  """The blocks of a stack, to assign in a parent's ``setup``.

  Unrolled: a list of ``block_cls`` named ``layers_{i}`` (today's tree).
  Scanned: one ``nn.scan`` of :class:`ScanPeriod` named ``layers``.

  Args:
    block_cls: the block class (a ``config`` and a ``layer`` field).
    config: its config.
    num_layers: N.
    scan: scan the stack.
    remat_policy: a :data:`REMAT_POLICIES` name, applied per block.
    kinds: per layer, anything that must be equal for layers to share a
      scanned block (default: all layers alike).
  """
  block_cls = remat_block(block_cls, remat_policy)
  if not scan:
    return [block_cls(config=config, name=f"layers_{i}") for i in range(num_layers)]
  period = find_period(list(kinds) if kinds is not None else [0] * num_layers)
  scanned = nn.scan(ScanPeriod, variable_axes={True: 0}, split_rngs={True: True},
                    in_axes=(0, nn.broadcast), length=num_layers // period,
                    metadata_params={nn.PARTITION_NAME: "layers"},
                    methods=["__call__", "call_side"])
  return scanned(block_cls=block_cls, config=config, layers=tuple(range(period)),
                 name="layers")


def period_of(blocks: Any) -> int:
  """P of a scanned stack from :func:`make_blocks`."""
  return len(blocks.layers)


def run_scanned(blocks: Any, x: Array, layer_in: tuple[dict, ...] | None, shared: dict
                ) -> tuple[Array, tuple, list[Array]]:
  """Runs a scanned stack: ``(x, extras, hidden)``.

  ``layer_in[j]`` holds block ``j``'s per-layer inputs stacked along a
  leading N/P axis (``None``: none). ``extras[j]`` is block ``j``'s stacked
  second output; ``hidden`` lists the N per-layer hidden states in layer
  order.
  """
  p = period_of(blocks)
  if layer_in is None:
    layer_in = tuple({} for _ in range(p))
  x, (extras, hidden) = blocks(x, layer_in, shared)
  n = hidden[0].shape[0] * p
  return x, extras, [hidden[i % p][i // p] for i in range(n)]


def stack_leading(trees: Sequence[Any]) -> Any:
  """Stacks equally shaped pytrees along a new leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def layer_slice(tree: Any, index: int) -> Any:
  """Entry ``index`` along the leading axis of every leaf."""
  return jax.tree.map(lambda x: x[index], tree)
