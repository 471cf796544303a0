"""CALM composition overhead on CPU: composed model vs its two models run alone.

Run from the repo root: ``python benchmarks/calm.py [--quick]``.

Setting (defaults): augmenting model m_A (Llama-style decoder, D_A=256, 4
layers) and anchor m_B (D_B=384, 6 layers, a different size and depth),
composed with n=2 composition layers (the paper's layer rule: every
N_A/n-th layer of m_A paired with every N_B/n-th of m_B; m_B's head count),
batch 4 x 256 tokens, float32, each function jitted.

Figures (time ratios, medians of interleaved repeats after a warm-up,
measured side by side in one run):

* ``composed_over_sum``: full forward of the composed model over
  ``t(m_A forward) + t(m_B forward)``. The composed forward does both models'
  work plus n projections D_A -> D_B and n cross-attention blocks; the ratio
  is their cost. Goal <= 1.15.
* ``composed_over_sum_decode``: the same for one cached decoding step (one new
  token per sequence after a 255-token prompt), where m_A is advanced token by
  token alongside m_B, as in the paper.
* ``composed_over_sum_train``: forward + backward of the loss w.r.t. the
  composition parameters only (both LMs frozen) over ``t(m_A fwd) + t(m_B
  fwd+bwd w.r.t. m_B's input embeddings)``, i.e. the backward pass that
  composition training cannot avoid (it goes through m_B's upper layers).

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

from calm_jax.composition import composition_params, init_composition_params  # noqa: E402
from calm_jax.model import ComposedModel, CompositionConfig  # noqa: E402
from moe_jax.models.decoder import Decoder, DecoderConfig, init_cache  # noqa: E402

from _timing import time_side_by_side  # noqa: E402


def _decoder(d: int, layers: int, heads: int) -> DecoderConfig:
  return DecoderConfig(vocab_size=512, d_model=d, num_layers=layers, num_heads=heads,
                       num_kv_heads=heads, d_ff=4 * d, max_seq_len=512)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="shorter sequences, fewer repeats")
  args = ap.parse_args()
  batch, length, repeats = 4, 256, 7
  if args.quick:
    length, repeats = 128, 3

  cfg_a, cfg_b = _decoder(256, 4, 4), _decoder(384, 6, 6)
  config = CompositionConfig(anchor=cfg_b, augments=(cfg_a,), num_composition_layers=2)
  composed = ComposedModel(config=config)
  params = init_composition_params(composed, seed=0)  # random frozen LMs: timing only
  m_a, m_b = Decoder(config=cfg_a), Decoder(config=cfg_b)
  p_a, p_b = params["augment_0"], params["anchor"]
  tokens = jax.random.randint(jax.random.key(1), (batch, length), 2, cfg_b.vocab_size)

  fwd_composed = jax.jit(lambda p, t: composed.apply({"params": p}, t)[0])
  fwd_a = jax.jit(lambda p, t: m_a.apply({"params": p}, t)[0])
  fwd_b = jax.jit(lambda p, t: m_b.apply({"params": p}, t)[0])

  # Decoding: prefill length-1 tokens once, then time one cached step.
  prompt, last = tokens[:, :-1], tokens[:, -1:]

  def prefill(module, p, cache):
    return jax.jit(lambda p, c: module.apply({"params": p}, prompt, cache=c)[1])(p, cache)

  cache_c = prefill(composed, params, composed.init_cache(batch, length))
  cache_a = prefill(m_a, p_a, init_cache(cfg_a, batch, length))
  cache_b = prefill(m_b, p_b, init_cache(cfg_b, batch, length))
  step = {name: jax.jit(lambda p, c, t, m=m: m.apply({"params": p}, t, cache=c)[0])
          for name, m in (("composed", composed), ("a", m_a), ("b", m_b))}

  # Training: gradients w.r.t. the composition parameters only.
  frozen = {k: v for k, v in params.items() if k not in composition_params(params)}

  def loss_composed(comp, t):
    return jnp.mean(composed.apply({"params": {**frozen, **comp}}, t)[0] ** 2)

  def loss_b(embed, t):  # m_B's backward down to its input: what composition training pays
    p = {**p_b, "embed": embed}
    return jnp.mean(m_b.apply({"params": p}, t)[0] ** 2)

  train_composed = jax.jit(jax.grad(loss_composed))
  train_b = jax.jit(jax.grad(loss_b))  # no weight gradients: XLA drops what is not returned
  comp = composition_params(params)

  t = time_side_by_side({
      "composed": (fwd_composed, (params, tokens)), "a": (fwd_a, (p_a, tokens)),
      "b": (fwd_b, (p_b, tokens)),
      "composed_decode": (step["composed"], (params, cache_c, last)),
      "a_decode": (step["a"], (p_a, cache_a, last)), "b_decode": (step["b"], (p_b, cache_b, last)),
      "composed_train": (train_composed, (comp, tokens)), "b_train": (train_b, (p_b["embed"], tokens)),
  }, repeats)

  def ratio(c, a, b):
    return t[c] / (t[a] + t[b])

  result = {
      "composed_over_sum": round(ratio("composed", "a", "b"), 3),
      "composed_over_sum_decode": round(ratio("composed_decode", "a_decode", "b_decode"), 3),
      "composed_over_sum_train": round(ratio("composed_train", "a", "b_train"), 3),
  }
  print(f"CALM on {jax.devices()[0].platform}: m_A D={cfg_a.d_model} x {cfg_a.num_layers} layers, "
        f"m_B D={cfg_b.d_model} x {cfg_b.num_layers} layers, pairs {config.pairs[0]}, "
        f"batch {batch} x {length} tokens, median of {repeats}")
  print(f"{'what':<10}{'m_A ms':>10}{'m_B ms':>10}{'sum ms':>10}{'composed ms':>13}{'ratio':>8}")
  for what, c, a, b in (("forward", "composed", "a", "b"),
                        ("decode", "composed_decode", "a_decode", "b_decode"),
                        ("train", "composed_train", "a", "b_train")):
    print(f"{what:<10}{1e3 * t[a]:>10.2f}{1e3 * t[b]:>10.2f}{1e3 * (t[a] + t[b]):>10.2f}"
          f"{1e3 * t[c]:>13.2f}{ratio(c, a, b):>8.3f}")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
