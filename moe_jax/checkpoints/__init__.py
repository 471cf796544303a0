"""Checkpoints: Hugging Face import/export and our own self-describing format.

:func:`load_checkpoint` accepts either kind of directory (or a training
``model_dir``, or a Hugging Face Hub id: :mod:`~moe_jax.checkpoints.hub`) and returns a :class:`LoadedModel` (config, flax module,
parameters). Training checkpoints (orbax save / restore, exact resumption,
``load_latest``) are :mod:`moe_jax.checkpoints.orbax`; partial restore by
assignment map (``InitFromCheckpoint``) is :mod:`moe_jax.checkpoints.assignment`.
"""

from __future__ import annotations

import os
from pathlib import Path

from moe_jax.checkpoints.hf import LoadedModel, export_hf, load_hf, unbox
from moe_jax.checkpoints.hf_common import CheckpointError
from moe_jax.checkpoints.hub import resolve_checkpoint
from moe_jax.checkpoints.native import is_native_checkpoint, save_model

__all__ = ["CheckpointError", "LoadedModel", "export_hf", "load_checkpoint", "load_hf",
           "resolve_checkpoint", "save_model", "unbox"]


def load_checkpoint(path: str | os.PathLike, *, dtype: str | None = None,
                    revision: str | None = None, scan_layers: bool | None = None,
                    remat_policy: str | None = None) -> LoadedModel:
  """Loads an HF directory (``config.json``), one of ours (``model_config.json`` +
  ``params.safetensors``) or a training directory (newest orbax step).

  ``path`` may also be a Hugging Face Hub id ``namespace/name[@revision]``
  (see :mod:`moe_jax.checkpoints.hub`; a local path that exists always wins);
  ``revision`` picks its branch, tag or commit. ``scan_layers`` /
  ``remat_policy`` (default: the checkpoint's) rebuild the model with that
  stack layout / remat policy; the parameters are relaid out to match
  (:mod:`moe_jax.checkpoints.layout`), whichever layout the checkpoint has.
  """
  from moe_jax.checkpoints import layout

  loaded = _load_checkpoint(path, dtype=dtype, revision=revision)
  return layout.with_stack_options(loaded, scan_layers=scan_layers, remat_policy=remat_policy)


def _load_checkpoint(path: str | os.PathLike, *, dtype: str | None,
                     revision: str | None) -> LoadedModel:
  directory = resolve_checkpoint(path, revision=revision)
  if not directory.is_dir():
    raise CheckpointError(f"{directory}: no such checkpoint directory")
  from moe_jax.checkpoints import orbax  # training dirs: orbax steps + model_config.json

  if orbax.is_training_dir(directory) and not (directory / "params.safetensors").exists():
    return orbax.load_latest(directory, dtype=dtype)
  if is_native_checkpoint(directory):
    return _load_native(directory, dtype)
  if (directory / "config.json").exists():
    return load_hf(directory, dtype=dtype)
  raise CheckpointError(f"{directory}: neither a Hugging Face checkpoint (config.json) nor a "
                        f"moe-jax checkpoint (model_config.json)")


def _load_native(directory: Path, dtype: str | None) -> LoadedModel:
  import dataclasses

  import jax
  import numpy as np

  from moe_jax.checkpoints import native
  from moe_jax.checkpoints.hf import _NP_DTYPES
  from moe_jax.models import registry

  kind, config = native.load_model_config(directory)
  if dtype is not None:
    if dtype not in _NP_DTYPES:
      raise CheckpointError(f"unsupported parameter dtype {dtype!r}")
    config = dataclasses.replace(config, param_dtype=dtype)
  module = registry.build_module(config, kind)
  params = native.load_params(directory, registry.param_shapes(module, kind))
  if dtype is not None:
    params = jax.tree.map(lambda x: np.asarray(x).astype(_NP_DTYPES[dtype]), params)
  tok = str(directory) if (directory / "tokenizer.json").exists() else None
  return LoadedModel(config=config, module=module, params=params, source=str(directory),
                     tokenizer_dir=tok)
