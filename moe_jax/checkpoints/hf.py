"""Hugging Face checkpoints: ``config.json`` + ``model.safetensors`` (or a sharded index).

Supported architectures: ``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` (:mod:`hf_llama`), ``GemmaForCausalLM``,
``Gemma2ForCausalLM``, ``Gemma3ForCausalLM`` (:mod:`hf_gemma`), ``Phi3ForCausalLM``
(:mod:`hf_phi3`), ``MixtralForCausalLM`` (:mod:`hf_mixtral`),
``Qwen2MoeForCausalLM``, ``Qwen3MoeForCausalLM``, ``OlmoeForCausalLM``
(:mod:`hf_qwen_moe`), ``DeepseekV3ForCausalLM`` (:mod:`hf_deepseek`) and
``T5ForConditionalGeneration`` (:mod:`hf_t5`). A dense
decoder exports as the family :func:`~moe_jax.checkpoints.hf_llama.export_model_type`
picks; an MoE decoder as its ``hf_model_type`` when that is one of the MoE
families (an import, or an upcycling ``target``), else as Mixtral. float32, bfloat16 and
float16 files load; parameters are cast to the config's ``param_dtype`` (by
default the file's dtype for bfloat16/float16 files, float32 otherwise) unless
``dtype`` says otherwise.

Export writes the same layout into a temporary directory and renames it into
place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np

from moe_jax.checkpoints.hf_common import CheckpointError, Converter, TensorGetter
from moe_jax.checkpoints.io import (atomic_directory, open_safetensors, read_json, write_json,
                                    write_safetensors)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "generation_config.json", "tokenizer.model")


def converters() -> dict[str, Converter]:
  """model_type -> converter, for every supported HF architecture."""
  from moe_jax.checkpoints.hf_deepseek import DeepseekConverter
  from moe_jax.checkpoints.hf_gemma import GemmaConverter
  from moe_jax.checkpoints.hf_llama import LlamaConverter
  from moe_jax.checkpoints.hf_mixtral import MixtralConverter
  from moe_jax.checkpoints.hf_phi3 import Phi3Converter
  from moe_jax.checkpoints.hf_qwen_moe import QwenMoeConverter
  from moe_jax.checkpoints.hf_t5 import T5Converter

  table: dict[str, Converter] = {}
  # Subclass configs first: converter_for_config takes the first isinstance match
  # (MoeDecoderConfig is a DecoderConfig); converter_for_config picks among the dense ones.
  for conv in (DeepseekConverter(), MixtralConverter(), QwenMoeConverter(), LlamaConverter(),
               GemmaConverter(), Phi3Converter(), T5Converter()):
    for model_type in conv.model_types:
      table[model_type] = conv
  return table


def converter_for(hf_config: Mapping[str, Any], source: str = "config.json") -> Converter:
  table = converters()
  model_type = hf_config.get("model_type")
  if model_type not in table:
    archs = hf_config.get("architectures")
    raise CheckpointError(
        f"{source}: unsupported model_type {model_type!r} (architectures {archs}); "
        f"supported: {sorted(table)}")
  return table[model_type]


@dataclasses.dataclass
class LoadedModel:
  """A model ready to run: config, flax module, parameters and where it came from."""

  config: Any
  module: Any
  params: dict
  source: str
  tokenizer_dir: str | None = None

  @property
  def is_encoder_decoder(self) -> bool:
    return hasattr(self.module, "encode")


_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _cast(params, dtype: str):
  target = np.dtype(_NP_DTYPES[dtype])
  return jax.tree.map(lambda x: np.asarray(x).astype(target), params)


def load_hf(path: str | os.PathLike, *, dtype: str | None = None,
            compute_dtype: str | None = None, scan_layers: bool | None = None,
            remat_policy: str | None = None) -> LoadedModel:
  """Loads an HF checkpoint directory into our model.

  Args:
    path: directory with ``config.json`` and safetensors weights.
    dtype: parameter dtype (``float32``/``bfloat16``/``float16``); default: the
      file's floating dtype.
    compute_dtype: activation dtype; default ``float32``.
    scan_layers, remat_policy: stack options of the model (default: unrolled,
      no remat); a scanned model gets its layers stacked on load.

  Raises:
    CheckpointError: unreadable files, unsupported architecture, missing,
      mis-shaped or unexpected tensors (the message names them).
  """
  directory = Path(path)
  if not directory.is_dir():
    raise CheckpointError(f"{directory}: not a checkpoint directory")
  hf_config = read_json(directory / "config.json")
  conv = converter_for(hf_config, str(directory / "config.json"))
  config = conv.config_from_hf(hf_config)
  names, read, source = open_safetensors(directory)
  getter = TensorGetter(read, names, source)
  params = conv.params_from_hf(getter, config)
  ignorable = {n for n in names - getter.used
               if n.endswith("rotary_emb.inv_freq") or n.endswith("embed_tokens.weight")}
  unexpected = sorted(names - getter.used - ignorable)
  if unexpected:
    raise CheckpointError(f"{source}: unexpected tensors not used by "
                          f"{type(config).__name__}: {unexpected[:8]}"
                          + (" ..." if len(unexpected) > 8 else ""))
  file_dtype = {np.asarray(x).dtype for x in jax.tree.leaves(params)}
  if dtype is None:
    dtype = "float32"
    for name in ("bfloat16", "float16"):
      if np.dtype(_NP_DTYPES[name]) in file_dtype:
        dtype = name
  if dtype not in _NP_DTYPES:
    raise CheckpointError(f"unsupported parameter dtype {dtype!r}; use one of {sorted(_NP_DTYPES)}")
  config = dataclasses.replace(config, param_dtype=dtype, dtype=compute_dtype or "float32")
  params = _cast(params, dtype)
  tok = str(directory) if (directory / "tokenizer.json").exists() else None
  from moe_jax.checkpoints.layout import with_stack_options

  return with_stack_options(
      LoadedModel(config=config, module=conv.module(config), params=params,
                  source=str(directory), tokenizer_dir=tok),
      scan_layers=scan_layers, remat_policy=remat_policy)


def export_hf(path: str | os.PathLike, config: Any, params: Mapping, *,
              dtype: str | None = None, max_shard_bytes: int | None = None,
              tokenizer_dir: str | os.PathLike | None = None) -> Path:
  """Writes ``config`` + ``params`` as an HF checkpoint directory, atomically.

  Args:
    path: target directory (replaced only once the new one is complete).
    config, params: our config and (unboxed) parameter tree, unrolled or
      scanned (``scan_layers``; unrolled on the way out).
    dtype: tensor dtype in the file; default the config's ``param_dtype``.
    max_shard_bytes: shard the weights with an index file above this size.
    tokenizer_dir: copy the tokenizer files found there alongside.
  """
  conv = converter_for_config(config)
  hf_config = conv.config_to_hf(config)
  dtype = dtype or config.param_dtype
  if dtype not in _NP_DTYPES:
    raise CheckpointError(f"unsupported export dtype {dtype!r}; use one of {sorted(_NP_DTYPES)}")
  hf_config["torch_dtype"] = dtype
  hf_config["dtype"] = dtype
  from moe_jax.checkpoints.layout import unrolled

  tensors = conv.params_to_hf(unrolled(unbox(params)), config)
  tensors = {k: np.asarray(v).astype(_NP_DTYPES[dtype]) for k, v in tensors.items()}
  with atomic_directory(path) as tmp:
    write_json(tmp / "config.json", hf_config)
    write_safetensors(tmp, tensors, max_shard_bytes=max_shard_bytes)
    if tokenizer_dir is not None:
      for name in _TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.exists():
          (tmp / name).write_bytes(src.read_bytes())
  return Path(path)


def converter_for_config(config: Any) -> Converter:
  """The converter whose ``config_type`` ``config`` is an instance of; for the dense
  families, which share ``DecoderConfig``, the one of the family that expresses it."""
  from moe_jax.checkpoints.hf_llama import LlamaConverter, export_model_type
  from moe_jax.models.deepseek import DeepseekConfig
  from moe_jax.models.moe_decoder import MoeDecoderConfig

  table = converters()
  if isinstance(config, DeepseekConfig):  # latent attention: only DeepSeek-V3 expresses it
    return table["deepseek_v3"]
  if isinstance(config, MoeDecoderConfig):  # its MoE family, else Mixtral (which says why not)
    return table[config.hf_model_type if config.hf_model_type in
                 ("qwen2_moe", "qwen3_moe", "olmoe") else "mixtral"]
  for conv in table.values():
    if isinstance(config, conv.config_type):
      return table[export_model_type(config)] if isinstance(conv, LlamaConverter) else conv
  raise CheckpointError(f"no Hugging Face export for {type(config).__name__}")


def unbox(params):
  """Strips flax ``LogicallyPartitioned`` boxes (and a top-level ``params`` key)."""
  import flax.linen as nn

  if isinstance(params, Mapping) and set(params) == {"params"}:
    params = params["params"]
  return nn.meta.unbox(params)
