"""CALM: composing a frozen anchor LM with frozen augmenting LMs (arXiv 2401.02412).

:func:`compose` (= :func:`calm_jax.api.compose`, also ``moe_jax.compose``)
returns a model for the moe-jax Python API; :func:`compose_modules` returns
the bare ``(module, params)``.
"""

from calm_jax import plugin
from calm_jax.composition import (compose_modules, load_composition, save_composition,
                                  trainable_mask)
from calm_jax.model import (ComposedModel, CompositionConfig, CompositionLayer,
                            select_layer_pairs)

from calm_jax import api  # compose() returning a model for the moe_jax Python API
from calm_jax.api import compose

plugin.register()  # also without the installed entry point (moe_jax.plugins)

__all__ = ["ComposedModel", "CompositionConfig", "CompositionLayer", "api", "compose",
           "compose_modules", "load_composition", "save_composition", "select_layer_pairs",
           "trainable_mask"]
