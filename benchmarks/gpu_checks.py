"""GPU checks on one GPU (a few minutes): cuDNN attention and ragged_dot against xla, MoE TFLOP/s.

Run from the repo root on a machine with a CUDA GPU and ``jax[cuda]``:
``python benchmarks/gpu_checks.py [--quick]``. Without a GPU it says so and
exits 0 (its JSON line then holds ``"gpu": false``).

1. **cuDNN attention parity** (``attention_impl="cudnn"`` against ``"xla"``,
   bfloat16, outputs and gradients of the valid rows): causal GQA, padded,
   packed segments, sliding window, T5-style bias. Tolerance: bfloat16's
   (max abs difference over max abs value <= 2e-2).
2. **ragged_dot parity**: ``grouped_matmul(kernel="ragged_dot")`` against a
   per-group loop, and the MoE layer's ``"ragged"`` dispatch against
   ``"sorted"`` with no drops (float32, outputs and gradients, 1e-3 relative:
   TF32 may be on).
3. **MoE layer TFLOP/s**: forward + backward of a Mixtral-shaped layer slice
   (E=8, top-2, D=4096, F=14336 / 4, bfloat16) with ``"ragged"`` dispatch,
   ideal top-k FLOPs (``3 · 2·T·K·3·D·F``) over the median step time, and
   the same over the chip's dense bfloat16 peak (table below; ``--peak_tflops``
   overrides).

The last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

#: Dense bfloat16 peak TFLOP/s by ``device_kind`` substring (no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10": 125.0, "B200": 2250.0, "GH200": 989.0, "V100": 125.0}


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6))


def attention_parity() -> dict:
  from moe_jax.nn.attention_kernels import AttentionMask, attention
  b, l, h, kv, dh = 2, 512, 8, 2, 64
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)  # noqa: E731
  q, k, v, r = f(b, l, h, dh), f(b, l, kv, dh), f(b, l, kv, dh), f(b, l, h, dh)
  valid = np.ones((b, l), bool)
  valid[1, 400:] = False
  seg = np.ones((b, l), np.int32)
  seg[:, 256:] = 2
  cases = {
      "causal": (AttentionMask(kv_valid_BS=jnp.ones((b, l), bool), causal=True), None, q, k, v),
      "padded": (AttentionMask(kv_valid_BS=valid, q_valid_BL=valid, causal=True), None, q, k, v),
      "packed": (AttentionMask(kv_valid_BS=jnp.ones((b, l), bool), q_segment_ids_BL=seg,
                               kv_segment_ids_BS=seg, causal=True), None, q, k, v),
      "window": (AttentionMask(kv_valid_BS=jnp.ones((b, l), bool), causal=True, window=128),
                 None, q, k, v),
      "t5_bias": (AttentionMask(kv_valid_BS=valid, q_valid_BL=valid), f(1, h, l, l), q,
                  jnp.repeat(k, h // kv, 2), jnp.repeat(v, h // kv, 2)),
  }
  out = {}
  for name, (mask, bias, q_, k_, v_) in cases.items():
    sel = np.asarray(mask.q_valid_BL if mask.q_valid_BL is not None else np.ones((b, l), bool))

    def loss(impl, q_, k_, v_, mask=mask, bias=bias, sel=sel):
      o = attention(q_, k_, v_, mask=mask, bias_BHLS=bias, scale=dh ** -0.5, impl=impl)
      return jnp.sum((o * r).astype(jnp.float32) * sel[:, :, None, None]), o

    res = {impl: jax.jit(jax.value_and_grad(lambda *a, i=impl: loss(i, *a), (0, 1, 2),
                                            has_aux=True))(q_, k_, v_)
           for impl in ("xla", "cudnn")}
    (_, o_ref), g_ref = res["xla"]
    (_, o_got), g_got = res["cudnn"]
    err = max([_rel_err(np.asarray(o_got)[sel], np.asarray(o_ref)[sel])]
              + [_rel_err(a, c) for a, c in zip(g_got, g_ref)])
    out[f"cudnn_{name}_rel_err"] = round(err, 5)
    print(f"cuDNN attention {name:<8}: max rel err {err:.2e} ({'ok' if err <= 2e-2 else 'FAIL'})")
  return out


def ragged_parity() -> dict:
  from moe_jax.moe import MoeConfig, MoeLayer
  from moe_jax.moe.experts import grouped_matmul
  rng = np.random.default_rng(1)
  m, d, f_, e = 1000, 256, 512, 8
  x = jnp.asarray(rng.standard_normal((m, d)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((e, d, f_)), jnp.float32) / np.sqrt(d)
  sizes = np.array([200, 0, 300, 100, 150, 50, 100, 50], np.int32)
  y = grouped_matmul(x, w, jnp.asarray(sizes), kernel="ragged_dot")
  ends = np.cumsum(sizes)
  ref = np.concatenate([np.asarray(x[ends[i] - sizes[i]:ends[i]] @ w[i]) for i in range(e)])
  out = {"ragged_dot_rel_err": round(_rel_err(y, ref), 6)}
  xb = jnp.asarray(rng.standard_normal((4, 256, d)), jnp.float32)
  layers = {n: MoeLayer(config=MoeConfig(num_experts=e, num_selected=2, capacity_factor=None,
                                         dispatch=n), hidden_dim=f_)
            for n in ("ragged", "sorted")}
  params = layers["sorted"].init(jax.random.key(0), xb)
  params = {"params": params["params"]}
  res = {n: jax.jit(jax.value_and_grad(lambda p, x, m=m_: jnp.sum(m.apply(p, x) ** 2),
                                       (0, 1)))(params, xb) for n, m_ in layers.items()}
  err = max(_rel_err(a, c) for a, c in zip(jax.tree.leaves(res["ragged"]),
                                          jax.tree.leaves(res["sorted"])))
  out["moe_ragged_vs_sorted_rel_err"] = round(err, 6)
  ok = max(err, out["ragged_dot_rel_err"]) <= 1e-3
  print(f"ragged_dot vs loop: {out['ragged_dot_rel_err']:.2e}; MoE ragged vs sorted (no drops, "
        f"outputs and grads): {err:.2e} ({'ok' if ok else 'FAIL'})")
  return out


def moe_tflops(quick: bool, peak: float | None) -> dict:
  from moe_jax.moe import MoeConfig, MoeLayer
  e, k, d, f_ = 8, 2, 4096, 14336 // 4
  b, l = (4, 2048) if quick else (8, 4096)
  layer = MoeLayer(config=MoeConfig(num_experts=e, num_selected=k, capacity_factor=None,
                                    dispatch="ragged"), hidden_dim=f_, dtype=jnp.bfloat16,
                   param_dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (b, l, d), jnp.bfloat16)
  params = {"params": layer.init(jax.random.key(1), x)["params"]}
  step = jax.jit(jax.grad(lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32) ** 2),
                          argnums=(0, 1)))
  jax.block_until_ready(step(params, x))
  times = []
  for _ in range(5 if quick else 10):
    t = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - t)
  sec = float(np.median(times))
  flops = 3 * 2.0 * b * l * k * 3 * d * f_
  tflops = flops / sec / 1e12
  kind = jax.devices()[0].device_kind
  if peak is None:
    peak = next((v for key, v in PEAK_TFLOPS.items() if key in kind), None)
  out = {"moe_ragged_tflops": round(tflops, 1), "device_kind": kind}
  if peak:
    out["moe_ragged_frac_of_peak"] = round(tflops / peak, 3)
  print(f"MoE layer (ragged, {b}x{l} tokens, D={d}, F={f_}, E={e}, top-{k}, bf16) fwd+bwd: "
        f"{sec * 1e3:.1f} ms, {tflops:.1f} TFLOP/s" + (f" = {tflops / peak:.1%} of {peak:.0f}"
                                                        if peak else ""))
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="a smaller MoE step, fewer repeats")
  ap.add_argument("--peak_tflops", type=float, default=None, help="the chip's bf16 peak")
  args = ap.parse_args()
  try:
    gpus = jax.devices("gpu")
  except RuntimeError:
    gpus = []
  if not gpus:
    print("No GPU visible to jax: the GPU checks are skipped (run on a CUDA machine with "
          "jax[cuda]).")
    print(json.dumps({"gpu": False}))
    return
  print(f"GPU: {gpus[0].device_kind} (x{len(gpus)}; using one)")
  result = {"gpu": True}
  with jax.default_device(gpus[0]):
    result.update(attention_parity())
    result.update(ragged_parity())
    result.update(moe_tflops(args.quick, args.peak_tflops))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
