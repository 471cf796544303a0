"""MoE layer speed on CPU: capacity (sorted) dispatch vs dense FFN, GShard one-hot, ragged.

Run from the repo root: ``python benchmarks/moe_layer.py [--quick]``.

Setting (defaults): B=2 sequences of L=2048 tokens, D=256, E=8 gated SiLU
experts of F=512, top-2, capacity factor 1.0, all 4096 tokens in one routing
group (t5x-moe / flaxformer route a device's tokens as a group: a few
thousand tokens). Rows marked ``_S=L`` route each sequence as its own group
(S=2048, this library's default). ``--quick`` halves the sequence length and
the repeats.

Figures (time ratios, medians of repeats after a warm-up, each jitted and
``block_until_ready``, measured side by side in one run):

* ``moe_over_dense``: MoE layer (router + top-2 + sorted capacity dispatch +
  experts + combine), forward, over a dense gated FFN of width ``K·F``. That
  dense FFN does exactly the expert matmul FLOPs of the MoE with cf = 1 (each
  token goes through K experts of width F), so the ratio is the cost of
  routing, dispatch and combine. Goal <= 1.3.
* ``moe_over_dense_fwd_bwd``: the same, forward + backward.
* ``onehot_over_capacity``: the MoE layer with GShard one-hot einsum
  dispatch/combine over the same layer with sorted dispatch (same routing,
  same capacity), forward. The one-hot path costs O(S·E·C·D) per group, i.e.
  grows with the group size; goal >= 3 at S=4096.
  ``onehot_over_capacity_group_per_seq`` is the same at S=2048.
* ``ragged_over_capacity``: dropless ``ragged_dot`` dispatch over sorted
  capacity dispatch, forward. ``ragged_dot`` on CPU is a dense masked matmul
  over all E experts, so expect about E/K times slower here; it is the
  GPU/TPU path.

FLOPs (``compiled.cost_analysis()`` of each path, over the ideal top-k expert
FLOPs ``2·T·K·3·D·F`` -- what the tokens' K gated experts need, no padding):

* ``cpu_<path>_hlo_flops_over_ideal``: forward, compiled for this CPU.
  ``ragged`` is ``ragged_dot``, which XLA:CPU lowers dense (about E/K x).
* ``tpu_ragged_hlo_flops_over_ideal`` (goal <= 1.1) and
  ``tpu_sorted_hlo_flops_over_ideal`` (goal <= cf = 1.25): forward and
  backward of the layer compiled for TPU (v5p, 8 chips, data parallel: each
  chip routes its own sequences), ``ragged`` through megablox ``gmm``.
* Expert parallelism on the same chips (``data=2, expert=4``), forward and
  backward: ``tpu_ep_padded_*`` today's dropless path (capacity C = S
  buffers and ``all_to_all``), ``tpu_ep_ragged_*`` ``ragged_all_to_all`` with
  the worst-case (truly dropless) receive buffer and ``tpu_ep_ragged_f1.25_*``
  with a buffer of 1.25x the device's own assignments
  (``ragged_buffer_factor``). megablox's cost estimate counts every row of
  its buffer, so these HLO FLOPs follow the buffer size; ``*_temp_mib`` is
  the compiled temporary memory per chip.

``--no-tpu`` skips the TPU compiles (they need ``moe-jax[tpu]``; each takes
a minute or so of CPU).

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

tune_cpu_allocator()  # before jax starts its threads (see moe_jax/runtime.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moe_jax.moe import MoeConfig, MoeLayer  # noqa: E402
from moe_jax.nn.mlp import Mlp  # noqa: E402

from _timing import time_side_by_side  # noqa: E402

B, L, D, F, E, K = 2, 2048, 256, 512, 8, 2


def _ideal_flops(tokens: int, d: int, f: int, k: int) -> float:
  """Forward matmul FLOPs of K gated experts per token: 2·T·K·(D·F·2 + F·D)."""
  return 2.0 * tokens * k * 3 * d * f


def cpu_flop_ratios(x) -> dict:
  """Forward HLO FLOPs over the ideal for each dispatch path, compiled for this CPU."""
  out = {}
  for name, dispatch, cf in (("sorted", "sorted", 1.0), ("ragged", "ragged", None),
                             ("onehot", "onehot", 1.0)):
    layer = MoeLayer(config=MoeConfig(num_experts=E, num_selected=K, capacity_factor=cf,
                                      min_capacity=1, dispatch=dispatch), hidden_dim=F)
    params = jax.eval_shape(layer.init, jax.random.key(0), x)
    cost = jax.jit(lambda p, x: layer.apply({"params": p["params"]}, x)).lower(
        params, x).compile().cost_analysis()
    out[f"cpu_{name}_hlo_flops_over_ideal"] = round(
        cost["flops"] / _ideal_flops(x.shape[0] * x.shape[1], D, F, K), 3)
  return out


def tpu_flop_ratios() -> dict:
  """The layer's forward + backward compiled for a v5p slice: FLOPs / ideal, temp memory."""
  import _tpu_aot as aot
  from moe_jax.train.partitioning import DEFAULT_RULES
  devices = aot.tpu_devices("v5p:2x2x2")
  if devices is None:
    return {}
  b, l, d, f = 16, 1024, 1024, 2048
  tokens = b * l
  ideal = 3 * _ideal_flops(tokens, d, f, K)  # forward + backward
  runs = {"ragged": ({"data": 8}, dict(dispatch="ragged", capacity_factor=None)),
          "sorted": ({"data": 8}, dict(dispatch="sorted", capacity_factor=1.25)),
          "ep_padded": ({"data": 2, "expert": 4},
                        dict(dispatch="ragged", capacity_factor=None, ragged_exchange="padded")),
          "ep_ragged": ({"data": 2, "expert": 4}, dict(dispatch="ragged", capacity_factor=None)),
          "ep_ragged_f1.25": ({"data": 2, "expert": 4},
                              dict(dispatch="ragged", capacity_factor=None,
                                   ragged_buffer_factor=1.25))}
  out = {}
  for name, (shape, kw) in runs.items():
    mesh = aot.make_mesh(devices, **shape)
    layer = MoeLayer(config=MoeConfig(num_experts=E, num_selected=K, **kw), hidden_dim=f,
                     dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((b, l, d), jnp.bfloat16)
    params = aot.abstract_params(layer, mesh, DEFAULT_RULES, x)
    xs = aot.abstract((b, l, d), jnp.bfloat16, mesh, jax.P(("data", "expert")))
    loss = lambda p, x, m=layer: jnp.sum(m.apply(p, x).astype(jnp.float32) ** 2)  # noqa: E731
    st = aot.compile_stats(jax.grad(loss, argnums=(0, 1)), (params, xs), mesh, DEFAULT_RULES)
    n = len(mesh.devices.flat)
    out[f"tpu_{name}_hlo_flops_over_ideal"] = round(st["flops"] * n / ideal, 3)
    out[f"tpu_{name}_temp_mib"] = round(st["temp_bytes"] / 2**20, 1)
    kernels = [k for k in ("ragged-all-to-all", "all-to-all", "tpu_custom_call")
               if k in st["hlo"]]
    print(f"TPU v5p x{n} {shape}: {name:<16} HLO FLOPs / ideal "
          f"{out[f'tpu_{name}_hlo_flops_over_ideal']:6.3f}  temp "
          f"{out[f'tpu_{name}_temp_mib']:8.1f} MiB  ({', '.join(kernels)})", flush=True)
  out["tpu_ep_ragged_over_padded_temp"] = round(
      out["tpu_ep_ragged_temp_mib"] / out["tpu_ep_padded_temp_mib"], 3)
  out["tpu_ep_ragged_f1.25_over_padded_temp"] = round(
      out["tpu_ep_ragged_f1.25_temp_mib"] / out["tpu_ep_padded_temp_mib"], 3)
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="shorter sequences, fewer repeats")
  ap.add_argument("--no-tpu", action="store_true", help="skip the TPU AOT compiles")
  args = ap.parse_args()
  b, l, d, f, e, k = B, L, D, F, E, K
  repeats = 5
  if args.quick:
    l, repeats = 1024, 3

  x = jax.random.normal(jax.random.key(0), (b, l, d), jnp.float32)
  x_dense = x.reshape(b * l, d)

  def moe(dispatch: str, cf: float | None = 1.0, num_groups: int | None = 1):
    cfg = MoeConfig(num_experts=e, num_selected=k, capacity_factor=cf, min_capacity=1,
                    dispatch=dispatch, num_groups=num_groups)
    return MoeLayer(config=cfg, hidden_dim=f)

  dense = Mlp(hidden_dim=k * f, out_features=d)
  layers = {"dense": dense, "sorted": moe("sorted"), "onehot": moe("onehot"),
            "ragged": moe("ragged"), "sorted_cf1.25": moe("sorted", 1.25),
            "sorted_S=L": moe("sorted", num_groups=None), "onehot_S=L": moe("onehot", num_groups=None)}
  variables = {n: m.init(jax.random.key(1), x_dense if n == "dense" else x)
               for n, m in layers.items()}

  fwd, fwd_bwd = {}, {}
  for name, m in layers.items():
    fwd[name] = jax.jit(lambda v, x, m=m: m.apply(v, x))
    fwd_bwd[name] = jax.jit(jax.grad(lambda v, x, m=m: jnp.sum(m.apply(v, x) ** 2),
                                     argnums=(0, 1)))

  # The dense FFN sees [B*L, D] rows: its fastest layout on CPU (XLA's weight
  # gradient contracting over both B and L is markedly slower).
  inputs = {n: (x.reshape(b * l, d) if n == "dense" else x) for n in layers}
  t_fwd = time_side_by_side({n: (fwd[n], (variables[n], inputs[n])) for n in layers}, repeats)
  t_bwd = time_side_by_side({n: (fwd_bwd[n], (variables[n], inputs[n]))
                             for n in ("dense", "sorted")}, repeats)
  rows = [(n, t_fwd[n], t_bwd.get(n)) for n in layers]

  print(f"MoE layer on {jax.devices()[0].platform}: B={b} L={l} D={d} E={e} F={f} top-{k}, "
        f"cf=1, one routing group of S={b * l} tokens (rows '_S=L': one group per sequence), "
        f"dense width K*F={k * f}")
  print(f"{'path':<16}{'fwd ms':>10}{'fwd+bwd ms':>13}{'fwd / dense':>13}")
  for n, tf, tb in rows:
    tb_s = f"{tb * 1e3:13.2f}" if tb is not None else f"{'-':>13}"
    print(f"{n:<16}{tf * 1e3:10.2f}{tb_s}{tf / t_fwd['dense']:13.2f}")

  result = {
      "moe_over_dense": round(t_fwd["sorted"] / t_fwd["dense"], 3),
      "moe_over_dense_fwd_bwd": round(t_bwd["sorted"] / t_bwd["dense"], 3),
      "moe_cf125_over_dense": round(t_fwd["sorted_cf1.25"] / t_fwd["dense"], 3),
      "onehot_over_capacity": round(t_fwd["onehot"] / t_fwd["sorted"], 3),
      "onehot_over_capacity_group_per_seq": round(t_fwd["onehot_S=L"] / t_fwd["sorted_S=L"], 3),
      "ragged_over_capacity": round(t_fwd["ragged"] / t_fwd["sorted"], 3),
  }
  result.update(cpu_flop_ratios(x))
  print("HLO FLOPs / ideal top-k FLOPs (CPU, forward): " + ", ".join(
      f"{k.split('_')[1]} {v}" for k, v in result.items() if k.startswith("cpu_")), flush=True)
  if not args.no_tpu:
    result.update(tpu_flop_ratios())
  print(json.dumps(result))


if __name__ == "__main__":
  main()
