"""Side-by-side timing shared by the benchmark scripts (not a benchmark itself)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping


def time_side_by_side(fns: Mapping[str, tuple[Callable[..., Any], tuple]], repeats: int,
                      *, block: Callable[[Any], Any] | None = None) -> dict[str, float]:
  """Median seconds per call of each ``name: (fn, args)``, round-robin.

  Every function is compiled and warmed up first (two calls); the repeats then
  interleave the functions so that background load hits all of them alike.
  ``block`` waits for a result (default ``jax.block_until_ready``).
  """
  if block is None:
    import jax
    block = jax.block_until_ready
  for fn, args in fns.values():
    block(fn(*args))
    block(fn(*args))
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, (fn, args) in fns.items():
      t = time.perf_counter()
      block(fn(*args))
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(ts) for name, ts in times.items()}
