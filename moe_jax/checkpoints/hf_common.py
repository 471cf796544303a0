"""Shared machinery of the Hugging Face converters: the converter contract and tensor checks.

A converter maps one HF ``model_type`` to one of our models:

* ``config_from_hf(hf_config: dict) -> config`` and ``config_to_hf(config) -> dict``;
* ``params_from_hf(get: TensorGetter, config) -> params`` (nested dict of NumPy
  arrays, exactly the tree our module's ``init`` produces, unboxed);
* ``params_to_hf(params, config) -> dict[str, np.ndarray]`` (HF names/layouts);
* ``module(config) -> flax module``;
* ``config_type``: the config dataclass it exports.

Converters never read files; :mod:`moe_jax.checkpoints.hf` does the I/O and
hands them a :class:`TensorGetter`, which checks names and shapes so every
converter reports a missing or mis-shaped tensor the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol

import numpy as np


class CheckpointError(ValueError):
  """A checkpoint cannot be read or does not fit the model; the message names the culprit."""


class TensorGetter:
  """Reads named tensors from a checkpoint, checking presence and shape.

  ``get(name, shape)`` returns a float32-or-native NumPy array; ``used`` lists
  the names read so far so the loader can report unexpected leftovers.
  """

  def __init__(self, read: Callable[[str], np.ndarray], names: set[str], source: str):
    self._read = read
    self.names = names
    self.source = source
    self.used: set[str] = set()

  def has(self, name: str) -> bool:
    return name in self.names

  def get(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if name not in self.names:
      raise CheckpointError(f"{self.source}: missing tensor {name!r}")
    array = self._read(name)
    if shape is not None and tuple(array.shape) != tuple(shape):
      raise CheckpointError(
          f"{self.source}: tensor {name!r} has shape {tuple(array.shape)}, "
          f"expected {tuple(shape)}")
    self.used.add(name)
    return array


class Converter(Protocol):
  model_types: tuple[str, ...]
  config_type: type

  def config_from_hf(self, hf_config: Mapping[str, Any]) -> Any: ...
  def config_to_hf(self, config: Any) -> dict[str, Any]: ...
  def params_from_hf(self, get: TensorGetter, config: Any) -> dict: ...
  def params_to_hf(self, params: Mapping, config: Any) -> dict[str, np.ndarray]: ...
  def module(self, config: Any) -> Any: ...


def require(hf_config: Mapping[str, Any], key: str, source: str = "config.json") -> Any:
  if key not in hf_config:
    raise CheckpointError(f"{source}: missing required field {key!r}")
  return hf_config[key]


def config_to_json_dict(config: Any) -> dict[str, Any]:
  """Our dataclass config as plain JSON data (nested dataclasses become dicts)."""
  return dataclasses.asdict(config)


def refuse_export(config: Any, architecture: str, why: list[str]) -> None:
  """Raises :class:`CheckpointError` listing ``why`` ``config`` is no ``architecture``.

  Nothing happens when ``why`` is empty. Export checks before it writes, so a
  refused config leaves nothing on disk.
  """
  if why:
    raise CheckpointError(f"{type(config).__name__} cannot be exported as {architecture}: "
                          + "; ".join(why) + ". Save it as a moe-jax checkpoint "
                          "(moe_jax.checkpoints.save_model) instead")


def moe_decoder_incompatibilities(c: Any, arch: str, *, bias: str | None,
                                  features: Mapping[str, tuple[str, Callable[[Any], bool]]]
                                  ) -> list[str]:
  """The reasons an HF MoE decoder (Mixtral, Qwen-MoE / OLMoE, DeepSeek-V3) cannot express ``c``.

  Each of those is a sequential, dense-attention, SwiGLU decoder whose tokens
  choose their top-k experts; the family's own checks (MoE layout, shared
  expert, q/k norms...) follow these in its converter.

  Args:
    c: a ``MoeDecoderConfig`` (or subclass).
    arch: the family's name in the messages (``"Mixtral"``, ``"Qwen2-MoE"``...).
    bias: the attention biases the family has: ``"none"``, ``"qkv"`` (on q/k/v,
      none on the output: Qwen2-MoE), ``"one"`` (one ``attention_bias`` for all
      four projections) or ``None`` (its own config field says; not checked here).
    features: the ``hf_llama._FEATURES`` entries the family lacks, as
      ``name -> (description, test)``.

  Returns:
    one phrase per incompatibility, each naming the offending field or feature.
  """
  why = []
  if getattr(c, "attention", None) is not None:
    why.append(f"it has attention experts (BAM's mixture of attention); {arch}'s attention is "
               "a single dense attention per layer")
  if c.parallel_block:
    why.append(f"it uses parallel attention/FFN blocks (parallel_block); {arch}'s blocks are "
               "sequential")
  if bias == "none" and (c.qkv_bias or c.attn_out_bias):
    why.append(f"its attention has biases (qkv_bias={c.qkv_bias}, "
               f"attn_out_bias={c.attn_out_bias}); {arch}'s has none")
  elif bias == "qkv" and c.attn_out_bias:
    why.append(f"its attention output has a bias (attn_out_bias); {arch}'s has none")
  elif bias == "one" and c.qkv_bias != c.attn_out_bias:
    why.append(f"its attention biases (qkv_bias={c.qkv_bias}, attn_out_bias="
               f"{c.attn_out_bias}) do not fit {arch}'s one attention_bias")
  extra = [desc for desc, test in features.values() if test(c)]
  if extra:  # Gemma norms, soft-caps, sliding windows...
    why.append(f"it has {', '.join(extra)}; {arch} has none")
  if c.activation != "silu":
    why.append(f"its FFN activation is {c.activation!r}; {arch}'s experts are SwiGLU ('silu')")
  if c.moe.router != "tokens_choose":
    why.append(f"its router is {c.moe.router!r}; {arch}'s tokens choose their top-k experts")
  return why
