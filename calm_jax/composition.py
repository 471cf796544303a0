"""Building, freezing and saving compositions.

* :func:`compose_modules` turns loaded checkpoints into a composed model with the
  frozen models' weights in place and fresh composition layers.
* :func:`composition_config_from_checkpoints` and :func:`init_from_checkpoints`
  do the same for the gin-configured trainer (architecture from the
  checkpoints' configs; weights through the trainer's ``init_from`` rules).
* :func:`trainable_mask` marks only composition parameters trainable; the
  trainer gives frozen parameters no optimizer state.
* :func:`save_composition` / :func:`load_composition` store just the
  composition parameters (a small safetensors file) plus the config and the
  paths of the anchor and augmenting checkpoints they were trained against.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from calm_jax.model import ComposedModel, CompositionConfig
from moe_jax.checkpoints.hf_common import CheckpointError
from moe_jax.models.decoder import DecoderConfig

COMPOSITION_PREFIX = "composition_"
COMPOSITION_FILE = "composition.safetensors"
COMPOSITION_CONFIG = "composition.json"


def check_tokenizers_agree(anchor_dir: str | os.PathLike | None,
                           augment_dirs: Sequence[str | os.PathLike | None]) -> None:
  """Raises ``ValueError`` unless every checkpoint's ``tokenizer.json`` has the anchor's vocab.

  Directories without a tokenizer are skipped (configs are still checked for
  equal vocabulary sizes by :class:`CompositionConfig`).
  """
  def vocab(d):
    if d is None or not (Path(d) / "tokenizer.json").exists():
      return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(Path(d) / "tokenizer.json")).get_vocab(with_added_tokens=True)

  ref = vocab(anchor_dir)
  if ref is None:
    return
  for d in augment_dirs:
    other = vocab(d)
    if other is not None and other != ref:
      diff = sorted(set(ref.items()) ^ set(other.items()))[:5]
      raise ValueError(f"tokenizer of augmenting model {d} differs from the anchor's "
                       f"({anchor_dir}); first differences (token, id): {diff}")


def compose_modules(anchor: Any, augments: Sequence[Any], *, num_composition_layers: int = 2,
                    layer_pairs=None, num_heads: int | None = None,
                    zero_init_output: bool = True, seed: int = 0) -> tuple[ComposedModel, dict]:
  """Composes loaded models (``LoadedModel`` from ``moe_jax.checkpoints.load_checkpoint``).

  Returns ``(module, params)`` with the frozen models' parameters in place and
  freshly initialised composition layers (:func:`calm_jax.api.compose` wraps
  them in a ``LoadedModel``).
  """
  for m in [anchor, *augments]:
    if not isinstance(m.config, DecoderConfig):
      raise ValueError(f"{m.source}: CALM composes decoder-only LMs, got "
                       f"{type(m.config).__name__}")
  check_tokenizers_agree(anchor.tokenizer_dir, [a.tokenizer_dir for a in augments])
  config = CompositionConfig(anchor=anchor.config, augments=tuple(a.config for a in augments),
                             num_composition_layers=num_composition_layers,
                             layer_pairs=layer_pairs, num_heads=num_heads,
                             zero_init_output=zero_init_output)
  module = ComposedModel(config=config)
  params = init_composition_params(module, seed)
  params["anchor"] = anchor.params
  for j, a in enumerate(augments):
    params[f"augment_{j}"] = a.params
  return module, params


def composition_config_from_checkpoints(
    anchor: str | os.PathLike, augments: Sequence[str | os.PathLike], *,
    num_composition_layers: int = 2, layer_pairs=None, num_heads: int | None = None,
    zero_init_output: bool = True, query_norm: bool = True) -> CompositionConfig:
  """The composed architecture of checkpoints on disk (reads configs, loads no weights).

  ``anchor`` and each of ``augments`` is a Hugging Face directory, a moe-jax
  ``save_model`` directory or a training ``model_dir``. Their tokenizers must
  agree (``tokenizer.json`` where present, else equal vocabulary sizes). The
  trainer's gin entry uses this with :func:`init_from_checkpoints`
  (``gin_configs/runs/calm_compose.gin``).
  """
  from moe_jax.checkpoints.orbax import read_model_config

  if isinstance(augments, (str, os.PathLike)):
    augments = [augments]
  if not augments:
    raise ValueError("composition_config_from_checkpoints: no augmenting checkpoints given")
  check_tokenizers_agree(anchor, list(augments))
  configs = []
  for path in [anchor, *augments]:
    config = read_model_config(path)
    if not isinstance(config, DecoderConfig):
      raise ValueError(f"{path}: CALM composes decoder-only LMs, got {type(config).__name__}")
    configs.append(config)
  return CompositionConfig(anchor=configs[0], augments=tuple(configs[1:]),
                           num_composition_layers=num_composition_layers,
                           layer_pairs=layer_pairs, num_heads=num_heads,
                           zero_init_output=zero_init_output, query_norm=query_norm)


def init_from_checkpoints(anchor: str | os.PathLike, augments: Sequence[str | os.PathLike]
                          ) -> tuple[Any, ...]:
  """``InitFromCheckpoint`` rules that load the frozen models into a fresh composition.

  One rule per checkpoint: the anchor's tensors go under ``anchor/``, the
  j-th augmenting model's under ``augment_{j}/``; composition layers (and
  anything else) keep their fresh initialisation. Pass the tuple as the
  trainer's ``init_from``.
  """
  from moe_jax.checkpoints.assignment import InitFromCheckpoint

  if isinstance(augments, (str, os.PathLike)):
    augments = [augments]
  rules = [InitFromCheckpoint(path=str(anchor), assignment_map=(("anchor/(.*)", r"\1"),
                                                                (".*", None)))]
  for j, path in enumerate(augments):
    rules.append(InitFromCheckpoint(path=str(path), assignment_map=(
        (f"augment_{j}/(.*)", r"\1"), (".*", None))))
  return tuple(rules)


def init_composition_params(module: ComposedModel, seed: int = 0) -> dict:
  """Full parameter tree with random frozen models; only for shapes and tests."""
  import flax.linen as nn
  import jax.numpy as jnp

  tokens = jnp.zeros((1, 1), jnp.int32)
  return dict(nn.meta.unbox(jax.jit(module.init)(jax.random.key(seed), tokens)["params"]))


def trainable_mask(params: Mapping) -> dict:
  """True for composition parameters, False for the frozen LMs."""
  return {k: jax.tree.map(lambda _: k.startswith(COMPOSITION_PREFIX), v)
          for k, v in params.items()}


def composition_params(params: Mapping) -> dict:
  return {k: v for k, v in params.items() if k.startswith(COMPOSITION_PREFIX)}


def save_composition(path: str | os.PathLike, config: CompositionConfig, params: Mapping, *,
                     anchor_checkpoint: str | None = None,
                     augment_checkpoints: Sequence[str] | None = None) -> Path:
  """Writes the composition layers (not the frozen LMs) atomically."""
  from safetensors.numpy import save_file

  from moe_jax.checkpoints.io import atomic_directory, write_json
  from moe_jax.checkpoints.native import flatten
  from moe_jax.models.registry import config_to_dict

  comp = composition_params(params)
  if not comp:
    raise ValueError("no composition parameters (keys starting with 'composition_') to save")
  with atomic_directory(path) as tmp:
    # C order: safetensors.numpy writes a transposed (Fortran-ordered) array's raw buffer,
    # i.e. the transpose of its values (any NumPy leaf the caller hands in may be a view).
    save_file(flatten(comp, leaf=np.ascontiguousarray), str(tmp / COMPOSITION_FILE))
    write_json(tmp / COMPOSITION_CONFIG, {
        "config": config_to_dict(config),
        "anchor_checkpoint": anchor_checkpoint,
        "augment_checkpoints": list(augment_checkpoints or []),
    })
  return Path(path)


def _config_from_dict(data: Mapping) -> CompositionConfig:
  from moe_jax.models.registry import _build
  return _build(CompositionConfig, dict(data), COMPOSITION_CONFIG)


def load_composition(path: str | os.PathLike, *, anchor=None, augments=None
                     ) -> tuple[ComposedModel, dict, dict]:
  """Rebuilds a composed model from :func:`save_composition` output.

  The frozen models come from ``anchor`` / ``augments`` (``LoadedModel``s)
  when given, else from the checkpoint paths recorded at save time.

  Returns ``(module, params, metadata)``.
  """
  from moe_jax.checkpoints import load_checkpoint
  from moe_jax.checkpoints.io import open_safetensors, read_json
  from moe_jax.checkpoints.native import flatten, unflatten

  directory = Path(path)
  meta = read_json(directory / COMPOSITION_CONFIG)
  try:
    config = _config_from_dict(meta["config"])
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{directory / COMPOSITION_CONFIG}: invalid config ({e})") from None
  if anchor is None:
    if not meta.get("anchor_checkpoint"):
      raise CheckpointError(f"{directory}: no anchor checkpoint recorded; pass anchor=")
    anchor = load_checkpoint(meta["anchor_checkpoint"])
  if augments is None:
    augments = [load_checkpoint(p) for p in meta.get("augment_checkpoints", [])]
  if anchor.config != config.anchor or tuple(a.config for a in augments) != config.augments:
    raise CheckpointError(f"{directory}: the given anchor/augmenting models do not match the "
                          "configs the composition was trained with")
  module = ComposedModel(config=config)
  shapes = jax.eval_shape(lambda: init_composition_params(module))
  want = flatten(composition_params(shapes), leaf=lambda x: tuple(x.shape))
  names, read, source = open_safetensors(directory, COMPOSITION_FILE.split(".")[0])
  missing = sorted(set(want) - names)
  if missing:
    raise CheckpointError(f"{source}: missing tensor(s) {missing[:8]}")
  flat = {}
  for name, shape in want.items():
    x = read(name)
    if tuple(x.shape) != shape:
      raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(x.shape)}, "
                            f"expected {shape}")
    flat[name] = np.asarray(x)
  params = unflatten(flat)
  params["anchor"] = anchor.params
  for j, a in enumerate(augments):
    params[f"augment_{j}"] = a.params
  return module, params, meta
