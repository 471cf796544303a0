"""Shared parameter surgery: flat trees, input checks, averaging, stacking, fresh routers.

Every surgery works on flat ``{"layers_0/attn/q/kernel": np.ndarray}`` dicts
(``moe_jax.checkpoints.native.flatten``) in NumPy, on the host: it runs once,
before training, on checkpoints that may not fit one accelerator, and NumPy
keeps it exactly reproducible against the reference implementations in the
tests. Averages are computed in float32 (float64 would change nothing
visible and doubles host memory) and cast back to each tensor's dtype.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np

from moe_jax.checkpoints.hf_common import CheckpointError
from moe_jax.checkpoints.native import flatten, unflatten
from moe_jax.models.decoder import DecoderConfig
from moe_jax.moe.layer import MoeConfig

__all__ = ["ATTENTION_TENSOR", "FFN_TENSOR", "UpcycleError", "assemble", "average",
           "check_against_model", "check_compatible", "dense_fields", "flat_params", "load_inputs",
           "random_router_kernel", "stack", "upcycled_moe_config"]

# Config fields that do not change the function of a dense model; they may
# differ among the inputs (the first input's value is kept).
NON_ARCHITECTURE_FIELDS = ("dtype", "param_dtype", "max_seq_len", "pad_token_id",
                           "bos_token_id", "eos_token_id", "hf_model_type", "remat_policy",
                           "scan_layers")


class UpcycleError(CheckpointError):
  """The dense inputs cannot be combined (mismatched architectures or tensors)."""


def flat_params(params: Mapping) -> dict[str, np.ndarray]:
  """``{"a/b/c": np.ndarray}`` of an (unboxed) parameter tree."""
  from moe_jax.checkpoints.hf import unbox
  from moe_jax.checkpoints.layout import unrolled

  return flatten(unrolled(unbox(params)))  # surgery reads layers_{i}, whatever the layout


def check_compatible(configs: Sequence[DecoderConfig], params: Sequence[Mapping[str, Any]],
                     names: Sequence[str] | None = None) -> None:
  """Raises :class:`UpcycleError` unless all inputs share one architecture.

  Tensors are compared first (so a mismatch names the tensor and both
  shapes), then the config fields that carry no tensor (RoPE, norm epsilon,
  activation, ...).

  Args:
    configs: the dense models' configs.
    params: their flat parameter dicts.
    names: how to call each input in messages (e.g. its directory).
  """
  if not configs:
    raise UpcycleError("no dense models to upcycle")
  if len(configs) != len(params):
    raise ValueError(f"{len(configs)} configs but {len(params)} parameter trees")
  names = list(names) if names is not None else [f"input {i}" for i in range(len(configs))]
  for i, c in enumerate(configs):
    if type(c) is not DecoderConfig:
      raise UpcycleError(f"{names[i]}: upcycling needs dense decoders (DecoderConfig), got "
                         f"{type(c).__name__}")
  ref = params[0]
  for i, p in enumerate(params[1:], start=1):
    missing = sorted(set(ref) - set(p))
    extra = sorted(set(p) - set(ref))
    if missing or extra:
      what = (f"lacks tensor {missing[0]!r} that {names[0]} has" if missing
              else f"has tensor {extra[0]!r} that {names[0]} lacks")
      raise UpcycleError(f"{names[i]} {what}: the inputs must share one architecture")
    for key in ref:
      a, b = np.shape(ref[key]), np.shape(p[key])
      if a != b:
        raise UpcycleError(f"tensor {key!r} has shape {a} in {names[0]} but {b} in {names[i]}: "
                           "the inputs must share one architecture")
  for i, c in enumerate(configs[1:], start=1):
    for f in dataclasses.fields(DecoderConfig):
      if f.name in NON_ARCHITECTURE_FIELDS:
        continue
      a, b = getattr(configs[0], f.name), getattr(c, f.name)
      if a != b:
        raise UpcycleError(f"config field {f.name!r} is {a!r} in {names[0]} but {b!r} in "
                           f"{names[i]}: the inputs must share one architecture")


def average(arrays: Sequence[np.ndarray]) -> np.ndarray:
  """Element-wise mean in float32, cast back to the first array's dtype."""
  first = np.asarray(arrays[0])
  acc = np.zeros(first.shape, np.float32)
  for a in arrays:
    acc += np.asarray(a, np.float32)
  return (acc / len(arrays)).astype(first.dtype)


def stack(arrays: Sequence[np.ndarray]) -> np.ndarray:
  """Stacks per-expert tensors on a new leading expert axis."""
  return np.stack([np.asarray(a) for a in arrays])


def random_router_kernel(rng: np.random.Generator, d_model: int, num_experts: int,
                         scale: float = 0.1) -> np.ndarray:
  """Fresh ``[D, E]`` router kernel, float32, like ``moe_jax.moe.layer.RouterKernel``.

  Normal with variance ``scale / D`` (Switch: a tenth of the fan-in scale), so
  routing starts near uniform: with every gate close to 1/E the balancing
  loss can act before the softmax saturates.
  """
  std = np.sqrt(scale / d_model)
  return (rng.standard_normal((d_model, num_experts)) * std).astype(np.float32)


def upcycled_moe_config(num_experts: int, num_selected: int, *, renormalize: bool = True,
                        capacity_factor: float | None = None, **overrides: Any) -> MoeConfig:
  """The ``MoeConfig`` of an upcycled model.

  Defaults chosen for upcycling, where the model must start as good as its
  dense parents:

  * ``renormalize=True``: the kept gates of a token sum to one, so identical
    experts reproduce the dense FFN whatever the router (and it is Mixtral's
    gate, so the model exports). With top-1 this makes every gate 1 and the
    router learns only from the auxiliary losses (and its initialisation, e.g.
    from prompts); ``renormalize=False`` gives Switch gates, which train the
    router through the LM loss but scale the FFN by its gate (about 1/E with
    a fresh router), so the model no longer starts at its parents' quality.
  * ``capacity_factor=None`` (dropless): no token loses its FFN at the start;
    set 1.25 to trade exactness for fixed-size expert buffers.
  """
  return MoeConfig(num_experts=num_experts, num_selected=num_selected,
                   renormalize=renormalize, capacity_factor=capacity_factor, **overrides)


def check_against_model(config: Any, params: Mapping[str, Any], what: str) -> dict:
  """Returns ``params`` as a tree after checking it matches ``config``'s model exactly.

  A surgery bug (a missing router, a mis-stacked expert) surfaces here as an
  error naming the tensor rather than as a shape error deep inside ``apply``.
  ``params`` are unrolled (``layers_{i}``); a scanned ``config`` gets them stacked.
  """
  from moe_jax.checkpoints.layout import match_layout
  from moe_jax.models import registry

  kind = registry.kind_of(config)
  if getattr(config, "scan_layers", False):
    scanned = registry.param_shapes(registry.build_module(config, kind), kind)
    tree = check_against_model(dataclasses.replace(config, scan_layers=False), params, what)
    return match_layout(tree, scanned)
  want = flatten(registry.param_shapes(registry.build_module(config, kind), kind),
                 leaf=lambda s: tuple(s.shape))
  missing = sorted(set(want) - set(params))
  extra = sorted(set(params) - set(want))
  if missing or extra:
    raise AssertionError(f"{what}: parameter tree does not match {type(config).__name__}: "
                         f"missing {missing[:4]}, unexpected {extra[:4]}")
  for name, shape in want.items():
    if tuple(np.shape(params[name])) != shape:
      raise AssertionError(f"{what}: tensor {name!r} has shape {np.shape(params[name])}, "
                           f"the model expects {shape}")
  return unflatten(dict(params))


FFN_TENSOR = re.compile(r"^layers_(\d+)/mlp/(wi_0|wi_1|wi|wo)/(kernel|bias)$")
ATTENTION_TENSOR = re.compile(r"^layers_(\d+)/attn/(q|k|v|o)/(kernel|bias)$")


def assemble(trunks: Sequence[Mapping[str, np.ndarray]],
             experts: Sequence[Mapping[str, np.ndarray]], *, moe_layers: Sequence[int],
             attention_experts: bool = False, shared_kv: bool = False) -> dict[str, np.ndarray]:
  """The flat MoE parameters (without routers) from dense inputs.

  Args:
    trunks: flat dense parameters averaged into every non-expert tensor (one
      input: copied).
    experts: flat dense parameters, one per expert, whose FFN (and, with
      ``attention_experts``, attention) tensors of the MoE layers are stacked.
    moe_layers: the layers whose FFN becomes routed experts.
    attention_experts: BAM: stack the attention projections of the MoE layers
      too (``q/k/v/o``; with ``shared_kv`` the k and v are averaged instead).
    shared_kv: see ``attention_experts``.

  Returns:
    ``{name: array}`` with ``layers_i/mlp/experts/<proj>/kernel [E, ...]`` in
    the MoE layers and the dense names everywhere else.
  """
  moe_layers = set(moe_layers)
  out: dict[str, np.ndarray] = {}
  for name in trunks[0]:
    ffn, attn = FFN_TENSOR.match(name), ATTENTION_TENSOR.match(name)
    if ffn and int(ffn.group(1)) in moe_layers:
      layer, proj, kind = ffn.groups()
      if kind == "bias":
        raise UpcycleError(f"tensor {name!r}: routed experts hold no FFN biases")
      out[f"layers_{layer}/mlp/experts/{proj}/kernel"] = stack([e[name] for e in experts])
    elif (attention_experts and attn and int(attn.group(1)) in moe_layers
          and not (shared_kv and attn.group(2) in ("k", "v"))):
      out[name] = stack([e[name] for e in experts])
    elif len(trunks) == 1:
      out[name] = np.asarray(trunks[0][name])
    else:
      out[name] = average([t[name] for t in trunks])
  return out


def dense_fields(config: DecoderConfig) -> dict[str, Any]:
  """The ``DecoderConfig`` fields of ``config``, to build an MoE/BAM config on top."""
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(DecoderConfig)}


def load_inputs(configs: Sequence[DecoderConfig], params: Sequence[Mapping],
                names: Sequence[str] | None) -> list[dict[str, np.ndarray]]:
  """Flat parameters of every input, after :func:`check_compatible`."""
  flats = [flat_params(p) for p in params]
  check_compatible(configs, flats, names)
  return flats
