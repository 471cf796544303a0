"""Extensions from other packages, found through the ``moe_jax.plugins`` entry-point group.

A package extends moe-jax (a model kind, gin configurables, top-level API
names) without moe-jax importing it: it names a ``register()`` function in
its ``pyproject.toml``::

    [project.entry-points."moe_jax.plugins"]
    calm = "calm_jax.plugin:register"

and that function calls :func:`moe_jax.models.registry.register_model`,
:func:`register_configurables` and :func:`register_api`, all with import
paths (``"pkg.mod:name"``), so registering imports nothing heavy. moe-jax
calls every plugin's ``register()`` once, the first time it needs an
extension (:func:`load`): an unknown model kind or config, gin registration,
an unknown ``moe_jax.<name>``. The dependency points from the plugin to
moe-jax only.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from typing import Any

GROUP = "moe_jax.plugins"

_loaded = False
#: gin module -> import paths of the configurables registered under it.
_CONFIGURABLES: dict[str, list[str]] = {}
#: top-level ``moe_jax.<name>`` -> import path.
_API: dict[str, str] = {}


def load() -> None:
  """Calls each installed plugin's ``register()`` (once per process)."""
  global _loaded
  if _loaded:
    return
  _loaded = True  # before the calls: a plugin may use the registries it extends
  for entry in importlib.metadata.entry_points(group=GROUP):
    try:
      register = entry.load()
    except ImportError as e:  # a broken plugin must not break moe-jax itself
      warnings.warn(f"moe_jax plugin {entry.name!r} ({entry.value}) failed to import: {e}")
      continue
    register()


def resolve(path: str) -> Any:
  """The object at ``"package.module:name"``."""
  module, _, name = path.partition(":")
  return getattr(importlib.import_module(module), name)


def register_configurables(module: str, *paths: str) -> None:
  """Adds gin configurables (``"pkg.mod:name"``) under the gin module name ``module``.

  :mod:`moe_jax.cli.configurables` registers them with the built-in ones.
  """
  known = _CONFIGURABLES.setdefault(module, [])
  known.extend(p for p in paths if p not in known)


def configurables() -> dict[str, tuple[str, ...]]:
  """Every plugin's gin configurables: ``{gin module: (import path, ...)}``."""
  load()
  return {module: tuple(paths) for module, paths in _CONFIGURABLES.items()}


def register_api(name: str, path: str) -> None:
  """Makes ``moe_jax.<name>`` the object at ``path`` (``"pkg.mod:name"``)."""
  if _API.get(name, path) != path:
    raise ValueError(f"moe_jax.{name} is already provided by {_API[name]}")
  _API[name] = path


def api_names() -> dict[str, str]:
  """Top-level names plugins add to ``moe_jax``: ``{name: import path}``."""
  load()
  return dict(_API)
