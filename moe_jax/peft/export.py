"""Getting adapters out: folded into an HF checkpoint, or saved small beside a base reference.

**Folding** (``ia3``, ``lora``, and ``mov`` / ``molora`` with one expert,
whose router weight is exactly 1): every adapter is input-independent, so it
folds into the weights it adapts and the result is the plain backbone, which
:func:`merge_and_export_hf` writes as a Hugging Face checkpoint that
transformers loads with no ``peft`` installed:

* (IA)^3 on ``q``/``k``/``v`` scales the projection output before RoPE:
  ``kernel[..., K, Dh] *= s`` (and the bias);
* (IA)^3 on ``ffn`` scales the hidden before ``wo``: ``wo.kernel[F, :] *= s``;
* LoRA adds ``(alpha / R) · A B`` to the kernel.
* per-expert adapters (``expert_*`` sites) fold expert by expert into the
  stacked kernels: ``wo[e, f, :] *= s[e, f]``, ``W_e += (alpha / R) · A_e B_e``.

A kernel with a leading expert axis (BAM's attention experts) gets the same
update in every expert, as the adapted model computes it.

Folding runs in float32 and casts back to each kernel's dtype.

**Mixtures** (E > 1) depend on the token through the router and cannot fold.
:func:`save_adapters` writes only them, ``adapters.safetensors`` (``/``-joined
tree paths, float32) plus ``adapter_config.json``::

    {"format_version": 1, "peft": {...PeftConfig...},
     "base_checkpoint": "<path or hub id of the frozen backbone>",
     "num_parameters": N}

:func:`load_adapted` rebuilds the whole model from that directory. Writes are
atomic (:func:`moe_jax.checkpoints.io.atomic_directory`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from moe_jax.checkpoints import LoadedModel, export_hf, load_checkpoint, unbox
from moe_jax.checkpoints.hf_common import CheckpointError
from moe_jax.checkpoints.io import (atomic_directory, open_safetensors, read_json, write_json,
                                    write_safetensors)
from moe_jax.checkpoints.native import flatten, unflatten
from moe_jax.peft.adapters import expert_lora_update, lora_update
from moe_jax.peft.config import ADAPTER_PREFIX, PeftConfig
from moe_jax.peft.layers import adapt
from moe_jax.peft.params import check_tree, merge_params, param_shapes, split_params

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_STEM = "adapters"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- folding


def _single(adapter: Mapping, site: str, where: str) -> Mapping:
  """Drops the expert axis of a one-expert mixture adapter; refuses E > 1."""
  if "router" not in adapter:
    return adapter
  e = np.shape(adapter["router"]["kernel"])[-1]
  if e != 1:
    raise ValueError(f"{where}/{ADAPTER_PREFIX}{site}: a mixture of {e} experts depends on the "
                     "token through its router and cannot fold into the base weights; save it "
                     "with moe_jax.peft.save_adapters")
  if "scale" in adapter:
    return {"scale": np.asarray(adapter["scale"])[0]}
  return {"lora_a": np.asarray(adapter["lora_a"])[..., 0, :],
          "lora_b": np.asarray(adapter["lora_b"])[0]}


def _fold_node(node: Mapping, peft: PeftConfig, where: str) -> dict:
  out = {k: v for k, v in node.items() if not str(k).startswith(ADAPTER_PREFIX)}
  for key, value in node.items():
    if isinstance(value, Mapping) and not str(key).startswith(ADAPTER_PREFIX):
      out[key] = _fold_node(value, peft, f"{where}/{key}" if where else str(key))
  for key, adapter in node.items():
    if not str(key).startswith(ADAPTER_PREFIX):
      continue
    site = str(key)[len(ADAPTER_PREFIX):]
    adapter = _single(adapter, site, where)
    if "scale" in adapter:
      s = np.asarray(adapter["scale"], np.float32)
      if site == "hidden":  # dense wo [F, D] or routed experts' wo [E, F, D]
        target, col = "wo", s[..., None]
      else:
        target, col = site, s
      layer = dict(out[target])
      kernel = np.asarray(layer["kernel"])
      layer["kernel"] = (kernel.astype(np.float32) * col).astype(kernel.dtype)
      if "bias" in layer and site != "hidden":
        bias = np.asarray(layer["bias"])
        layer["bias"] = (bias.astype(np.float32) * s).astype(bias.dtype)
      out[target] = layer
    elif "lora_a" in adapter:
      layer = dict(out[site])
      kernel = np.asarray(layer["kernel"])
      a, b = jnp.asarray(adapter["lora_a"]), jnp.asarray(adapter["lora_b"])
      if a.ndim == b.ndim == kernel.ndim == 3 and a.shape[0] == b.shape[0] == kernel.shape[0]:
        update = np.asarray(expert_lora_update(a, b, peft.scaling))  # one LoRA per expert
      else:
        update = np.asarray(lora_update(a, b, peft.scaling))
      # A kernel may carry a leading expert axis (a BAM attention expert): one adapter
      # serves every expert, so its update adds to each.
      if kernel.shape[kernel.ndim - update.ndim:] != update.shape or kernel.ndim > update.ndim + 1:
        raise ValueError(f"{where}/{key}: LoRA update {update.shape} does not fit kernel "
                         f"{kernel.shape}")
      layer["kernel"] = (kernel.astype(np.float32) + update).astype(kernel.dtype)
      out[site] = layer
    else:
      raise ValueError(f"{where}/{key}: not an adapter this version knows ({sorted(adapter)})")
  return out


def fold_adapters(params: Mapping, peft: PeftConfig) -> dict:
  """The backbone parameters with every (single-expert) adapter folded in.

  Raises:
    ValueError: a mixture with more than one expert (see the module docstring).

  A scanned stack (``scan_layers``) is folded layer by layer and comes back
  scanned.
  """
  from moe_jax.checkpoints.layout import match_layout, unrolled

  params = unbox(params)
  return match_layout(_fold_node(unrolled(params), peft, ""), params)


def merge_and_export_hf(path: str | os.PathLike, config: Any, params: Mapping,
                        peft: PeftConfig, **export_kw) -> Path:
  """Folds (IA)^3 / LoRA into the base weights and writes a plain HF checkpoint.

  Args:
    path: target directory (written atomically).
    config: the backbone config (``LoadedModel.config``).
    params: the adapted model's parameters.
    peft: the adapters' config (for LoRA's ``alpha / rank``).
    **export_kw: ``dtype``, ``max_shard_bytes``, ``tokenizer_dir`` of
      :func:`moe_jax.checkpoints.export_hf`.
  """
  return export_hf(path, config, fold_adapters(params, peft), **export_kw)


# ----------------------------------------------------------------------------- adapter files


@dataclasses.dataclass
class SavedAdapters:
  """The contents of an adapter directory."""

  params: dict
  peft: PeftConfig
  base_checkpoint: str
  metadata: dict


def save_adapters(path: str | os.PathLike, adapter_params: Mapping, peft: PeftConfig,
                  base_checkpoint: str, *, metadata: Mapping[str, Any] | None = None) -> Path:
  """Writes the adapters (and routers) of ``adapter_params`` with a reference to the base.

  Args:
    path: target directory (written atomically).
    adapter_params: the adapted model's parameters, or only their adapters.
    peft: the adapters' config.
    base_checkpoint: where the frozen backbone lives (a directory
      :func:`moe_jax.checkpoints.load_checkpoint` reads; relative paths are
      resolved against the adapter directory first, then the working directory).
    metadata: extra JSON-able information (task, step, ...).
  """
  _, adapters = split_params(unbox(adapter_params))
  if not adapters:
    raise ValueError("save_adapters: no adapter parameters (peft_*) in the given tree")
  flat = flatten(adapters, leaf=lambda x: np.asarray(x, np.float32))
  with atomic_directory(path) as tmp:
    write_safetensors(tmp, flat, stem=ADAPTER_STEM, metadata={"peft_method": peft.method})
    write_json(tmp / ADAPTER_CONFIG_FILE, {
        "format_version": FORMAT_VERSION, "peft": peft.to_dict(),
        "base_checkpoint": str(base_checkpoint),
        "num_parameters": int(sum(v.size for v in flat.values())),
        "metadata": dict(metadata or {})})
  return Path(path)


def load_adapters(path: str | os.PathLike) -> SavedAdapters:
  """Reads an adapter directory written by :func:`save_adapters`."""
  directory = Path(path)
  file = directory / ADAPTER_CONFIG_FILE
  data = read_json(file)
  if "peft_type" in data and "format_version" not in data:
    raise CheckpointError(f"{file}: a Hugging Face peft adapter ({data['peft_type']}), not "
                          "moe-jax adapters; load it with peft.PeftModel.from_pretrained onto "
                          "the Hugging Face base")
  if data.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(f"{file}: unsupported format_version {data.get('format_version')!r}")
  for key in ("peft", "base_checkpoint"):
    if key not in data:
      raise CheckpointError(f"{file}: missing field {key!r}")
  try:
    peft = PeftConfig.from_dict(data["peft"], f"{file}: peft")
  except ValueError as e:
    raise CheckpointError(str(e)) from None
  names, read, _ = open_safetensors(directory, ADAPTER_STEM)
  params = unflatten({name: read(name) for name in sorted(names)})
  return SavedAdapters(params=params, peft=peft, base_checkpoint=str(data["base_checkpoint"]),
                       metadata=dict(data.get("metadata") or {}))


def _resolve_base(adapter_dir: Path, base: str) -> Path:
  candidate = Path(base)
  if not candidate.is_absolute() and (adapter_dir / candidate).is_dir():
    return adapter_dir / candidate
  return candidate


def load_adapted(path: str | os.PathLike, *, dtype: str | None = None) -> LoadedModel:
  """Base checkpoint + saved adapters -> a :class:`LoadedModel` with the adapted module.

  Raises:
    CheckpointError: missing files, or adapters that do not fit the base
      (the message names the parameter).
  """
  from moe_jax.checkpoints.layout import has_scanned

  saved = load_adapters(path)
  base_dir = _resolve_base(Path(path), saved.base_checkpoint)
  # adapters saved from a scanned model: the base is relaid out to match
  base = load_checkpoint(base_dir, dtype=dtype, scan_layers=has_scanned(saved.params) or None)
  module = adapt(base, saved.peft)
  _, want = split_params(param_shapes(module))
  check_tree(want, saved.params, f"{Path(path) / (ADAPTER_STEM + '.safetensors')}")
  params = merge_params(base.params, saved.params)
  return LoadedModel(config=base.config, module=module, params=params, source=str(path),
                     tokenizer_dir=base.tokenizer_dir)
