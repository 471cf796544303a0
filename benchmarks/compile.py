"""Compile time vs depth: a decoder train step with scanned layers (and, for reference, unrolled).

``python benchmarks/compile.py [--quick]`` lowers and compiles (``jax.jit(step)
.lower(...).compile()``, no execution, abstract parameters so nothing is
allocated) one train step -- forward, cross-entropy, backward through
per-block remat, an SGD update -- of the same small Llama-style decoder at 4
and 32 layers, with ``scan_layers=True`` and with the unrolled stack. Each
compile runs in a fresh jit (the persistent compilation cache is off), the
median of ``--repeats`` is kept, 4- and 32-layer compiles interleaved.

Prints a table, then one JSON line: ``compile_32_over_4`` =
time(32 scanned) / time(4 scanned) (goal <= 1.5), ``unrolled_compile_32_over_4``
the same for the unrolled stack (skipped with ``--quick``) and the seconds.
:func:`compile_32_over_4` is the figure for other scripts (``benchmarks/scale.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moe_jax.models.decoder import Decoder, DecoderConfig  # noqa: E402

BASE = dict(vocab_size=1024, d_model=128, num_heads=4, num_kv_heads=2, d_ff=256)


def train_step_compile_seconds(num_layers: int, *, scan_layers: bool = True,
                               remat_policy: str = "dots_no_batch", batch: int = 2,
                               length: int = 64, **overrides) -> float:
  """Seconds to lower and compile one decoder train step (nothing is executed)."""
  config = DecoderConfig(**{**BASE, **overrides}, num_layers=num_layers,
                         scan_layers=scan_layers, remat_policy=remat_policy)
  module = Decoder(config=config)
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  params = jax.eval_shape(lambda: module.init(jax.random.key(0),
                                              jnp.zeros((1, 1), jnp.int32))["params"])

  def step(p, toks):
    def loss(p):
      logits, _ = module.apply({"params": p}, toks[:, :-1])
      logp = jax.nn.log_softmax(logits.astype(jnp.float32))
      return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1))
    value, grads = jax.value_and_grad(loss)(p)
    return jax.tree.map(lambda w, g: w - 1e-3 * g, p, grads), value

  start = time.perf_counter()
  jax.jit(step).lower(params, tokens).compile()
  return time.perf_counter() - start


def compile_times(depths=(4, 32), *, scan_layers: bool = True, repeats: int = 3,
                  **kw) -> dict[int, float]:
  """Median compile seconds per depth (depths interleaved within each repeat)."""
  jax.config.update("jax_enable_compilation_cache", False)
  train_step_compile_seconds(2, scan_layers=scan_layers, **kw)  # warm up the tracer
  times: dict[int, list[float]] = {d: [] for d in depths}
  for _ in range(repeats):
    for d in depths:
      times[d].append(train_step_compile_seconds(d, scan_layers=scan_layers, **kw))
  return {d: statistics.median(ts) for d, ts in times.items()}


def compile_32_over_4(repeats: int = 3, **kw) -> float:
  """time(compile, 32 scanned layers) / time(compile, 4 scanned layers)."""
  t = compile_times((4, 32), scan_layers=True, repeats=repeats, **kw)
  return t[32] / t[4]


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true", help="scanned only, 2 repeats")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  repeats = 2 if args.quick else args.repeats
  scanned = compile_times(scan_layers=True, repeats=repeats)
  figures = {"compile_32_over_4": scanned[32] / scanned[4],
             "scanned_compile_s_4": scanned[4], "scanned_compile_s_32": scanned[32]}
  rows = [("scanned", scanned)]
  if not args.quick:
    unrolled = compile_times(scan_layers=False, repeats=repeats)
    rows.append(("unrolled", unrolled))
    figures.update(unrolled_compile_32_over_4=unrolled[32] / unrolled[4],
                   unrolled_compile_s_4=unrolled[4], unrolled_compile_s_32=unrolled[32])
  print(f"{'stack':<10}{'4 layers (s)':>14}{'32 layers (s)':>15}{'32 / 4':>9}")
  for name, t in rows:
    print(f"{name:<10}{t[4]:>14.2f}{t[32]:>15.2f}{t[32] / t[4]:>9.2f}")
  print(json.dumps({k: round(v, 4) for k, v in figures.items()}))


if __name__ == "__main__":
  main()
