"""An exclusive lock on a model directory, held for the life of a training or an export.

Two runs pointed at one ``model_dir`` would interleave their checkpoints,
``config.gin`` and ``metrics.jsonl``; the second one must stop before it
touches anything. The lock is a file next to the directory,
``<model_dir>.lock`` (a sibling, so an export that replaces the whole
directory and a training inside it exclude each other), created with
``O_CREAT | O_EXCL``: atomic on local filesystems and on NFSv3+ / Lustre /
GCS-fuse style network mounts, where ``flock`` is often a no-op. It holds a
JSON line naming the holder (host, pid, user, command, start time).

A lock left by a killed process (SIGKILL, a lost node) stays on disk. When
the holder ran on this host and its pid is gone, the error says the lock is
stale; from another host we cannot tell, so the error gives the holder and
the lock's age. Either way the message says how to clear it (remove the
file), and nothing is removed automatically: a live run on another host must
never lose its lock to a guess.

Multi-process jobs take the lock on process 0 only (see
:func:`model_dir_lock`); the other processes learn the outcome from it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import getpass
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from moe_jax.checkpoints.hf_common import CheckpointError


class LockedError(CheckpointError):
  """Another run holds the model directory's lock (the message names it)."""


def lock_path(directory: str | os.PathLike) -> Path:
  """``<directory>.lock``, next to the directory."""
  directory = Path(os.path.abspath(os.fspath(directory)))
  return directory.with_name(directory.name + ".lock")


def _holder() -> dict:
  try:
    user = getpass.getuser()
  except Exception:  # pylint: disable=broad-except
    user = "?"
  return {"host": socket.gethostname(), "pid": os.getpid(), "user": user,
          "command": " ".join(sys.argv)[:500],
          "started": datetime.datetime.now().isoformat(timespec="seconds")}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _describe(path: Path) -> str:
  try:
    info = json.loads(path.read_text() or "{}")
  except (OSError, ValueError):
    info = {}
  try:
    age = time.time() - path.stat().st_mtime
  except OSError:
    age = None
  who = (f"pid {info.get('pid', '?')} on {info.get('host', '?')} (user {info.get('user', '?')}, "
         f"since {info.get('started', '?')}"
         + (f", {age / 60:.0f} min ago" if age is not None else "") + ")")
  if info.get("command"):
    who += f": {info['command']}"
  stale = (info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int)
           and not _pid_alive(info["pid"]))
  if stale:
    return (f"a stale lock {path} from {who}, which is no longer running; if no other run "
            f"uses this directory, remove it (rm {path}) and retry")
  return (f"it is in use by {who}; wait for that run to finish, or if it was killed, remove "
          f"the lock (rm {path}) and retry")


class DirectoryLock:
  """The exclusive lock of one directory (see the module docstring)."""

  def __init__(self, directory: str | os.PathLike, purpose: str = "training"):
    self.directory = Path(directory)
    self.path = lock_path(directory)
    self.purpose = purpose
    self._held = False

  def acquire(self) -> "DirectoryLock":
    """Takes the lock or raises :class:`LockedError` naming the holder."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
      raise LockedError(f"{self.directory}: cannot start {self.purpose}: "
                        f"{_describe(self.path)}") from None
    except OSError as e:
      if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        raise LockedError(f"{self.directory}: cannot create the lock {self.path} "
                          f"({e.strerror}); is the directory writable?") from None
      raise
    with os.fdopen(fd, "w") as f:
      f.write(json.dumps({**_holder(), "purpose": self.purpose}) + "\n")
    self._held = True
    return self

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    with contextlib.suppress(FileNotFoundError):
      os.unlink(self.path)

  def __enter__(self) -> "DirectoryLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


@contextlib.contextmanager
def model_dir_lock(directory: str | os.PathLike | None, purpose: str = "training"
                   ) -> Iterator[DirectoryLock | None]:
  """Holds ``directory``'s lock (process 0) for the body; ``None`` directory: no lock.

  In a multi-process job process 0 takes the lock and tells the others
  whether it got it, so every process stops with the same error.
  """
  if directory is None:
    yield None
    return
  import jax  # pylint: disable=g-import-not-at-top

  lock = DirectoryLock(directory, purpose)
  error = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except LockedError as e:
      error = e
  if jax.process_count() > 1:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if error is None and int(failed):
      error = LockedError(f"{directory}: process 0 could not lock it (see its error)")
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    lock.release()
