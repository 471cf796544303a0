"""Process set-up for CPU runs: glibc allocator tuning.

XLA:CPU allocates each step's scratch buffer (about 116 MB for a small
decoder's LoRA step) on a worker thread. glibc serves a block that size with
``mmap`` and hands it back with ``munmap`` after every call, so every step pays
for zeroed pages again: about 29,000 page faults and 50-60 ms of kernel time
per ~130 ms step, measured with ``strace`` and ``getrusage``. Keeping freed
memory in one heap instead (one arena, no ``mmap`` for large blocks, a high
trim threshold) brings that to a few hundred faults per step.

The settings are process-wide, so the library never applies them on import.
The entry points that compute on CPU (the ``python -m`` mains, the benchmarks,
the experiments and the test suite) call :func:`tune_cpu_allocator` first
thing; notebook users may do the same::

    import moe_jax.runtime
    moe_jax.runtime.tune_cpu_allocator()   # before jax (or torch) runs anything
    import jax

The call is a no-op off Linux/glibc, and it leaves the allocator alone when the
user chose their own: a preloaded allocator (``LD_PRELOAD`` naming jemalloc,
tcmalloc or mimalloc), ``GLIBC_TUNABLES``, glibc's ``MALLOC_*`` environment
variables, or ``MOE_JAX_MALLOC_TUNING=0``.

Trade-off: freed memory is kept by the process instead of going back to the
OS, so resident memory stays at its high-water mark. That is the point (the
next step reuses it) and matches how XLA's GPU/TPU allocators behave.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

#: (parameter, value) pairs applied by :func:`tune_cpu_allocator`.
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 1 << 30))

_USER_ALLOCATOR_ENV = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_",
                       "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc", "hoard", "snmalloc")

_applied: bool | None = None


def _skip_reason() -> str | None:
  """Why the allocator should be left alone, or None to tune it."""
  if not sys.platform.startswith("linux"):
    return f"platform {sys.platform!r} is not Linux"
  if os.environ.get("MOE_JAX_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
    return "MOE_JAX_MALLOC_TUNING=0"
  for name in _USER_ALLOCATOR_ENV:
    if name in os.environ:
      return f"the user set {name}"
  preload = os.environ.get("LD_PRELOAD", "").lower()
  for name in _OTHER_ALLOCATORS:
    if name in preload:
      return f"LD_PRELOAD names {name}"
  return None


def _libc() -> ctypes.CDLL | None:
  libc = ctypes.CDLL(None)
  if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
    return None  # musl or another libc: mallopt's parameters differ
  return libc


def tune_cpu_allocator() -> bool:
  """Tunes glibc's malloc for XLA:CPU's per-step scratch buffers (see module docstring).

  Call it before jax or torch start their threads (first thing in a main or a
  notebook); later calls return the first call's answer.

  Returns:
    Whether the settings were applied.
  """
  global _applied
  if _applied is not None:
    return _applied
  reason = _skip_reason()
  libc = None if reason else _libc()
  if reason is None and libc is None:
    reason = "the C library is not glibc"
  if reason is not None:
    logger.debug("allocator tuning skipped: %s", reason)
    _applied = False
    return False
  _applied = all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1
                 for param, value in SETTINGS)
  logger.debug("allocator tuning applied: %s", _applied)
  return _applied
