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
