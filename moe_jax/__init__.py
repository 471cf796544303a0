"""moe-jax: mixture-of-experts from pretrained language models, in JAX/Flax.

The notebook API (:mod:`moe_jax.api`) is available at the top level::

    import moe_jax as mj
    model = mj.add_adapters(mj.load("path/to/checkpoint"), "mov", num_experts=10)
    run = mj.finetune(model, examples, steps=100)
    mj.predict(run.model, ["..."])

Importing ``moe_jax`` is cheap: the API (and with it jax, seqio and
TensorFlow) is imported on first use of one of its names. Installed plugins
add names too (:mod:`moe_jax.plugins`): ``mj.compose`` is CALM's
(:func:`calm_jax.api.compose`).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

#: Top-level name -> the module that defines it (imported lazily).
_API = {name: "moe_jax.api" for name in (
    "Data", "LoadedModel", "TrainResult", "add_adapters", "encode_prompts", "evaluate",
    "export_hf", "export_peft", "finetune", "load", "predict", "router_probabilities", "save",
    "upcycle_model")}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
  if name in _API:
    value = getattr(importlib.import_module(_API[name]), name)
  elif name.startswith("__") or importlib.util.find_spec(f"{__name__}.{name}") is not None:
    # dunders, and subpackages not imported yet (``from moe_jax import peft`` asks first)
    raise AttributeError(f"module 'moe_jax' has no attribute {name!r}")
  else:  # names plugins add, e.g. compose (calm_jax)
    plugins = importlib.import_module("moe_jax.plugins")
    path = plugins.api_names().get(name)
    if path is None:
      raise AttributeError(f"module 'moe_jax' has no attribute {name!r}")
    value = plugins.resolve(path)
  globals()[name] = value  # later lookups skip this hook
  return value


def __dir__() -> list[str]:
  plugins = importlib.import_module("moe_jax.plugins")
  return sorted(set(globals()) | set(_API) | set(plugins.api_names()))
