"""Training checkpoints with orbax: save / restore with exact resumption, and ``load_latest``.

Layout of a training ``model_dir``::

    model_dir/
      model_config.json         {"format_version", "kind", "config", "metadata"}: the model,
                                readable without orbax (moe_jax.models.registry)
      config.gin                the operative gin config (written by the CLI)
      metrics.jsonl             one JSON object per log / eval line
      train/ eval/              TensorBoard event files of those rows (train.metric_writers)
      checkpoints/<step>/
        params/                 orbax StandardSave of the (sharded) parameters
        opt_state/              orbax StandardSave of the optimizer state
        data_iterator/          DataIterator.save(): data-PPPPP-of-NNNNN.* per process

:class:`Checkpointer` wraps ``orbax.checkpoint.CheckpointManager``: saves every
N steps and at the end, keeps the last K, writes asynchronously where orbax
can (arrays are copied to host before ``save`` returns; the data iterator's
position is written synchronously, at the step it belongs to). Restoring the
three items puts the trainer exactly where it was: same parameters, same
optimizer state, same next batch (the per-step RNG is ``fold_in(seed, step)``,
so it needs no state).

:func:`load_latest` reads only the parameters of the newest (or a given)
step into a :class:`~moe_jax.checkpoints.LoadedModel`, so generation and
export work on a training directory. Partial restore into a different model
(assignment maps) is :mod:`moe_jax.checkpoints.assignment`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from moe_jax.checkpoints.layout import match_layout, match_layout_within, same_layout
from moe_jax.checkpoints.hf_common import CheckpointError
from moe_jax.checkpoints.native import CONFIG_FILE, FORMAT_VERSION, load_model_config
from moe_jax.models import registry

CHECKPOINTS_DIR = "checkpoints"
ORBAX_FORMAT = "orbax"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
  """When and how training checkpoints are written and restored.

  Attributes:
    save_every: save every this many steps (``None``: only at the end).
    keep: keep the newest ``keep`` checkpoints (``None``: all).
    async_save: write in the background where orbax supports it.
    save_data_iterator: store the input pipeline's position with each step.
    restore: resume from the newest checkpoint in ``model_dir`` if there is one.
  """

  save_every: int | None = 1000
  keep: int | None = 3
  async_save: bool = True
  save_data_iterator: bool = True
  restore: bool = True

  def __post_init__(self):
    if self.save_every is not None and self.save_every < 1:
      raise ValueError(f"CheckpointConfig.save_every must be >= 1 or None, got {self.save_every}")
    if self.keep is not None and self.keep < 1:
      raise ValueError(f"CheckpointConfig.keep must be >= 1 or None, got {self.keep}")


# ----------------------------------------------------------------------------- model config


def write_model_config(model_dir: str | os.PathLike, config: Any) -> Path:
  """Writes ``model_config.json`` (kind + config) into a training directory (process 0)."""
  model_dir = Path(model_dir)
  file = model_dir / CONFIG_FILE
  if jax.process_index() != 0:
    return file
  model_dir.mkdir(parents=True, exist_ok=True)
  data = {"format_version": FORMAT_VERSION, "kind": registry.kind_of(config),
          "config": registry.config_to_dict(config),
          "metadata": {"checkpoint_format": ORBAX_FORMAT, "checkpoints_dir": CHECKPOINTS_DIR}}
  from moe_jax.checkpoints.io import write_text_atomic

  write_text_atomic(file, json.dumps(data, indent=2, sort_keys=True) + "\n")
  return file


OPERATIVE_CONFIG_FILE = "config.gin"


def _has_checkpoints(model_dir: Path) -> bool:
  ckpts = model_dir / CHECKPOINTS_DIR
  return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())


def _diff(old: str, new: str, old_name: str, new_name: str) -> str:
  lines = difflib.unified_diff(old.splitlines(), new.splitlines(), old_name, new_name,
                               lineterm="", n=1)
  return "\n".join(list(lines)[:60])


#: Operative-config lines a resumed run may change: the training length (training
#: longer continues the run) and how the block stack is computed (remat, scanned or
#: unrolled layers: the restore relays the checkpoint out, layout.py).
_MAY_CHANGE = re.compile(r"\s*(TRAIN_STEPS|TrainerConfig\.num_train_steps|"
                         r"[\w.]+\.(scan_layers|remat_policy))\s*=")
#: Model-config fields that change how a model is computed, not what it is.
_STACK_OPTIONS = ("scan_layers", "remat_policy")


def _model_identity(config: Any) -> Any:
  """A model-config dict without its stack options (at any nesting: CALM's LMs)."""
  if isinstance(config, dict):
    return {k: _model_identity(v) for k, v in config.items() if k not in _STACK_OPTIONS}
  if isinstance(config, list):
    return [_model_identity(v) for v in config]
  return config


def _comparable(text: str) -> list[str]:
  return [line.rstrip() for line in text.strip().splitlines() if not _MAY_CHANGE.match(line)]


def check_run_compatible(model_dir: str | os.PathLike, config: Any,
                         operative_config: str | None = None) -> None:
  """Refuses, before anything is written, a run that does not match ``model_dir``'s run.

  A directory with checkpoints belongs to its run: its ``model_config.json``
  must describe the same model, and its ``config.gin`` (when both runs come
  from gin) must be the same config, but for the training length
  (``TRAIN_STEPS``: a rerun may train longer) and the stack options
  (``scan_layers``, ``remat_policy``: the restore converts the layout).
  Raises ``CheckpointError`` with a diff.
  (Optimizer-tree and data-feature mismatches are caught by the restore,
  which also runs before anything is written.)
  """
  model_dir = Path(model_dir)
  if not _has_checkpoints(model_dir):
    return
  file = model_dir / CONFIG_FILE
  if file.exists():
    from moe_jax.checkpoints.io import read_json
    old = read_json(file)
    new = json.loads(json.dumps({"kind": registry.kind_of(config),  # tuples -> lists
                                 "config": registry.config_to_dict(config)}))
    old = {"kind": old.get("kind"), "config": old.get("config")}
    if _model_identity(old) != _model_identity(new):
      dump = lambda d: json.dumps(d, indent=1, sort_keys=True, default=str)  # noqa: E731
      raise CheckpointError(
          f"{model_dir}: holds checkpoints of another model; this run's model differs "
          f"from {file.name}:\n{_diff(dump(old), dump(new), 'existing', 'this run')}\n"
          "Use a new --model_dir (start from the old run with InitFromCheckpoint if "
          "intended). Nothing was changed.")
  gin_file = model_dir / OPERATIVE_CONFIG_FILE
  if operative_config is not None and gin_file.exists():
    old_text = gin_file.read_text()
    if _comparable(old_text) != _comparable(operative_config):
      raise CheckpointError(
          f"{model_dir}: its run was configured differently ({gin_file.name}):\n"
          f"{_diff(old_text, operative_config, 'existing', 'this run')}\n"
          "Re-run with the same flags to resume, or use a new --model_dir (to continue from "
          f"these weights with a new config, start from them with InitFromCheckpoint, or "
          f"delete {gin_file} to accept the new config). Nothing was changed.")


def write_run_files(model_dir: str | os.PathLike, config: Any,
                    operative_config: str | None = None) -> None:
  """Writes ``model_config.json`` and ``config.gin`` (atomically, process 0)."""
  from moe_jax.checkpoints.io import write_text_atomic

  write_model_config(model_dir, config)
  if operative_config and operative_config.strip() and jax.process_index() == 0:
    write_text_atomic(Path(model_dir) / OPERATIVE_CONFIG_FILE, operative_config)


def is_training_dir(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a training ``model_dir`` (model_config.json + orbax checkpoints)."""
  path = Path(path)
  return (path / CONFIG_FILE).exists() and (path / CHECKPOINTS_DIR).is_dir()


def read_model_config(path: str | os.PathLike) -> Any:
  """The model config of an HF directory, a ``save_model`` directory, a training dir or a
  Hugging Face Hub id."""
  from moe_jax.checkpoints.hf import converter_for
  from moe_jax.checkpoints.hub import resolve_checkpoint
  from moe_jax.checkpoints.io import read_json

  path = resolve_checkpoint(path)  # a local path, or a Hub id's cached snapshot
  if (path / CONFIG_FILE).exists():
    return load_model_config(path)[1]
  if (path / "config.json").exists():
    hf = read_json(path / "config.json")
    return converter_for(hf, str(path / "config.json")).config_from_hf(hf)
  raise CheckpointError(f"{path}: no model_config.json (moe-jax) or config.json (Hugging Face)")


# ----------------------------------------------------------------------------- data iterator item


class DataIteratorHandler(ocp.CheckpointHandler):
  """Orbax handler for ``moe_jax.data.pipeline.DataIterator`` (anything with save/restore).

  Every process writes its own files (the iterator names them by process).
  """

  def save(self, directory, args: "DataIteratorSave"):
    args.iterator.save(os.fspath(directory))

  def restore(self, directory, args: "DataIteratorRestore" = None):
    if args is None or args.iterator is None:
      raise ValueError("restoring a data iterator needs the iterator to restore into")
    args.iterator.restore(os.fspath(directory))
    return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


# ----------------------------------------------------------------------------- checkpointer


class Checkpointer:
  """Saves and restores ``(params, opt_state, data_iterator)`` under ``model_dir/checkpoints``."""

  def __init__(self, model_dir: str | os.PathLike, config: CheckpointConfig = CheckpointConfig()):
    self.model_dir = Path(model_dir).absolute()
    self.config = config
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep, enable_async_checkpointing=config.async_save, create=True,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.model_dir / CHECKPOINTS_DIR, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    every = self.config.save_every
    return every is not None and step % every == 0

  def save(self, step: int, *, params: Any, opt_state: Any, data_iterator: Any = None,
           force: bool = False) -> bool:
    """Saves step ``step`` (asynchronously if configured); returns whether it saved."""
    items = {"params": ocp.args.StandardSave(params),
             "opt_state": ocp.args.StandardSave(opt_state)}
    if data_iterator is not None and self.config.save_data_iterator:
      if not hasattr(data_iterator, "save"):
        raise TypeError(f"{type(data_iterator).__name__} has no save(directory); set "
                        "CheckpointConfig.save_data_iterator = False to skip it")
      items["data_iterator"] = DataIteratorSave(data_iterator)
    if step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, *, abstract_params: Any, abstract_opt_state: Any | None = None,
              data_iterator: Any = None, step: int | None = None) -> dict[str, Any]:
    """Restores a step (default the newest) onto the shardings of the abstract trees.

    Returns ``{"step", "params", "opt_state"?}``; ``data_iterator`` is
    restored in place when given and the checkpoint has its state.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"{self.model_dir / CHECKPOINTS_DIR}: no checkpoint to restore")
    if step not in self.manager.all_steps():
      raise CheckpointError(f"{self.model_dir / CHECKPOINTS_DIR}: no step {step}; "
                            f"have {self.all_steps()}")
    step_dir = self.model_dir / CHECKPOINTS_DIR / str(step)
    target_params, target_opt_state = abstract_params, abstract_opt_state
    stored = _stored_params_tree(step_dir)
    relayout = stored is not None and not same_layout(stored, abstract_params)
    if relayout:  # restore in the checkpoint's layout, then convert (layout.py)
      abstract_params = match_layout(target_params, stored)
      if target_opt_state is not None:
        abstract_opt_state = match_layout_within(target_opt_state, target_params, stored)
    items = {"params": ocp.args.StandardRestore(abstract_params)}
    if abstract_opt_state is not None:
      if not (step_dir / "opt_state").is_dir():
        raise CheckpointError(
            f"{step_dir}: the checkpoint has parameters but no optimizer state (e.g. an "
            "upcycled model at step 0); train into another model_dir and start from it "
            "with InitFromCheckpoint (runs/finetune.gin)")
      items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    if data_iterator is not None and self.config.save_data_iterator:
      if not (step_dir / "data_iterator").is_dir():
        raise CheckpointError(f"{step_dir}: the checkpoint has no data_iterator state; resume "
                              "with CheckpointConfig.save_data_iterator = False to restart the "
                              "data from its beginning")
      items["data_iterator"] = DataIteratorRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"{step_dir}: cannot restore into this model/optimizer ({e})") from e
    out = {"step": step, "params": restored["params"]}
    if abstract_opt_state is not None:
      out["opt_state"] = restored["opt_state"]
    if relayout:
      out["params"] = _placed_like(match_layout(out["params"], target_params),
                                   target_params)
      if "opt_state" in out:
        converted = match_layout_within(out["opt_state"], abstract_params, target_params)
        out["opt_state"] = _placed_like(converted, target_opt_state)
    return out

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _stored_params_tree(step_dir: Path) -> Any:
  """The key structure of a step's stored parameters (``None`` if orbax cannot say)."""
  try:
    meta = ocp.StandardCheckpointHandler().metadata(step_dir / "params")
  except (FileNotFoundError, ValueError, KeyError, TypeError, OSError):
    return None
  tree = getattr(meta, "tree", meta)
  return tree if isinstance(tree, dict) else None


def _placed_like(tree: Any, abstract: Any) -> Any:
  """``tree``'s arrays put on the shardings of ``abstract`` (a relaid-out restore)."""
  def put(x, a):
    sharding = getattr(a, "sharding", None)
    return x if sharding is None else jax.device_put(x, sharding)
  return jax.tree.map(put, tree, abstract)


def _single_device_abstract(shapes: Any) -> Any:
  dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), shapes)


def load_latest(model_dir: str | os.PathLike, *, step: int | None = None,
                dtype: str | None = None):
  """Parameters of a training directory's newest (or given) step as a ``LoadedModel``.

  Args:
    model_dir: a training ``model_dir`` (see the module docstring).
    step: a specific checkpoint step; default the newest.
    dtype: cast parameters to ``float32``/``bfloat16``/``float16`` (and set the
      config's ``param_dtype``).
  """
  from moe_jax.checkpoints.hf import _NP_DTYPES, LoadedModel

  model_dir = Path(model_dir)
  if not is_training_dir(model_dir):
    raise CheckpointError(f"{model_dir}: not a training directory (needs {CONFIG_FILE} and "
                          f"{CHECKPOINTS_DIR}/)")
  kind, config = load_model_config(model_dir)
  module = registry.build_module(config, kind)
  shapes = registry.param_shapes(module, kind)
  ckpt = Checkpointer(model_dir, CheckpointConfig(async_save=False))
  try:
    restored = ckpt.restore(abstract_params=_single_device_abstract(shapes), step=step)
  finally:
    ckpt.close()
  params = jax.tree.map(np.asarray, restored["params"])
  if dtype is not None:
    if dtype not in _NP_DTYPES:
      raise CheckpointError(f"unsupported parameter dtype {dtype!r}; use one of "
                            f"{sorted(_NP_DTYPES)}")
    params = jax.tree.map(lambda x: x.astype(_NP_DTYPES[dtype]), params)
    config = dataclasses.replace(config, param_dtype=dtype)
    module = registry.build_module(config, kind)
  tok = str(model_dir) if (model_dir / "tokenizer.json").exists() else None
  return LoadedModel(config=config, module=module, params=params,
                     source=f"{model_dir}@step{restored['step']}", tokenizer_dir=tok)
