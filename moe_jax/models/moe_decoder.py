"""Llama-family decoder whose FFNs are routed mixtures of experts at chosen layers.

Legend: B batch, L length, D model dim, F ffn dim, E experts.

``MoeDecoder(config=MoeDecoderConfig(..., moe=MoeConfig(num_experts=8)))`` is
the dense ``Decoder`` with ``MoeDecoderBlock`` blocks: attention, norms and
embeddings keep their names and shapes, so a dense checkpoint restores into
everything but the MoE layers' ``mlp`` subtree, whose ``experts`` kernels are
the dense ``Mlp`` kernels stacked over E (``moe_jax.moe.upcycle_dense_params``)
and whose ``router`` is new.

Which layers are MoE (``moe_layout``):

* ``"every"``: all layers;
* ``"every_other"``: layers 1, 3, 5, ... (GShard / Switch: dense first);
* a tuple of layer indices, e.g. ``(3, 7)``.

The block learns its index from its ``layer`` field (a scanned stack) or its
name (``layers_{i}``, given by ``Decoder.setup`` to an unrolled stack). A
scanned MoE decoder (``scan_layers``) scans the period of ``moe_layout``:
one block for ``"every"``, a dense and an MoE block for ``"every_other"``.

Auxiliary losses and router metrics are sown by each MoE layer (see
``moe_jax.moe.layer``): ``apply(..., mutable=["aux_loss", "moe_metrics"])``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import flax.linen as nn

from moe_jax.models.decoder import Decoder, DecoderBlock, DecoderConfig
from moe_jax.moe.layer import MoeConfig, MoeLayer

LAYOUTS = ("every", "every_other")


def moe_layer_indices(layout: str | Sequence[int], num_layers: int) -> tuple[int, ...]:
  """Indices of the MoE layers for ``layout`` in a ``num_layers``-layer stack."""
  if isinstance(layout, str):
    if layout == "every":
      return tuple(range(num_layers))
    if layout == "every_other":
      return tuple(range(1, num_layers, 2))
    raise ValueError(f"unknown moe_layout {layout!r}; use one of {LAYOUTS} or a tuple of "
                     "layer indices")
  idx = tuple(int(i) for i in layout)
  bad = [i for i in idx if not 0 <= i < num_layers]
  if bad:
    raise ValueError(f"moe_layout names layers {bad} outside [0, {num_layers})")
  if len(set(idx)) != len(idx):
    raise ValueError(f"moe_layout repeats layers: {idx}")
  return tuple(sorted(idx))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoeDecoderConfig(DecoderConfig):
  """``DecoderConfig`` plus the routed experts and where they go.

  Attributes:
    moe: routing, capacity, dispatch and expert settings of every MoE layer.
    moe_layout: ``"every"``, ``"every_other"`` or a tuple of layer indices.
  """

  moe: MoeConfig
  moe_layout: str | tuple[int, ...] = "every"

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.moe_layout, str):
      object.__setattr__(self, "moe_layout", tuple(self.moe_layout))
    moe_layer_indices(self.moe_layout, self.num_layers)  # validates

  @property
  def moe_layers(self) -> tuple[int, ...]:
    return moe_layer_indices(self.moe_layout, self.num_layers)

  def layer_kind(self, i: int) -> tuple:
    return super().layer_kind(i) + (i in self.moe_layers,)


_LAYER_NAME = re.compile(r"^layers_(\d+)$")


class MoeDecoderBlock(DecoderBlock):
  """``DecoderBlock`` whose FFN is a ``MoeLayer`` when its index is in the layout."""

  @property
  def layer_index(self) -> int:
    if self.layer is not None:
      return self.layer
    m = _LAYER_NAME.match(self.name or "")
    if m is None:
      raise ValueError(f"MoeDecoderBlock needs the name 'layers_<i>' (as Decoder gives it) to "
                       f"know its layer index; got {self.name!r}")
    return int(m.group(1))

  def make_ffn(self) -> nn.Module:
    c = self.config
    if not isinstance(c, MoeDecoderConfig):
      raise TypeError(f"MoeDecoderBlock needs a MoeDecoderConfig, got {type(c).__name__}")
    if self.layer_index not in c.moe_layers:
      return super().make_ffn()
    return MoeLayer(config=c.moe, hidden_dim=c.moe.expert_dim or c.d_ff,
                    activation=c.activation, gated=True, dtype=c.dtype,
                    param_dtype=c.param_dtype)


class MoeDecoder(Decoder):
  """``Decoder`` built from ``MoeDecoderBlock`` (takes a ``MoeDecoderConfig``)."""

  block_cls: type[DecoderBlock] = MoeDecoderBlock
