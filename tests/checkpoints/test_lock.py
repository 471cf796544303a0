"""The model_dir lock, umask-following exports, the atomic run files and the metrics rows."""

import errno
import json
import os
import socket
import stat

import pytest

from moe_jax.checkpoints import io, lock
from moe_jax.cli import errors
from moe_jax.train.trainer import MetricsWriter


def test_a_second_holder_is_refused_with_the_holder_named(tmp_path):
  d = tmp_path / "run"
  with lock.DirectoryLock(d) as held:
    assert held.path == tmp_path / "run.lock"
    info = json.loads(held.path.read_text())
    assert info["pid"] == os.getpid()
    with pytest.raises(lock.LockedError, match=rf"in use by pid {os.getpid()} on .*rm {d}.lock"):
      lock.DirectoryLock(d).acquire()
    with pytest.raises(lock.LockedError, match="cannot start an export"):  # export vs training
      with io.atomic_directory(d):
        pass
  assert not (tmp_path / "run.lock").exists()
  with lock.DirectoryLock(d):  # free again
    pass


def test_a_stale_lock_is_reported_with_how_to_clear_it(tmp_path):
  d = tmp_path / "run"
  child = os.fork()
  if child == 0:
    os._exit(0)
  os.waitpid(child, 0)  # a pid that no longer runs
  holder = {"host": socket.gethostname(), "pid": child, "user": "x", "command": "python -m x"}
  (tmp_path / "run.lock").write_text(json.dumps(holder))
  with pytest.raises(lock.LockedError, match=rf"stale lock .*pid {child}.*rm {d}.lock"):
    lock.DirectoryLock(d).acquire()
  assert (tmp_path / "run.lock").exists()  # never removed behind the user's back


def test_exports_follow_the_umask(tmp_path):
  old = os.umask(0o022)
  try:
    with io.atomic_directory(tmp_path / "out") as tmp:
      (tmp / "sub").mkdir()
      (tmp / "sub" / "w.bin").write_bytes(b"x")
  finally:
    os.umask(old)
  mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
  assert mode(tmp_path / "out") == 0o755  # was 0700: tempfile.mkdtemp's owner-only mode
  assert mode(tmp_path / "out" / "sub") == 0o755
  assert mode(tmp_path / "out" / "sub" / "w.bin") == 0o644


def test_metrics_keep_one_row_per_step_after_a_resume(tmp_path):
  w = MetricsWriter(tmp_path, echo=False)
  for step in (0, 1, 2, 3, 4):
    w.write(step, "train", {"loss": float(step)})
  w.drop_rows_after(2)  # resumed from the checkpoint of step 2
  w.write(3, "train", {"loss": 30.0})
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in rows] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]


def test_a_full_disk_is_one_line():
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/3/params/x")
    except OSError as e:
      raise RuntimeError("asyncio task failed") from e
  except RuntimeError as e:
    text = errors.message(e)
  assert "\n" not in text
  assert text.startswith("no space left on device writing /ckpt/3/params/x")
  assert "checkpoints saved before are kept" in text
