"""Fused attention compiled for TPU from this machine: temporary memory, kernel over xla.

Run from the repo root: ``python benchmarks/attention.py [--quick]``.

Each step is one attention call, forward and backward (``jax.grad`` of a sum
over q, k, v and, for T5, the bias), compiled by XLA's TPU compiler for one
v5p chip (``jax.experimental.topologies``; needs ``moe-jax[tpu]``, no TPU).
Figures are ``compiled.memory_analysis().temp_size_in_bytes``: the scores,
probabilities and their gradients the xla path keeps, against the kernels'
blocks.

* ``tpu_kernel_over_xla_temp_bytes`` (goal <= 0.1): a Mistral / Mixtral-shaped
  layer (32 query heads, 8 kv heads, Dh 128, bfloat16), one 4096-token causal
  sequence: splash attention over ``attention_impl="xla"``.
* ``tpu_splash_window_over_xla_temp_bytes``: the same with a 1024-token sliding window.
* ``tpu_flash_bias_over_xla_temp_bytes``: a T5-XL-shaped encoder layer (32
  heads, Dh 64, 8 x 512 tokens, relative-position bias shared by the batch):
  flash attention over xla. The kernel runs one sequence at a time (a scan)
  with the bias shared, so the backward adds each sequence's bias gradient
  ``dS`` ``[1, H, L, S]`` (float32) into one carry: no ``[B, H, L, S]``
  float32 buffer (under ``vmap`` it was one, 1.77x xla's temporaries).
* ``tpu_flash_frozen_bias_over_xla_temp_bytes``: the same with the bias not
  differentiated (MoV / PEFT on a frozen T5: gradients of q, k, v only).
* ``tpu_<case>_xla_temp_mib`` / ``tpu_<case>_kernel_temp_mib``: the figures themselves.
* ``tpu_<case>_over_xla_residual_bytes``: what the backward keeps from the
  forward (``jax.vjp`` residuals, q / k / v / bias included), kernel over xla:
  in a model that is held per layer until the backward reaches it (xla keeps
  the ``[B, H, L, S]`` probabilities of every layer), while a one-layer step's
  temporaries above are transient. T5's flash trades a transient ``dS`` for
  no per-layer scores.
* ``cpu_xla_fwd_ms``: the xla path's forward on this CPU at 1024 tokens (for scale).

The last line is one JSON object with these keys.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu is only for the AOT compiles

from moe_jax.runtime import tune_cpu_allocator  # noqa: E402

tune_cpu_allocator()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moe_jax.nn.attention_kernels import AttentionMask, attention  # noqa: E402

from _timing import time_side_by_side  # noqa: E402


def _step(impl: str, mask: AttentionMask, with_bias: bool, bias_grad: bool = True):
  def loss(q, k, v, bias):
    out = attention(q, k, v, mask=mask, bias_BHLS=bias if with_bias else None,
                    scale=q.shape[-1] ** -0.5, impl=impl, platform="tpu")
    return jnp.sum(out.astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2, 3) if with_bias and bias_grad else (0, 1, 2))


def residual_bytes(impl: str, mask: AttentionMask, with_bias: bool, *args) -> int:
  """Bytes the backward pass keeps from the forward (``jax.vjp`` residuals; traced only)."""
  def fwd(q, k, v, bias):
    return attention(q, k, v, mask=mask, bias_BHLS=bias if with_bias else None,
                     scale=q.shape[-1] ** -0.5, impl=impl, platform="tpu")
  vjp = jax.eval_shape(lambda *a: jax.vjp(fwd, *a)[1], *args)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp) if hasattr(x, "dtype"))


def tpu_case(devices, *, b, l, h, kv, dh, causal, window=None, bias=False, kernel="splash",
             bias_grad=True):
  """``(xla temp bytes, kernel temp bytes, xla / kernel residual bytes)`` of one attention step."""
  import _tpu_aot as aot
  mesh = aot.make_mesh(devices)
  spec = jax.P()
  q = aot.abstract((b, l, h, dh), jnp.bfloat16, mesh, spec)
  k = aot.abstract((b, l, kv, dh), jnp.bfloat16, mesh, spec)
  bias_arr = aot.abstract((1, h, l, l), jnp.float32, mesh, spec)
  valid = jnp.ones((b, l), bool)
  mask = AttentionMask(kv_valid_BS=valid, causal=causal, window=window)
  temps, residuals = [], []
  for impl in ("xla", kernel):
    st = aot.compile_stats(_step(impl, mask, bias, bias_grad), (q, k, k, bias_arr), mesh)
    temps.append(st["temp_bytes"])
    assert (impl == "xla") != ("tpu_custom_call" in st["hlo"]), impl
    with jax.set_mesh(mesh):
      residuals.append(residual_bytes(impl, mask, bias, q, k, k, bias_arr))
  return (*temps, *residuals)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="only the 4096-token causal case")
  args = ap.parse_args()

  rows, result = [], {}
  import _tpu_aot as aot
  devices = aot.tpu_devices("v5p:2x2x1")
  if devices is not None:
    cases = {"kernel": dict(b=1, l=4096, h=32, kv=8, dh=128, causal=True)}
    if not args.quick:
      cases["splash_window"] = dict(b=1, l=4096, h=32, kv=8, dh=128, causal=True, window=1024)
      cases["flash_bias"] = dict(b=8, l=512, h=32, kv=32, dh=64, causal=False, bias=True,
                                 kernel="flash")
      cases["flash_frozen_bias"] = dict(cases["flash_bias"], bias_grad=False)
    for name, kw in cases.items():
      xla_b, ker_b, xla_r, ker_r = tpu_case(devices, **kw)
      result[f"tpu_{name}_over_xla_temp_bytes"] = round(ker_b / xla_b, 4)
      result[f"tpu_{name}_xla_temp_mib"] = round(xla_b / 2**20, 1)
      result[f"tpu_{name}_kernel_temp_mib"] = round(ker_b / 2**20, 1)
      result[f"tpu_{name}_over_xla_residual_bytes"] = round(ker_r / xla_r, 4)
      rows.append((name, kw, xla_b, ker_b))
      print(f"TPU v5p: {name:<14} {kw}: temp xla {xla_b / 2**20:9.1f} MiB, kernel "
            f"{ker_b / 2**20:8.1f} MiB (ratio {ker_b / xla_b:.4f}); kept for backward xla "
            f"{xla_r / 2**20:8.1f} MiB, kernel {ker_r / 2**20:6.1f} MiB", flush=True)

  # The xla path on this CPU, for scale.
  b, l, h, kv, dh = 1, 1024, 8, 2, 64
  x = jax.random.normal(jax.random.key(0), (b, l, h, dh))
  kk = jax.random.normal(jax.random.key(1), (b, l, kv, dh))
  mask = AttentionMask(kv_valid_BS=jnp.ones((b, l), bool), causal=True)
  fwd = jax.jit(lambda q, k: attention(q, k, k, mask=mask, scale=dh ** -0.5, impl="xla"))
  t = time_side_by_side({"xla": (fwd, (x, kk))}, 3)
  result["cpu_xla_fwd_ms"] = round(t["xla"] * 1e3, 2)
  print(f"CPU xla attention forward, {l} tokens, {h} heads: {t['xla'] * 1e3:.2f} ms")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
