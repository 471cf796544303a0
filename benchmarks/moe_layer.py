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

What the kernels execute (computed here, no compile; same shapes and meshes):
``tpu_<path>[_skewed]_executed_flops_over_ideal`` for ``ragged``,
``ep_ragged`` and ``ep_ragged_f1.25``: the FLOPs megablox's ``gmm`` / ``tgmm``
actually run, forward and backward, for a routed batch -- a fresh router on
random tokens (near-uniform loads), and ``_skewed`` with a Zipf prior on its
logits (loads about 0.50, 0.39, 0.09, ... ) -- over the same ideal. Read off
megablox/gmm.py: ``make_group_metadata`` gives each non-empty group the
``tm``-row tiles from ``floor(start / tm)`` to ``ceil(end / tm)`` (a tile two
groups share is visited by both; empty groups and rows past the last group by
none): ``active`` tiles. ``gmm``'s grid is ``(tiles_n, active, tiles_k)``,
``tgmm``'s ``(tiles_n, tiles_k, active + empty groups)`` with the empty
groups' steps skipping their product, and every step is one
``[tm, tk] x [tk, tn]`` product: ``2·tm·tk·tn`` FLOPs. The layer calls, per
expert matmul (``wi_0``, ``wi_1`` ``[D, F]``, ``wo`` ``[F, D]``, tiles from
``experts.gmm_tiling``), ``gmm`` forward and, through megablox's VJP,
``gmm(dy, w, transpose_rhs=True)`` and ``tgmm(x^T, dy)``; that sum is the
figure (the active-tile count is checked against ``make_group_metadata``
itself). The group sizes are what each chip holds (``ragged``: its own
assignments) or receives (``ep_*``: per local expert, clipped by the receive
buffer as ``ragged_parallel._exchange_plan`` clips it; ``*_kept_frac`` the
rows that fit). So the compiled 4x of ``tpu_ep_ragged_hlo_flops_over_ideal``
is megablox's estimate over the worst-case buffer, not work done: what runs
is the real rows rounded up to row tiles per group (1.22x with random
routing). For data-parallel ``ragged`` the compiled figure (1.00x) reads low:
groups that share a row tile compute it twice, so 8 groups of ~512 rows in
512-row tiles executed ~1.86x; ``gmm_tiling`` now sizes the row tile by the
groups (128 here) and it executes ~1.22x. ``*_busiest_chip_over_ideal``
is the busiest chip's executed FLOPs over the ideal share of one chip: the
step waits for it (a skewed router piles onto the chips of its hot experts).

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

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

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


# ----------------------------------------------------------------------------- executed FLOPs


def routed_experts(b: int, l: int, d: int, e: int, k: int, *, skew: float = 0.0,
                   seed: int = 0) -> np.ndarray:
  """``[B, L, K]`` experts a fresh router picks for random tokens (the layer's math).

  ``skew > 0`` adds ``skew · log(1 / (1 + e))`` to the logits (a Zipf prior:
  expert 0 most popular), the imbalance of an early or collapsing router.
  """
  from moe_jax.moe.layer import RouterKernel
  from moe_jax.nn.router import router_logits, top_k_gates
  kx, kr = jax.random.split(jax.random.key(seed))
  kernel_DE = RouterKernel(num_experts=e).init(kr, d)["params"]["kernel"]
  x = jax.random.normal(kx, (b, l, d), jnp.float32)
  logits = router_logits(x, nn.unbox(kernel_DE))
  logits = logits - skew * jnp.log1p(jnp.arange(e, dtype=jnp.float32))
  _, expert_BLK = top_k_gates(jax.nn.softmax(logits, axis=-1), k)
  return np.asarray(expert_BLK)


def received_group_sizes(counts_NE: np.ndarray, rows: int, e_local: int) -> list[np.ndarray]:
  """Local experts' group sizes on each of n devices of one expert group (``_exchange_plan``).

  ``counts_NE[i, x]``: rows source ``i`` sends to global expert ``x``. A
  receive buffer of ``rows`` keeps chunks in source order and clips the last
  ones, as ``ragged_parallel._exchange_plan`` does.
  """
  n = counts_NE.shape[0]
  sizes = []
  for j in range(n):
    full_NE = counts_NE[:, j * e_local:(j + 1) * e_local]  # [source, local expert]
    all_N = full_NE.sum(1)
    kept_N = np.clip(rows - (np.cumsum(all_N) - all_N), 0, all_N)
    starts_NE = np.cumsum(full_NE, 1) - full_NE
    sizes.append(np.clip(kept_N[:, None] - starts_NE, 0, full_NE).sum(0))
  return sizes


def active_row_tiles(group_sizes: np.ndarray, m: int, tm: int) -> int:
  """Row tiles megablox visits for non-empty groups (``make_group_metadata``'s count).

  A group covers the tiles from ``floor(start / tm)`` to ``ceil(end / tm)``;
  a tile two groups share is visited by both; empty groups and rows past the
  last group are not visited. Checked against megablox's own metadata.
  """
  from jax.experimental.pallas.ops.tpu.megablox.gmm import make_group_metadata
  ends = np.cumsum(group_sizes)
  starts = ends - group_sizes
  mine = int(np.sum(np.where(group_sizes > 0, -(-ends // tm) - starts // tm, 0)))
  _, theirs = make_group_metadata(group_sizes=jnp.asarray(group_sizes, jnp.int32), m=m, tm=tm,
                                  start_group=jnp.int32(0),
                                  num_nonzero_groups=len(group_sizes), visit_empty_groups=False)
  assert mine == int(theirs), (mine, int(theirs), group_sizes)
  return mine


def executed_expert_flops(group_sizes: np.ndarray, rows: int, d: int, f: int) -> float:
  """FLOPs megablox's kernels run for one gated expert FFN's forward and backward.

  ``experts.grouped_matmul`` pads ``rows`` to the row tile and calls ``gmm``
  for ``wi_0``, ``wi_1`` (``[D, F]``) and ``wo`` (``[F, D]``) with
  ``gmm_tiling(rows, K, N)``; the backward (megablox's ``custom_vjp``) is
  ``gmm(dy, w, transpose_rhs=True)`` (contraction N in ``tk`` tiles, output K
  in ``tn`` tiles) and ``tgmm(x^T, dy)`` (K in ``tk``, N in ``tn``). Each grid
  step of each kernel is one ``[tm, tk] x [tk, tn]`` (tgmm: ``[tk, tm] x
  [tm, tn]``) MXU product, ``2·tm·tk·tn`` FLOPs, and the grids are ``(tiles_n,
  active, tiles_k)`` / ``(tiles_n, tiles_k, active)``; tgmm's extra steps for
  empty groups skip their product.
  """
  from moe_jax.moe.experts import gmm_tiling
  ceil = lambda a, t: -(-a // t)  # noqa: E731
  total = 0.0
  for kk, nn_ in ((d, f), (d, f), (f, d)):
    tm, tk, tn = gmm_tiling(rows, kk, nn_, groups=len(group_sizes))
    active = active_row_tiles(group_sizes, ceil(rows, tm) * tm, tm)
    per_step = 2.0 * tm * tk * tn
    fwd = tgmm = active * ceil(kk, tk) * ceil(nn_, tn) * per_step
    dx = active * ceil(nn_, tk) * ceil(kk, tn) * per_step
    total += fwd + dx + tgmm
  return total


SKEW = 1.0  # Zipf prior on the logits of the skewed router (see routed_experts)


def _per_chip_executed(expert_BLK: np.ndarray, d: int, f: int) -> dict:
  """``{path: ([executed FLOPs per chip], rows kept)}`` for the TPU runs' meshes."""
  from moe_jax.moe.ragged_parallel import receive_rows
  out = {}
  # data=8: each chip runs all E experts on its own b/8 sequences' assignments
  out["ragged"] = ([executed_expert_flops(np.bincount(a, minlength=E), a.size, d, f)
                    for a in expert_BLK.reshape(8, -1)], expert_BLK.size)
  n, e_local = 4, E // 4  # data=2 x expert=4: chip (i, j) holds experts 2j, 2j+1
  shards = expert_BLK.reshape(2, n, -1)  # [data, source chip, its assignments]
  for name, factor in (("ep_ragged", None), ("ep_ragged_f1.25", 1.25)):
    rows = receive_rows(n, shards.shape[-1] // K, K, e_local, factor)
    chips, kept = [], 0
    for i in range(2):
      counts_NE = np.stack([np.bincount(a, minlength=E) for a in shards[i]])
      for sizes in received_group_sizes(counts_NE, rows, e_local):
        chips.append(executed_expert_flops(sizes, rows, d, f))
        kept += int(sizes.sum())
    out[name] = (chips, kept)
  return out


def executed_flop_ratios(b: int = 16, l: int = 1024, d: int = 1024, f: int = 2048) -> dict:
  """Kernel-executed FLOPs over the ideal for routed batches, in the TPU runs' shapes."""
  ideal = 3 * _ideal_flops(b * l, d, f, K)
  out = {}
  for route, skew in (("", 0.0), ("_skewed", SKEW)):
    expert_BLK = routed_experts(b, l, d, E, K, skew=skew)
    load = np.bincount(expert_BLK.ravel(), minlength=E) / expert_BLK.size
    line = []
    for name, (chips, kept) in _per_chip_executed(expert_BLK, d, f).items():
      key = f"tpu_{name}{route}"
      out[f"{key}_executed_flops_over_ideal"] = round(sum(chips) / ideal, 3)
      out[f"{key}_busiest_chip_over_ideal"] = round(max(chips) * len(chips) / ideal, 3)
      if kept != expert_BLK.size:
        out[f"{key}_kept_frac"] = round(kept / expert_BLK.size, 4)
      line.append(f"{name} {out[f'{key}_executed_flops_over_ideal']} (busiest chip "
                  f"{out[f'{key}_busiest_chip_over_ideal']}, kept {kept / expert_BLK.size:.3f})")
    print(f"executed / ideal FLOPs, {route[1:] or 'random'} router (expert loads "
          f"{np.round(load, 3).tolist()}): " + "; ".join(line), flush=True)
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
  result.update(executed_flop_ratios())
  print(json.dumps(result))


if __name__ == "__main__":
  main()
