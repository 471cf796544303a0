"""Our own model checkpoints: ``model_config.json`` + ``params.safetensors``.

The config travels with the weights (``{"kind", "config", "format_version"}``)
so a directory alone rebuilds the model, whatever family it is (see
:mod:`moe_jax.models.registry`). Parameters are stored flat, with ``/``-joined
tree paths as tensor names, in their own dtype (bfloat16 stays bfloat16).
Writes are atomic (temp dir + rename).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from moe_jax.checkpoints.hf_common import CheckpointError
from moe_jax.checkpoints.io import atomic_directory, open_safetensors, read_json, write_json
from moe_jax.models import registry

CONFIG_FILE = "model_config.json"
PARAMS_STEM = "params"
FORMAT_VERSION = 1


def flatten(tree: Mapping, prefix: str = "", leaf=np.asarray) -> dict[str, Any]:
  """``{"a/b/c": leaf(x)}`` for a nested mapping."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(flatten(value, name, leaf))
    else:
      out[name] = leaf(value)
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def is_native_checkpoint(path: str | os.PathLike) -> bool:
  return (Path(path) / CONFIG_FILE).exists()


def save_model(path: str | os.PathLike, config: Any, params: Mapping, *,
               extra_files: Mapping[str, bytes] | None = None,
               metadata: Mapping[str, Any] | None = None) -> Path:
  """Writes config + parameters atomically; returns the directory."""
  from safetensors.numpy import save_file

  from moe_jax.checkpoints.hf import unbox

  kind = registry.kind_of(config)
  with atomic_directory(path) as tmp:
    write_json(tmp / CONFIG_FILE, {"format_version": FORMAT_VERSION, "kind": kind,
                                   "config": registry.config_to_dict(config),
                                   **({"metadata": dict(metadata)} if metadata else {})})
    # C order: safetensors.numpy writes a transposed (Fortran-ordered) array's raw buffer,
    # i.e. the transpose of its values (an imported HF kernel is a ``.T`` view).
    save_file(flatten(unbox(params), leaf=np.ascontiguousarray),
              str(tmp / f"{PARAMS_STEM}.safetensors"))
    for name, data in (extra_files or {}).items():
      (tmp / name).write_bytes(data)
  return Path(path)


def load_model_config(path: str | os.PathLike) -> tuple[str, Any]:
  """``(kind, config)`` of one of our checkpoint directories."""
  file = Path(path) / CONFIG_FILE
  data = read_json(file)
  if data.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(f"{file}: unsupported format_version {data.get('format_version')!r}")
  try:
    return data["kind"], registry.config_from_dict(data["kind"], data["config"], str(file))
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{file}: invalid model config ({e})") from None


def load_params(path: str | os.PathLike, expected: Mapping | None = None) -> dict:
  """Reads the parameter tree; with ``expected`` (a shape tree) checks names and shapes.

  The stored tree is first relaid out to ``expected``'s stack layout
  (unrolled ``layers_{i}`` or scanned ``layers``), so either loads into either.
  """
  from moe_jax.checkpoints.layout import match_layout

  names, read, source = open_safetensors(Path(path), PARAMS_STEM)
  flat = {name: read(name) for name in sorted(names)}
  if expected is not None:
    flat = flatten(match_layout(unflatten(flat), expected))
    want = flatten(expected, leaf=lambda x: tuple(x.shape))
    missing = sorted(set(want) - set(flat))
    if missing:
      raise CheckpointError(f"{source}: missing tensor(s) {missing[:8]}")
    unexpected = sorted(set(flat) - set(want))
    if unexpected:
      raise CheckpointError(f"{source}: unexpected tensor(s) {unexpected[:8]}")
    for name, shape in want.items():
      if tuple(flat[name].shape) != shape:
        raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(flat[name].shape)}, "
                              f"expected {shape}")
  return unflatten(flat)
