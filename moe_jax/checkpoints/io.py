"""File-level helpers shared by checkpoint formats: atomic directories and safetensors.

Every writer in moe-jax goes through :func:`atomic_directory`: files are
written into a temporary sibling directory, which is renamed over the target
only once everything is on disk. An interrupted export leaves the previous
checkpoint (or nothing) in place, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from moe_jax.checkpoints.hf_common import CheckpointError


def current_umask() -> int:
  """The process's umask (read without changing it for long)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def apply_umask(root: str | os.PathLike) -> None:
  """Gives ``root`` and everything under it the modes a plain ``mkdir`` / ``open`` would.

  ``tempfile`` creates owner-only directories and files (0700 / 0600)
  whatever the umask; a checkpoint written through one must still be
  readable by the group on a shared cluster filesystem when the user's
  umask says so.
  """
  mask = current_umask()
  root = Path(root)
  os.chmod(root, 0o777 & ~mask)
  for parent, dirs, files in os.walk(root):
    for d in dirs:
      os.chmod(os.path.join(parent, d), 0o777 & ~mask)
    for f in files:
      path = os.path.join(parent, f)
      if not os.path.islink(path):
        os.chmod(path, 0o666 & ~mask)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes ``path`` through a temp file and a rename (readers never see half a file)."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, lock: bool = True) -> Iterator[Path]:
  """Yields a temp dir next to ``target``; on success it replaces ``target``.

  The target's lock (:mod:`moe_jax.checkpoints.lock`) is held throughout
  (``lock=False`` when the caller holds it): an export never replaces a
  directory a training is writing, nor races another export. Files and
  directories get the user's umask (:func:`apply_umask`).
  """
  target = Path(target)
  if lock:
    from moe_jax.checkpoints.lock import DirectoryLock
    with DirectoryLock(target, purpose="an export"):
      with atomic_directory(target, lock=False) as tmp:
        yield tmp
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
  try:
    yield tmp
    apply_umask(tmp)
    if target.exists():
      backup = target.parent / f".{target.name}.old-{os.getpid()}"
      os.rename(target, backup)
      os.rename(tmp, target)
      shutil.rmtree(backup, ignore_errors=True)
    else:
      os.rename(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def read_json(path: Path) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: file not found") from None
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: unreadable JSON ({e})") from None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)
    f.write("\n")


def open_safetensors(directory: Path, stem: str = "model"
                     ) -> tuple[set[str], Callable[[str], np.ndarray], str]:
  """Tensor names and a reader for ``{stem}.safetensors`` or its sharded index.

  Returns ``(names, read(name) -> np.ndarray, description)``. Tensors are read
  lazily (one at a time) so a large checkpoint never sits in memory twice.
  """
  from safetensors import SafetensorError, safe_open

  single = directory / f"{stem}.safetensors"
  index = directory / f"{stem}.safetensors.index.json"
  if index.exists():
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index}: no 'weight_map' object")
    files = {name: directory / shard for name, shard in weight_map.items()}
    source = str(index)
  elif single.exists():
    files = None
    source = str(single)
  else:
    raise CheckpointError(f"{directory}: neither {single.name} nor {index.name} found")

  handles: dict[Path, Any] = {}

  def handle(path: Path):
    if path not in handles:
      try:
        handles[path] = safe_open(str(path), framework="numpy")
      except FileNotFoundError:
        raise CheckpointError(f"{path}: shard listed in {source} not found") from None
      except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    return handles[path]

  if files is None:
    names = set(handle(single).keys())
    read = lambda name: handle(single).get_tensor(name)  # noqa: E731
  else:
    names = set(files)
    read = lambda name: handle(files[name]).get_tensor(name)  # noqa: E731
  return names, read, source


def write_safetensors(directory: Path, tensors: Mapping[str, np.ndarray], stem: str = "model",
                      max_shard_bytes: int | None = None,
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes ``{stem}.safetensors``, or shards plus an HF-style index when too large."""
  from safetensors.numpy import save_file

  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  meta = {"format": "pt", **(metadata or {})}
  total = sum(v.nbytes for v in tensors.values())
  if max_shard_bytes is None or total <= max_shard_bytes:
    save_file(tensors, str(directory / f"{stem}.safetensors"), metadata=meta)
    return
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += tensors[name].nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(directory / fname), metadata=meta)
    weight_map.update({name: fname for name in shard})
  write_json(directory / f"{stem}.safetensors.index.json",
             {"metadata": {"total_size": total}, "weight_map": weight_map})
