"""Trainer overhead: our ``Trainer.train`` loop vs a bare hand-written jitted optax loop.

``python benchmarks/trainer.py [--quick]`` trains the same small decoder on the
same in-memory batches (numpy, as a data pipeline would hand them over) two
ways, side by side:

* **bare**: ``jax.jit`` of ``value_and_grad(cross-entropy) -> optax update``,
  state donated, called in a Python loop;
* **trainer**: :class:`moe_jax.train.trainer.Trainer` (partitioner-sharded
  batch, z-loss, accuracy / gradient-norm / learning-rate metrics kept on
  device and fetched every ``log_every`` steps, per-step RNG, NaN checks).

Both use Adafactor with t5x's defaults. Each repeat times ``--steps`` steps
(blocking at the end); times are medians over repeats after a warm-up repeat
(compilation), bare and trainer repeats interleaved (alternating which goes
first). Prints a table, then one JSON line whose ``trainer_over_bare`` is
median time(trainer) / median time(bare) per step (goal <= 1.05);
``trainer_over_bare_paired`` is the median of the per-pair ratios, which is
less sensitive to load drifting on a shared machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_jax.runtime import tune_cpu_allocator  # noqa: E402

tune_cpu_allocator()  # before jax starts its threads (see moe_jax/runtime.py)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  p.add_argument("--steps", type=int, default=30, help="steps per timed repeat")
  p.add_argument("--repeats", type=int, default=11)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=64)
  args = p.parse_args()
  if args.quick:
    args.steps, args.repeats = 20, 7

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from moe_jax.models.decoder import DecoderConfig
  from moe_jax.train.wrappers import DecoderOnlyModel
  from moe_jax.train.optimizers import OptimizerConfig, ScheduleConfig, make_optimizer
  from moe_jax.train.partitioner import Partitioner, PartitionerConfig
  from moe_jax.train.trainer import Trainer, TrainerConfig

  config = DecoderConfig(vocab_size=1024, d_model=128, num_layers=2, num_heads=4,
                         num_kv_heads=4, d_ff=384, max_seq_len=args.length)
  model = DecoderOnlyModel(config)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(args.steps):
    t = rng.integers(1, config.vocab_size, (args.batch, args.length)).astype(np.int32)
    batches.append({"decoder_input_tokens": t, "decoder_target_tokens": np.roll(t, -1, 1),
                    "decoder_loss_weights": np.ones_like(t)})
  params0 = jax.device_get(jax.jit(model.init_params)(jax.random.key(0)))
  lr = 1e-2

  # -- bare: what one writes by hand ---------------------------------------------
  tx = optax.adafactor(lr)

  def bare_step(params, opt_state, batch):
    def loss_fn(p):
      logits, _ = model.module.apply({"params": p}, batch["decoder_input_tokens"])
      ce = optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), batch["decoder_target_tokens"])
      w = batch["decoder_loss_weights"].astype(jnp.float32)
      return jnp.sum(ce * w) / jnp.sum(w)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  bare_jit = jax.jit(bare_step, donate_argnums=(0, 1))
  bare_state = [jax.device_put(params0), None]
  bare_state[1] = tx.init(bare_state[0])

  def run_bare():
    params, opt_state = bare_state
    for batch in batches:
      params, opt_state, loss = bare_jit(params, opt_state, batch)
    jax.block_until_ready((params, opt_state, loss))
    bare_state[:] = [params, opt_state]

  # -- ours ------------------------------------------------------------------------
  optimizer = make_optimizer(OptimizerConfig(name="adafactor",
                                             schedule=ScheduleConfig(kind="constant", lr=lr)),
                             params0)
  trainer = Trainer(model=model, optimizer=optimizer,
                    partitioner=Partitioner(PartitionerConfig(), devices=jax.devices()[:1]),
                    config=TrainerConfig(num_train_steps=0, log_every=100, progress_bar=False))
  ours_state = [trainer.state_from_params(jax.device_put(params0, trainer.state_shardings.params))]

  def run_trainer():
    state = ours_state[0]
    start = int(jax.device_get(state.step))
    trainer.config = dataclasses.replace(trainer.config, num_train_steps=start + args.steps)
    state = trainer.train(state, iter(batches))
    jax.block_until_ready(state)
    ours_state[0] = state

  times = {"bare": [], "trainer": []}
  pairs = []
  run_bare()
  run_trainer()  # warm-up: compilation
  order = [("bare", run_bare), ("trainer", run_trainer)]
  for i in range(args.repeats):
    for name, fn in (order if i % 2 == 0 else order[::-1]):  # alternate who goes first
      t0 = time.perf_counter()
      fn()
      times[name].append((time.perf_counter() - t0) / args.steps)
    pairs.append(times["trainer"][-1] / times["bare"][-1])
  med = {k: statistics.median(v) for k, v in times.items()}
  ratio = med["trainer"] / med["bare"]
  n_params = sum(x.size for x in jax.tree.leaves(params0))
  print(f"decoder {n_params / 1e6:.2f}M params, batch {args.batch}x{args.length}, "
        f"{args.steps} steps x {args.repeats} repeats, device {jax.devices()[0].platform}")
  print(f"{'loop':<10}{'ms/step (median)':>18}{'min':>10}{'max':>10}")
  for name in ("bare", "trainer"):
    v = times[name]
    print(f"{name:<10}{1e3 * med[name]:>18.2f}{1e3 * min(v):>10.2f}{1e3 * max(v):>10.2f}")
  print(f"trainer_over_bare = {ratio:.3f} (goal <= 1.05); median of paired repeats "
        f"{statistics.median(pairs):.3f}")
  print(json.dumps({"trainer_over_bare": round(ratio, 4),
                    "trainer_over_bare_paired": round(statistics.median(pairs), 4),
                    "bare_ms_per_step": round(1e3 * med["bare"], 3),
                    "trainer_ms_per_step": round(1e3 * med["trainer"], 3)}))


if __name__ == "__main__":
  main()
