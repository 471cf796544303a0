"""Reading dense inputs and writing upcycled models: orbax step 0, safetensors, gin.

An upcycled model directory ``OUT`` is a training ``model_dir`` at step 0
(:mod:`moe_jax.checkpoints.orbax`) plus a copy of the weights in our
native format and the gin file that continues training it::

    OUT/
      model_config.json        {"kind", "config", ...}: the MoE / BAM architecture
      checkpoints/0/params/    orbax StandardSave of the parameters (no optimizer
                               state: training starts from them, it does not resume)
      params.safetensors       optional: the same weights in moe-jax native format
      finetune.gin             include 'runs/finetune.gin' + INIT_CHECKPOINT = OUT
      upcycle.json             how OUT was made (method, inputs, options)
      tokenizer files          copied from the first input, if it has them

``moe_jax.checkpoints.load_checkpoint`` (hence ``python -m moe_jax.generate
--checkpoint OUT``) and the trainer (``InitFromCheckpoint(path=OUT)``) both
read the orbax step-0 parameters. ``write_safetensors=True`` adds a native
copy for tools that read only safetensors (twice the disk).

Everything is written into a temporary sibling directory and renamed into
place (``moe_jax.checkpoints.io.atomic_directory``): a failed run leaves the
previous ``OUT`` (or nothing), never half a checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from moe_jax.checkpoints.hf_common import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "tokenizer.model")
GIN_FILE = "finetune.gin"


def load_dense(path: str | os.PathLike, dtype: str | None = None):
  """A dense input as a ``LoadedModel``: HF dir, ``save_model`` dir, or training ``model_dir``."""
  from moe_jax.checkpoints import load_checkpoint

  return load_checkpoint(path, dtype=dtype)


def finetune_gin(out: Path, command: str) -> str:
  """The gin file that continues training the model in ``out`` (t5x's fine-tune tier)."""
  return f"""# Continue training an upcycled model (written by python -m moe_jax.upcycle):
#   {command}
#
#   python -m moe_jax.train --gin_file={out / GIN_FILE} \\
#     --model_dir={out / 'train'} --gin.MIXTURE_OR_TASK_NAME="'your_task'"
#
# INIT_CHECKPOINT is this directory: the architecture (model_config.json) and
# the step-0 weights (checkpoints/0) come from it. Train into another directory
# (MODEL_DIR): this one has no optimizer state to resume from.
#
# Required macros: MODEL_DIR (--model_dir).
# Override as needed: MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS, TRAIN_STEPS,
# BATCH_SIZE, LEARNING_RATE, and the rest of runs/finetune.gin and runs/pretrain.gin.

include 'runs/finetune.gin'

INIT_CHECKPOINT = {str(out)!r}

MIXTURE_OR_TASK_NAME = 'synthetic_lm_text'
TASK_FEATURE_LENGTHS = {{'targets': 128}}
TRAIN_STEPS = 1000
BATCH_SIZE = 16
INFER_EVAL = None
OPTIMIZER = 'adamw'
LEARNING_RATE = 0.0001
WARMUP_STEPS = 50
SCHEDULE = 'rsqrt'
EVAL_EVERY = 500
CHECKPOINT_EVERY = 500
"""


def write_upcycled(out: str | os.PathLike, config: Any, params: Mapping, *,
                   command: str = "python -m moe_jax.upcycle ...",
                   provenance: Mapping[str, Any] | None = None,
                   tokenizer_dir: str | os.PathLike | None = None,
                   write_safetensors: bool = False) -> Path:
  """Writes the upcycled model directory (module docstring), atomically; returns it."""
  import orbax.checkpoint as ocp
  from safetensors.numpy import save_file

  from moe_jax.checkpoints.hf import unbox
  from moe_jax.checkpoints.io import atomic_directory
  from moe_jax.checkpoints.native import PARAMS_STEM, flatten
  from moe_jax.checkpoints import orbax as checkpointing

  out = Path(out).absolute()
  params = unbox(params)
  with atomic_directory(out) as tmp:
    checkpointing.write_model_config(tmp, config)
    ckpt = checkpointing.Checkpointer(tmp, checkpointing.CheckpointConfig(
        async_save=False, save_data_iterator=False, keep=None))
    try:  # parameters only: the trainer starts from them (InitFromCheckpoint)
      ckpt.manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    finally:
      ckpt.close()
    if write_safetensors:
      save_file(flatten(params, leaf=np.ascontiguousarray),
                str(tmp / f"{PARAMS_STEM}.safetensors"))
    (tmp / GIN_FILE).write_text(finetune_gin(out, command))
    (tmp / "upcycle.json").write_text(json.dumps(dict(provenance or {}), indent=2,
                                                 sort_keys=True, default=str) + "\n")
    if tokenizer_dir is not None:
      for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.exists():
          (tmp / name).write_bytes(src.read_bytes())
  return out


def read_prompts(path: str | os.PathLike, num_experts: int,
                 tokenizer_dir: str | os.PathLike | None) -> list:
  """Expert prompts from JSON: ``[{"positive": [...], "negative": [...]}, ...]``, one per expert.

  Prompts are strings (tokenized with ``tokenizer_dir/tokenizer.json``) or
  lists of token ids.
  """
  from moe_jax.upcycle.router_init import ExpertPrompts

  path = Path(path)
  try:
    data = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: unreadable prompts file ({e})") from None
  if not isinstance(data, list) or len(data) != num_experts:
    raise CheckpointError(f"{path}: expected a list of {num_experts} objects (one per expert) "
                          f"with 'positive' (and optional 'negative') prompts")
  tokenizer = None

  def ids(prompt: Any, where: str) -> Sequence[int]:
    nonlocal tokenizer
    if isinstance(prompt, str):
      if tokenizer is None:
        from tokenizers import Tokenizer
        file = Path(tokenizer_dir or ".") / "tokenizer.json"
        if tokenizer_dir is None or not file.exists():
          raise CheckpointError(f"{path}: {where} is text but there is no tokenizer.json "
                                "(pass --tokenizer DIR, or give token ids)")
        tokenizer = Tokenizer.from_file(str(file))
      return tokenizer.encode(prompt).ids
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
      return prompt
    raise CheckpointError(f"{path}: {where} must be a string or a list of token ids")

  experts = []
  for e, entry in enumerate(data):
    if not isinstance(entry, dict) or not entry.get("positive"):
      raise CheckpointError(f"{path}: expert {e} needs a non-empty 'positive' list")
    experts.append(ExpertPrompts(
        positive=[ids(p, f"expert {e} positive[{i}]") for i, p in enumerate(entry["positive"])],
        negative=[ids(p, f"expert {e} negative[{i}]")
                  for i, p in enumerate(entry.get("negative", []))]))
  return experts
