"""CALM's registration with moe-jax: the ``moe_jax.plugins`` entry point (see pyproject.toml).

moe-jax never imports calm_jax; it calls :func:`register` when it first needs
an extension (:mod:`moe_jax.plugins`), and importing ``calm_jax`` calls it
too. Everything is named by import path, so registering imports no model
code.
"""

from __future__ import annotations


def register() -> None:
  """Model kind ``calm`` (with its API hooks), gin names ``calm.*`` and ``moe_jax.compose``."""
  from moe_jax import plugins
  from moe_jax.models import registry

  registry.register_model(
      "calm", "calm_jax.model:CompositionConfig", "calm_jax.model:ComposedModel",
      token_inputs=1, hooks={"trainable_mask": "calm_jax.composition:trainable_mask",
                             "save": "calm_jax.api:save"})
  plugins.register_configurables(
      "calm", "calm_jax.composition:composition_config_from_checkpoints",
      "calm_jax.composition:init_from_checkpoints", "calm_jax.composition:trainable_mask",
      "calm_jax.tasks:kv_task")
  plugins.register_api("compose", "calm_jax.api:compose")
