"""CALM in one call for notebooks: :func:`compose` returns a model the moe-jax API trains.

::

    import moe_jax as mj
    from calm_jax import api as calm

    anchor, augmenting = mj.load("anchor_dir"), mj.load("augmenting_dir")
    model = calm.compose(anchor, [augmenting], num_composition_layers=2)
    run = mj.finetune(model, examples, steps=200)  # only the composition layers train
    mj.predict(run.model, ["..."])
    mj.save(run.model, "out/calm")                 # composition layers + config

The composed model is a :class:`~moe_jax.checkpoints.LoadedModel` whose config
is a :class:`~calm_jax.model.CompositionConfig` and whose module is a
:class:`~calm_jax.model.ComposedModel`, built by
:func:`calm_jax.composition.compose_modules`. ``moe_jax.compose`` is this
:func:`compose` (registered by :mod:`calm_jax.plugin`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from moe_jax.checkpoints import LoadedModel


def compose(anchor: LoadedModel, augments: Sequence[LoadedModel], *,
            num_composition_layers: int = 2, layer_pairs: Any = None,
            num_heads: int | None = None, seed: int = 0) -> LoadedModel:
  """A frozen ``anchor`` attending to frozen ``augments`` through fresh cross-attention layers.

  Args:
    anchor: the decoder whose outputs the composition produces.
    augments: the augmenting decoders (same vocabulary).
    num_composition_layers: how many anchor layers attend to the augmenting
      models (evenly spaced, see :func:`calm_jax.model.select_layer_pairs`).
    layer_pairs: explicit pairs instead: per augmenting model,
      ``((augment_layer, anchor_layer), ...)``.
    num_heads: heads of the composition cross-attention (default the anchor's).
    seed: initialisation of the composition layers.

  Returns:
    The composed model; at initialisation it computes exactly the anchor
    (the composition output projections start at zero).
  """
  from calm_jax.composition import compose_modules

  module, params = compose_modules(anchor, list(augments),
                                   num_composition_layers=num_composition_layers,
                                   layer_pairs=layer_pairs, num_heads=num_heads, seed=seed)
  return LoadedModel(config=module.config, module=module, params=params,
                     source=f"calm({anchor.source}; {', '.join(a.source for a in augments)})",
                     tokenizer_dir=anchor.tokenizer_dir)


def save(model: LoadedModel, path: str | os.PathLike, *, anchor_checkpoint: str | None = None,
         augment_checkpoints: Sequence[str] | None = None) -> Path:
  """Writes the composition layers (not the frozen LMs), with the frozen models' paths.

  :func:`calm_jax.load_composition` rebuilds the model from them.
  """
  from calm_jax.composition import save_composition

  return save_composition(path, model.config, model.params, anchor_checkpoint=anchor_checkpoint,
                          augment_checkpoints=augment_checkpoints)


__all__ = ["compose", "save"]
