"""Seed -> domain branches -> mix: sparse upcycling vs BTX vs BAM at matched training compute.

The BAM paper's protocol (arXiv 2408.08274, section 4) at toy scale, on CPU:

1. pretrain a tiny dense *parallel-block* seed on a mixture of three
   synthetic domains;
2. branch it: train one copy per domain;
3. mix, then train the mixed model on the mixture, every method with the
   same training FLOPs:

   * ``btx``       -- FFN experts from the branches, attention/norms/embeddings averaged, top-2;
   * ``bam_ekv``   -- FFN + attention experts (expert-KV), soft attention routing, FFN top-1;
   * ``bam_skv``   -- the same with shared (averaged) k/v: one KV cache per layer;
   * ``sparse``    -- sparse upcycling of the *seed* (3 experts, top-2), which skips the
     branch phase, so it gets the branch phase's FLOPs as extra mixing steps;
   * ``dense``     -- the seed trained on, with the branch + mix FLOPs (reference).

``--ablations`` adds ``bam_ekv_switch`` (BAM with Switch top-1 FFN gates: the
router probability, not renormalised to 1, so the FFN router learns from the
LM loss but the FFN starts scaled by ~1/3) and ``btx_prompt`` / ``bam_ekv_prompt``
(routers initialised from each domain's sequences, mergekit style).

FLOPs are the analytic training FLOPs of the *active* parameters per token
(``6 x`` forward matmul FLOPs, attention scores included): BAM's soft attention
runs every attention expert, so it gets fewer steps than BTX for the same
compute. Routers are fresh (random), as in both papers.

The three domains share one vocabulary but need different machinery:

* ``markov``  -- a fixed sparse bigram chain over all 128 tokens (FFN/embedding knowledge);
* ``copy``    -- a random 16-token segment (ids < 64) repeated four times (induction heads);
* ``arith``   -- arithmetic progressions ``64 + (s + i*d) mod 64`` with 10% noise tokens
  (attend back past the noise to find the step).

Prints a table of per-domain perplexities (held-out sequences) after merging
and after training, and as its last line a JSON object. The paper's 590M
result is BTX 10.72 vs BAM 9.70 average perplexity; the ``bam_lt_btx`` keys
say whether that ordering holds here.

    python -m experiments.bam_vs_btx            # ~5-10 minutes on 2 busy CPU cores
    python -m experiments.bam_vs_btx --quick    # a smoke run (not meaningful numbers)

(from the repository root; ``python experiments/bam_vs_btx/run.py`` works too).
An experiment, not a timing benchmark: ``make bench`` does not run it.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from moe_jax.runtime import tune_cpu_allocator  # noqa: E402

tune_cpu_allocator()  # before jax starts its threads (see moe_jax/runtime.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from moe_jax.models import registry  # noqa: E402
from moe_jax.models.decoder import DecoderConfig  # noqa: E402
from moe_jax.moe.layer import total_aux_loss  # noqa: E402
from moe_jax.upcycle import (ExpertPrompts, bam_merge, btx_merge,  # noqa: E402
                             init_routers_from_vectors, prompt_router_vectors, sparse_upcycle,
                             upcycled_moe_config)
from moe_jax.upcycle.common import average  # noqa: E402

VOCAB, SEQ = 128, 64
DOMAINS = ("markov", "copy", "arith")


# ----------------------------------------------------------------------------- data


class Domains:
  """Three synthetic "languages" over one vocabulary (see the module docstring)."""

  def __init__(self, seed: int = 1234):
    rng = np.random.default_rng(seed)
    self.succ = rng.integers(0, VOCAB, size=(VOCAB, 4))
    self.cum = np.cumsum(rng.dirichlet(np.ones(4) * 0.7, size=VOCAB), axis=1)

  def sample(self, domain: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """``[n, SEQ + 1]`` int32 token ids."""
    t = SEQ + 1
    if domain == "markov":
      x = np.empty((n, t), np.int64)
      x[:, 0] = rng.integers(0, VOCAB, n)
      for i in range(1, t):
        choice = (rng.random(n)[:, None] > self.cum[x[:, i - 1]]).sum(1)
        x[:, i] = self.succ[x[:, i - 1], np.minimum(choice, 3)]
    elif domain == "copy":
      seg = rng.integers(0, 64, size=(n, 16))
      x = np.tile(seg, (1, t // 16 + 1))[:, :t]
    elif domain == "arith":
      s = rng.integers(0, 64, size=(n, 1))
      d = rng.integers(1, 8, size=(n, 1))
      x = 64 + (s + np.arange(t)[None] * d) % 64
      noise = rng.random((n, t)) < 0.1
      x = np.where(noise, rng.integers(64, VOCAB, size=(n, t)), x)
    else:
      raise ValueError(domain)
    return x.astype(np.int32)

  def batch(self, domains: tuple[str, ...], rng: np.random.Generator, n: int) -> np.ndarray:
    which = rng.integers(0, len(domains), n)
    out = np.empty((n, SEQ + 1), np.int32)
    for j, d in enumerate(domains):
      rows = np.nonzero(which == j)[0]
      if len(rows):
        out[rows] = self.sample(d, rng, len(rows))
    return out


# ----------------------------------------------------------------------------- compute


def flops_per_token(config) -> float:
  """Training FLOPs per token of the active parameters (6 x forward matmuls + attention)."""
  c = config
  d, h, k, dh, f = c.d_model, c.num_heads, c.kv_heads, c.dh, c.d_ff
  moe_layers = set(getattr(c, "moe_layers", ()))
  att = getattr(c, "attention", None)
  fwd = 2 * d * c.vocab_size
  for i in range(c.num_layers):
    q_o, k_v, scores = 2 * d * h * dh * 2, 2 * d * k * dh * 2, 2 * 2 * SEQ * h * dh
    if i in moe_layers and att is not None:
      e = att.num_experts  # every attention expert runs, soft or top-k (attention_mixture.py)
      q_o, scores = q_o * e, scores * e
      k_v = k_v if att.shared_kv else k_v * e
    fwd += q_o + k_v + scores
    ffn = 2 * 3 * d * f
    if i in moe_layers:
      ffn = ffn * c.moe.num_selected + 2 * d * c.moe.num_experts
    fwd += ffn
  return 3.0 * fwd


# ----------------------------------------------------------------------------- training


@functools.lru_cache(maxsize=None)
def _train_step(module):
  """One jitted AdamW step per model; the learning rate is an argument (one compile)."""
  opt = optax.scale_by_adam(b2=0.98)

  def loss_fn(p, tokens):
    (logits, _), state = module.apply({"params": p}, tokens[:, :-1], mutable=["aux_loss"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    ce = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
    return ce + total_aux_loss(state), ce

  @jax.jit
  def step(params, opt_state, tokens, lr):
    (_, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = jax.tree.map(lambda w, u: w - lr * u.astype(w.dtype), params, updates)
    return params, opt_state, ce

  return opt, step


def train(module, params, data: Domains, domains, steps: int, lr: float, batch: int,
          seed: int):
  """``steps`` AdamW steps, linear warm-up (5%) then cosine decay to lr/10."""
  if steps <= 0:
    return params
  opt, step = _train_step(module)
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), max(steps, 2),
                                             lr * 0.1)
  opt_state = opt.init(params)
  rng = np.random.default_rng(seed)
  for i in range(steps):
    params, opt_state, _ = step(params, opt_state, jnp.asarray(data.batch(domains, rng, batch)),
                                jnp.float32(sched(i)))
  return params


@functools.lru_cache(maxsize=None)
def _nll(module):
  @jax.jit
  def nll(p, tokens):
    logits, _ = module.apply({"params": p}, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
  return nll


def perplexities(module, params, eval_sets) -> dict[str, float]:
  nll = _nll(module)
  out = {d: math.exp(float(nll(params, jnp.asarray(x)))) for d, x in eval_sets.items()}
  out["avg"] = float(np.mean([out[d] for d in DOMAINS]))
  return out


# ----------------------------------------------------------------------------- protocol


def run(args) -> dict:
  data = Domains()
  eval_rng = np.random.default_rng(999)
  eval_sets = {d: data.sample(d, eval_rng, args.eval_seqs) for d in DOMAINS}
  cfg = DecoderConfig(vocab_size=VOCAB, d_model=args.d_model, num_layers=args.layers,
                      num_heads=4, num_kv_heads=2, d_ff=2 * args.d_model,
                      parallel_block=True, max_seq_len=SEQ + 1)
  dense_module = registry.build_module(cfg)
  t0 = time.perf_counter()
  seed_params = registry.init_params(dense_module, "decoder", seed=args.seed)
  seed_params = train(dense_module, seed_params, data, DOMAINS, args.seed_steps, 3e-3,
                      args.batch, seed=args.seed)
  results = {"seed": {"merged": None, "final": perplexities(dense_module, seed_params,
                                                             eval_sets)}}
  print(f"[{time.perf_counter() - t0:6.1f}s] seed trained", file=sys.stderr)
  branches = []
  for j, d in enumerate(DOMAINS):
    branches.append(train(dense_module, seed_params, data, (d,), args.branch_steps, 1e-3,
                          args.batch, seed=args.seed + 1 + j))
    results[f"branch_{d}"] = {"merged": None,
                              "final": perplexities(dense_module, branches[-1], eval_sets)}
  print(f"[{time.perf_counter() - t0:6.1f}s] branches trained", file=sys.stderr)

  merged = {
      "btx": btx_merge([cfg] * 3, branches, num_selected=2, seed=args.seed),
      "bam_ekv": bam_merge([cfg] * 3, branches, shared_kv=False, seed=args.seed),
      "bam_skv": bam_merge([cfg] * 3, branches, shared_kv=True, seed=args.seed),
      "sparse": sparse_upcycle(cfg, seed_params, num_experts=3, num_selected=2,
                               seed=args.seed),
  }
  if args.ablations:
    switch = upcycled_moe_config(3, 1, renormalize=False)
    merged["bam_ekv_switch"] = bam_merge([cfg] * 3, branches, moe=switch, seed=args.seed)
    # mergekit-style routers: each domain's training sequences vs the other two
    prng = np.random.default_rng(args.seed + 100)
    prompts = [data.sample(d, prng, 16) for d in DOMAINS]
    experts = [ExpertPrompts(positive=prompts[j][:8], negative=np.concatenate(
        [prompts[i][8:12] for i in range(3) if i != j])) for j in range(3)]
    trunk = jax.tree.map(lambda *xs: average(xs), *branches)
    vectors = prompt_router_vectors(dense_module, trunk, experts)
    for name in ("btx", "bam_ekv"):
      mcfg, params = merged[name]
      merged[f"{name}_prompt"] = (mcfg, init_routers_from_vectors(params, vectors, scale=0.5))
  f_dense = flops_per_token(cfg)
  budget = args.mix_steps * flops_per_token(merged["btx"][0])  # per token, BTX's mix phase
  branch_flops = 3 * args.branch_steps * f_dense
  steps = {name: round(budget / flops_per_token(c)) for name, (c, _) in merged.items()}
  steps["sparse"] = round((budget + branch_flops) / flops_per_token(merged["sparse"][0]))
  steps["dense"] = round((budget + branch_flops) / f_dense)
  for name, (mcfg, params) in merged.items():
    module = registry.build_module(mcfg)
    start = perplexities(module, params, eval_sets)
    params = train(module, params, data, DOMAINS, steps[name], args.mix_lr, args.batch,
                   seed=args.seed + 10)
    results[name] = {"merged": start, "final": perplexities(module, params, eval_sets)}
    print(f"[{time.perf_counter() - t0:6.1f}s] {name} mixed ({steps[name]} steps)",
          file=sys.stderr)
  params = train(dense_module, seed_params, data, DOMAINS, steps["dense"], args.mix_lr,
                 args.batch, seed=args.seed + 10)
  results["dense"] = {"merged": None, "final": perplexities(dense_module, params, eval_sets)}
  results["_steps"] = steps
  results["_flops_per_token"] = {"dense": f_dense, **{n: flops_per_token(c)
                                                      for n, (c, _) in merged.items()}}
  return results


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.bam_vs_btx", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny step counts (smoke test)")
  p.add_argument("--seeds", type=int, default=1, help="repeat with this many seeds, average")
  p.add_argument("--d_model", type=int, default=64)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seed_steps", type=int, default=600)
  p.add_argument("--branch_steps", type=int, default=300)
  p.add_argument("--mix_steps", type=int, default=400, help="BTX's mixing steps (the budget)")
  p.add_argument("--mix_lr", type=float, default=1e-3)
  p.add_argument("--eval_seqs", type=int, default=128)
  p.add_argument("--ablations", action="store_true",
                 help="also: BAM with Switch (un-renormalised) top-1 FFN gates, and BTX / BAM "
                 "with routers initialised from domain prompts")
  args = p.parse_args(argv)
  if args.quick:
    args.seed_steps, args.branch_steps, args.mix_steps, args.eval_seqs = 30, 15, 20, 32

  runs = []
  for s in range(args.seeds):
    args.seed = s
    runs.append(run(args))
  names = [n for n in runs[0] if not n.startswith("_")]

  def mean(name, when, key):
    vals = [r[name][when][key] for r in runs if r[name][when] is not None]
    return float(np.mean(vals)) if vals else None

  cols = list(DOMAINS) + ["avg"]
  print(f"\nper-domain perplexity (held-out, {args.eval_seqs} seqs/domain; mean of "
        f"{args.seeds} seed(s)); steps at matched compute: {runs[0]['_steps']}")
  print(f"{'model':<16}" + "".join(f"{c:>10}" for c in cols) + f"{'avg@merge':>12}")
  for n in names:
    row = "".join(f"{mean(n, 'final', c):>10.3f}" for c in cols)
    at_merge = mean(n, "merged", "avg")
    print(f"{n:<16}{row}" + (f"{at_merge:>12.3f}" if at_merge is not None else f"{'':>12}"))
  summary = {f"{n}_avg_ppl": round(mean(n, "final", "avg"), 4) for n in names}
  summary.update({f"{n}_{d}_ppl": round(mean(n, "final", d), 4)
                  for n in ("btx", "bam_ekv", "bam_skv", "sparse", "dense") for d in DOMAINS})
  for v in ("bam_ekv", "bam_skv"):
    summary[f"{v}_over_btx_ppl"] = round(summary[f"{v}_avg_ppl"] / summary["btx_avg_ppl"], 4)
    summary[f"{v}_lt_btx"] = summary[f"{v}_avg_ppl"] < summary["btx_avg_ppl"]
    summary[f"{v}_lt_btx_all_seeds"] = all(
        r[v]["final"]["avg"] < r["btx"]["final"]["avg"] for r in runs)
  summary["seeds"] = args.seeds
  summary["quick"] = args.quick
  print(json.dumps(summary, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
