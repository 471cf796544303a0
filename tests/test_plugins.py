"""Plugins: calm_jax extends moe_jax through the 'moe_jax.plugins' entry point, never the
other way round (tests/test_layout.py checks the imports)."""

import importlib.metadata

import calm_jax
import calm_jax.api
import calm_jax.plugin
import calm_jax.tasks
import moe_jax
from moe_jax import plugins
from moe_jax.cli import configurables
from moe_jax.models import registry


def test_calm_is_an_installed_plugin():
  entries = {e.name: e.value for e in importlib.metadata.entry_points(group=plugins.GROUP)}
  assert entries.get("calm") == "calm_jax.plugin:register"


def test_the_plugin_registers_kind_hooks_gin_names_and_compose():
  assert "calm" in registry.kinds()
  config_cls = plugins.resolve("calm_jax.model:CompositionConfig")
  assert registry.kind_of(object.__new__(config_cls)) == "calm"
  assert registry.hook(object.__new__(config_cls), "save") is calm_jax.api.save
  assert registry.hook(object.__new__(config_cls), "trainable_mask") is calm_jax.trainable_mask
  assert "calm_jax.tasks:kv_task" in plugins.configurables()["calm"]
  assert configurables.configured(calm_jax.tasks.kv_task) is not None
  # one kind of object per name: calm_jax.compose is the API's (a LoadedModel)
  assert moe_jax.compose is calm_jax.compose is calm_jax.api.compose
  assert calm_jax.compose_modules is not calm_jax.compose


def test_registration_is_idempotent():
  calm_jax.plugin.register()
  calm_jax.plugin.register()
  assert registry.kinds().count("calm") == 1
  assert len(plugins.configurables()["calm"]) == 4
