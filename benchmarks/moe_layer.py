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

The last line is one JSON object with these keys.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from moe_jax.runtime import tune_cpu_allocator  # noqa: E402

tune_cpu_allocator()  # before jax starts its threads (see moe_jax/runtime.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moe_jax.moe import MoeConfig, MoeLayer  # noqa: E402
from moe_jax.nn.mlp import Mlp  # noqa: E402

from _timing import time_side_by_side  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="shorter sequences, fewer repeats")
  args = ap.parse_args()
  b, l, d, f, e, k = 2, 2048, 256, 512, 8, 2
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
  print(json.dumps(result))


if __name__ == "__main__":
  main()
