"""CALM: composing a frozen anchor LM with frozen augmenting LMs (arXiv 2401.02412)."""

from calm_jax.composition import (compose, load_composition, save_composition,
                                  trainable_mask)
from calm_jax.model import (ComposedModel, CompositionConfig, CompositionLayer,
                            select_layer_pairs)

from calm_jax import api  # compose() returning a model for the moe_jax Python API

__all__ = ["ComposedModel", "CompositionConfig", "CompositionLayer", "api", "compose",
           "load_composition", "save_composition", "select_layer_pairs", "trainable_mask"]
