"""Gin at the edge: every configurable name, and the gin command-line plumbing, live here.

Library code is plain Python (frozen keyword-only dataclasses and functions);
this module registers them with gin under short names and turns command-line
flags into a parsed config. Nothing else in moe-jax imports gin.

Registered (use them in ``gin_configs/``; the module prefix is optional)::

    models.DecoderConfig  models.T5Config  models.RopeScaling  models.MoeDecoderConfig
    models.MoeConfig  models.BamDecoderConfig  models.AttentionMixtureConfig
    train.DecoderOnlyModel  train.EncoderDecoderModel  train.model_for_config
    train.model_from_checkpoint  train.LossConfig  train.OptimizerConfig
    train.ScheduleConfig  train.PartitionerConfig  train.DistributedConfig
    train.TrainerConfig  train.DatasetConfig  train.CheckpointConfig
    train.InitFromCheckpoint  train.InferEvalConfig
    peft.trainable_mask                               (a mask function for train.trainable)
    peft.PeftConfig  peft.adapted_model               (adapters on a model wrapper)
    train  evaluate                                   (moe_jax.train.run's entry points;
                                                      train writes config.gin into model_dir)
    calm.composition_config_from_checkpoints  calm.init_from_checkpoints
    calm.trainable_mask  calm.kv_task                 (CALM composition training: registered
                                                      by the calm_jax plugin, moe_jax.plugins)

Registration wraps each class in a factory with the class's own signature,
so gin checks parameter names when it parses (a typo is an error naming the
file and line) and the objects built are instances of the real classes (no
gin subclasses leak into checkpoints or equality checks).

Command line (shared by ``python -m moe_jax.train``, ``eval`` and ``plan``)::

    --gin_file=FILE            repeatable; searched in --gin_search_paths and gin_configs/
    --gin.NAME=VALUE           repeatable; a gin binding ``NAME = VALUE`` (t5x style:
                               strings need quotes, --gin.MODEL_DIR=\\"/tmp/x\\")
    --gin_bindings='A.b = 1'   repeatable; raw gin bindings
    --gin_search_paths=a,b     extra include / gin_file search directories
    --model_dir=DIR            binds the MODEL_DIR macro (no quoting needed)
    --coordinator_address, --process_count, --process_id   multi-host (jax.distributed)
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import gin

#: The repository's gin_configs/ directory (always on the search path when present).
GIN_CONFIGS_DIR = Path(__file__).resolve().parents[2] / "gin_configs"

_REGISTERED: dict[Any, Callable] = {}


class GinConfigError(ValueError):
  """A gin file or binding is wrong (the message names the file and line)."""


def _factory(target: Callable, name: str, before: Callable | None = None) -> Callable:
  """A function with ``target``'s signature that calls it (gin validates its parameters).

  ``before(kwargs)``, if given, runs first (with gin's bindings resolved).
  """
  def make(*args, **kwargs):
    if before is not None:
      before(kwargs)
    return target(*args, **kwargs)
  make.__signature__ = inspect.signature(target)
  make.__name__ = make.__qualname__ = name
  make.__doc__ = target.__doc__
  return make


def _register(target: Callable, module: str, name: str | None = None,
              before: Callable | None = None) -> None:
  name = name or target.__name__
  if target in _REGISTERED:
    return
  _REGISTERED[target] = gin.external_configurable(_factory(target, name, before), name=name,
                                                  module=module)


def _pass_operative_config_to_run(kwargs: dict[str, Any]) -> None:
  """Hands gin's operative config to a gin-configured ``train``.

  ``train`` writes it to ``model_dir/config.gin`` only once it has checked
  that the directory's run (if any) is compatible, and refuses a changed
  config for an existing run with a diff (nothing is written here).
  """
  if kwargs.get("model_dir") is not None and kwargs.get("operative_config") is None:
    kwargs["operative_config"] = gin.operative_config_str()


def register_all() -> None:
  """Registers every configurable (idempotent)."""
  from moe_jax.checkpoints import assignment, orbax
  from moe_jax.models.decoder import DecoderConfig
  from moe_jax.models.t5 import T5Config
  from moe_jax.nn.embeddings import RopeScaling
  from moe_jax.train import evaluation, losses, optimizers, partitioner, run, trainer, wrappers

  for cls in (DecoderConfig, T5Config, RopeScaling):
    _register(cls, "models")
  for module, names in (("moe_jax.models.moe_decoder", ("MoeDecoderConfig",)),
                        ("moe_jax.moe.layer", ("MoeConfig",)),
                        ("moe_jax.models.bam_decoder", ("BamDecoderConfig",)),
                        ("moe_jax.moe.attention_mixture", ("AttentionMixtureConfig",))):
    try:  # model families that may not be importable in every checkout
      mod = importlib.import_module(module)
    except ImportError:
      continue
    for name in names:
      if hasattr(mod, name):
        _register(getattr(mod, name), "models")
  for fn in (wrappers.DecoderOnlyModel, wrappers.EncoderDecoderModel, wrappers.model_for_config,
             wrappers.model_from_checkpoint, losses.LossConfig, optimizers.OptimizerConfig,
             optimizers.ScheduleConfig, partitioner.PartitionerConfig,
             partitioner.DistributedConfig, trainer.TrainerConfig, trainer.DatasetConfig,
             orbax.CheckpointConfig, assignment.InitFromCheckpoint,
             evaluation.InferEvalConfig):
    _register(fn, "train")
  _register(run.train, "train", "train", before=_pass_operative_config_to_run)
  _register(run.evaluate, "train", "evaluate")
  try:
    from moe_jax import peft
    if hasattr(peft, "trainable_mask"):
      _register(peft.trainable_mask, "peft", "trainable_mask")
    if hasattr(peft, "PeftConfig"):
      _register(peft.PeftConfig, "peft")
    if hasattr(peft, "adapted_model"):
      _register(peft.adapted_model, "peft", "adapted_model")
  except ImportError:
    pass
  from moe_jax import plugins
  for module, paths in plugins.configurables().items():  # e.g. calm.* (calm_jax.plugin)
    for path in paths:
      _register(plugins.resolve(path), module)


def configured(fn: Callable) -> Callable:
  """The gin-configured version of a registered function or class."""
  register_all()
  try:
    return _REGISTERED[fn]
  except KeyError:
    raise KeyError(f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)} is not "
                   "a registered configurable (see moe_jax.cli.configurables.register_all)"
                   ) from None


def run(fn: Callable, **kwargs: Any) -> Any:
  """Calls ``fn`` with its gin bindings (plus ``kwargs``)."""
  return configured(fn)(**kwargs)


# ----------------------------------------------------------------------------- parsing


def search_paths(extra: Sequence[str] = ()) -> list[str]:
  paths = [p for p in extra if p]
  if GIN_CONFIGS_DIR.is_dir():
    paths.append(str(GIN_CONFIGS_DIR))
  return paths


def _resolve(file: str, paths: Sequence[str], parent: Path | None = None) -> Path | None:
  candidates = [Path(file)]
  if parent is not None:
    candidates.append(parent / file)
  candidates += [Path(p) / file for p in paths]
  for c in candidates:
    if c.is_file():
      return c
  return None


def _sources(files: Sequence[str], paths: Sequence[str]) -> list[tuple[Path, list[str]]]:
  """Every gin file read (includes followed), with its lines."""
  seen: list[tuple[Path, list[str]]] = []
  stack = [(f, None) for f in reversed(files)]
  while stack:
    file, parent = stack.pop()
    path = _resolve(file, paths, parent)
    if path is None or any(path == p for p, _ in seen):
      continue
    lines = path.read_text().splitlines()
    seen.append((path, lines))
    for line in reversed(lines):
      m = re.match(r"\s*include\s+['\"](.+)['\"]", line)
      if m:
        stack.append((m.group(1), path.parent))
  return seen


def _undefined_macro_error(message: str, files, bindings, paths) -> str | None:
  m = re.search(r"No bindings specified for '([^']+)/gin\.macro'", message)
  if not m:
    return None
  macro = m.group(1)
  where = []
  pattern = re.compile(r"%" + re.escape(macro) + r"\b")
  for path, lines in _sources(files, paths):
    where += [f'  In file "{path}", line {i + 1}\n    {line.strip()}'
              for i, line in enumerate(lines) if pattern.search(line)]
  for i, b in enumerate(bindings):
    if pattern.search(b):
      where.append(f"  In binding {i + 1}: {b}")
  hint = " (pass --model_dir)" if macro == "MODEL_DIR" else ""
  return (f"gin macro {macro} is used but never defined; bind it in a gin file or with "
          f"--gin.{macro}=VALUE{hint}.\n" + "\n".join(where))


def _macro_references(value: Any, out: set[str]) -> None:
  """Adds the names of the macros ``value`` (a parsed gin value) refers to."""
  if isinstance(value, gin.config.ConfigurableReference):
    selector = value.scoped_selector
    if selector.endswith("/gin.macro"):
      out.add(selector[:-len("/gin.macro")])
  elif isinstance(value, dict):
    for k, v in value.items():
      _macro_references(k, out)
      _macro_references(v, out)
  elif isinstance(value, (list, tuple, set)):
    for v in value:
      _macro_references(v, out)


def _unused_macros_error(files, bindings, paths, allow_unused=()) -> str | None:
  """An error naming every macro that is defined but never used (a typo, e.g. TRAIN_STEPZ).

  gin accepts ``NAME = VALUE`` for any NAME: a mistyped macro would be
  silently ignored, and the run would use the default it meant to change. A
  macro that some file or binding refers to (``%NAME``) is not a typo, even when
  a later binding replaced the one that referred to it (e.g. a shipped default
  ``INFER_NUM_EXAMPLES`` after ``--gin.InferEvalConfig.num_examples=8``).
  """
  config = gin.config._CONFIG  # pylint: disable=protected-access
  defined, used = [], set()
  for (scope, selector), params in config.items():
    if selector == "gin.macro":
      defined.append(scope)
    for v in params.values():
      _macro_references(v, used)
  unused = set(defined) - used - set(allow_unused)
  sources = _sources(files, paths)
  if unused:  # a reference a later binding overrode still counts: a typo is referenced nowhere
    text = "\n".join([*("\n".join(lines_) for _, lines_ in sources), *bindings])
    unused = {m for m in unused if not re.search(r"%" + re.escape(m) + r"\b", text)}
  unused = sorted(unused)
  if not unused:
    return None
  lines = []
  for macro in unused:
    pattern = re.compile(r"\s*" + re.escape(macro) + r"\s*=")
    where = [f'In file "{path}", line {i + 1}: {line.strip()}'
             for path, lines_ in sources for i, line in enumerate(lines_) if pattern.match(line)]
    where += [f"on the command line (--gin.{macro}=... / --gin_bindings): {b.strip()}"
              for b in bindings if pattern.match(b)]
    close = difflib.get_close_matches(macro, sorted(used), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    lines.append(f"gin macro {macro} is set but never used{hint}\n  "
                 + ("\n  ".join(where) or "(set by a binding)"))
  return ("every gin binding must be used (a mistyped name would be ignored):\n"
          + "\n".join(lines))


class _GinProbeFilter(logging.Filter):
  """Drops gin's per-candidate file-probe messages ("Path not found" is not an error)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.pathname.endswith(os.path.join("gin", "resource_reader.py"))
                and record.levelno <= logging.ERROR)


def _quiet_gin_probes() -> None:
  """Silences gin's file probing and makes its Python-package probe exception-safe.

  gin looks for ``include 'models/x.gin'`` as a file, then as ``x.gin`` inside
  an importable Python package ``models``; a *namespace* package of that name
  (any ``models/`` directory on ``sys.path``) makes that probe raise a
  TypeError instead of answering "no". The safe probe answers "no", so the
  search goes on to the search paths.
  """
  root = logging.getLogger()
  if not any(isinstance(f, _GinProbeFilter) for f in root.filters):
    root.addFilter(_GinProbeFilter())
  from gin import config as gin_config

  readers = gin_config._FILE_READERS  # pylint: disable=protected-access
  for i, (reader, exists) in enumerate(readers):
    if getattr(exists, "__name__", "") == "system_path_file_exists":
      def safe(path, _exists=exists):
        try:
          return _exists(path)
        except Exception:  # pylint: disable=broad-except
          return False
      safe.__name__ = "safe_system_path_file_exists"
      readers[i] = (reader, safe)


def parse_gin(files: Sequence[str], bindings: Sequence[str] = (),
              extra_search_paths: Sequence[str] = (), *, finalize: bool = True,
              allow_unused: Sequence[str] = ()) -> None:
  """Clears gin and parses ``files`` then ``bindings``; errors name file and line.

  With ``finalize`` (a complete config), every macro set must be used
  somewhere (else a typo such as ``--gin.TRAIN_STEPZ=3`` would be ignored),
  except those in ``allow_unused``.
  """
  register_all()
  _quiet_gin_probes()
  paths = search_paths(extra_search_paths)
  gin.clear_config()
  for p in paths:
    gin.add_config_file_search_path(p)
  resolved = []
  for f in files:
    path = _resolve(f, paths)
    if path is None:
      raise GinConfigError(f"gin file {f!r} not found (searched the current directory and "
                           f"{paths})")
    resolved.append(str(path))
  try:
    gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=False)
    if finalize:  # a complete config (a lone component file may set macros for others)
      unused = _unused_macros_error(resolved, bindings, paths, allow_unused)
      if unused:
        raise GinConfigError(unused)
      gin.finalize()
  except (ValueError, TypeError, SyntaxError) as e:  # gin's ParseError is a SyntaxError
    message = str(e)
    better = _undefined_macro_error(message, resolved, bindings, paths)
    raise GinConfigError(better or message) from None
  except IOError as e:
    raise GinConfigError(str(e)) from None


def write_operative_config(model_dir: str | Path, name: str = "config.gin") -> Path | None:
  """Writes gin's operative config (the bindings actually used) to ``model_dir/name``."""
  import jax

  if jax.process_index() != 0:
    return None
  text = gin.operative_config_str()
  if not text.strip():
    return None
  from moe_jax.checkpoints.io import write_text_atomic

  path = Path(model_dir) / name
  path.parent.mkdir(parents=True, exist_ok=True)
  write_text_atomic(path, text)
  return path


# ----------------------------------------------------------------------------- flags


def parse_flags(argv: Sequence[str] | None, *, prog: str, checkpoint_flag: bool = False,
                description: str | None = None) -> argparse.Namespace:
  """Parses the shared gin / multi-host flags (see the module docstring)."""
  import sys

  argv = list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(prog=prog, description=description or __doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  p.add_argument("--gin_bindings", action="append", default=[], help="gin binding (repeatable)")
  p.add_argument("--gin_search_paths", action="append", default=[],
                 help="comma-separated gin search directories (repeatable)")
  p.add_argument("--model_dir", default=None, help="binds MODEL_DIR")
  if checkpoint_flag:
    p.add_argument("--checkpoint", default=None, help="binds CHECKPOINT_PATH")
  p.add_argument("--coordinator_address", default=None, help="multi-host: host:port of process 0")
  p.add_argument("--process_count", type=int, default=None, help="multi-host: number of processes")
  p.add_argument("--process_id", type=int, default=None, help="multi-host: this process's rank")
  p.add_argument("--verbose", action="store_true",
                 help="print tracebacks with errors (default: one 'error: ...' line)")
  p.add_argument("--no_tpu_auto_detect", action="store_true",
                 help="do not call jax.distributed.initialize() on TPU pods automatically")
  args, rest = p.parse_known_args(argv)
  gin_flags = []
  for i, item in enumerate(rest):
    m = re.fullmatch(r"--gin\.([A-Za-z_][\w./]*)=(.*)", item, flags=re.S)
    if not m:
      if item.startswith("--gin."):
        raise GinConfigError(f"flag {item!r}: expected --gin.NAME=VALUE")
      raise GinConfigError(f"unrecognised argument {item!r} (see {prog} --help)")
    gin_flags.append(f"{m.group(1)} = {m.group(2)}")
  bindings = list(args.gin_bindings) + gin_flags
  if args.model_dir:
    bindings.append(f"MODEL_DIR = {str(args.model_dir)!r}")
  if checkpoint_flag and args.checkpoint:
    bindings.append(f"CHECKPOINT_PATH = {str(args.checkpoint)!r}")
  args.bindings = bindings
  args.search_paths = [s for item in args.gin_search_paths for s in item.split(",") if s]
  if not args.gin_file:
    raise GinConfigError("give at least one --gin_file (e.g. "
                         "--gin_file=experiments/decoder_tiny_lm.gin)")
  return args


def setup(args: argparse.Namespace) -> None:
  """Multi-host initialisation (before anything touches jax devices), then gin parsing."""
  from moe_jax.train.partitioner import DistributedConfig, initialize_distributed

  try:
    initialize_distributed(DistributedConfig(
        coordinator_address=args.coordinator_address, process_count=args.process_count,
        process_id=args.process_id, auto_detect=not args.no_tpu_auto_detect))
  except ValueError as e:
    raise GinConfigError(str(e)) from None
  parse_gin(args.gin_file, args.bindings, args.search_paths)
