"""Train-step cost of the parameter-efficient methods, and ours vs Hugging Face ``peft``.

``python benchmarks/peft.py [--quick]`` builds one random Llama-style decoder
and times a full training step (forward, backward to the adapters, AdamW
update) for (IA)^3, MoV-10, LoRA and MoLoRA-10 (rank 4, on ``q`` and ``v``
for the LoRA family; ``k``, ``v`` and the FFN for the (IA)^3 family), then
the same LoRA step in PyTorch with ``peft`` on ``transformers``'
``LlamaForCausalLM`` of the same size and weights (exported through our HF
exporter), same batch.

Our step differentiates with respect to the adapters only (the backbone is a
non-differentiated input), which is what ``trainable_mask`` +
``masked_optimizer`` amount to once XLA drops the zeroed frozen gradients;
``peft`` freezes the backbone with ``requires_grad=False``. Times are medians
over rounds that run every method once each (so drift from other load on the
machine hits all of them alike), after a warm-up that includes compilation.

Prints a table, then one JSON line: ``mov10_over_ia3`` (goal <= 1.15),
``molora10_over_lora`` (goal <= 1.5), ``ours_lora_over_hf_peft`` (goal <= 0.7)
are time ratios, lower is better.

Page faults per step (``getrusage`` minor faults over the timed steps) are in
the table: the script tunes glibc's allocator first (:mod:`moe_jax.runtime`),
and unless ``--no-baseline`` it reruns itself with the tuning off
(``MOE_JAX_MALLOC_TUNING=0``) and reports that run's step times and faults
beside ours (``untuned_*`` keys).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This script is named like the Hugging Face package it compares against: take its
# own directory off the path so ``import peft`` finds the package, not this file.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from moe_jax.runtime import tune_cpu_allocator  # noqa: E402


def jax_step(model, params, peft_mod, optax, jax, jnp, lr: float):
  """A jitted AdamW step over the adapters; returns ``(run(batch), adapter count)``."""
  backbone, adapters = peft_mod.split_params(params)
  tx = optax.adamw(lr)
  state = {"adapters": adapters, "opt": tx.init(adapters)}
  collections = [peft_mod.AUX_LOSS_COLLECTION, peft_mod.METRICS_COLLECTION]

  def loss_fn(adapters, backbone, tokens):
    (logits, _), aux = model.apply({"params": peft_mod.merge_params(backbone, adapters)},
                                   tokens, mutable=collections)
    # Next-token targets without slicing the logits (``logits[:, :-1]`` copies all of
    # them): the last position predicts a dummy target and gets weight 0.
    targets = jnp.roll(tokens, -1, axis=1)
    weights = (jnp.arange(tokens.shape[1]) < tokens.shape[1] - 1).astype(jnp.float32)
    ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    ce = jnp.sum(ce_BL * weights) / (tokens.shape[0] * (tokens.shape[1] - 1))
    return ce + peft_mod.total_aux_loss(aux)

  @jax.jit
  def step(adapters, opt_state, backbone, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(adapters, backbone, tokens)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  def run(tokens):
    state["adapters"], state["opt"], loss = step(state["adapters"], state["opt"], backbone,
                                                 tokens)
    jax.block_until_ready(loss)

  return run


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=128)
  p.add_argument("--no-baseline", action="store_true",
                 help="skip the rerun with glibc's allocator untuned")
  args = p.parse_args()
  if args.quick:
    args.rounds = 3
  tuned = tune_cpu_allocator()

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import torch
  import transformers

  from moe_jax import peft
  from moe_jax.checkpoints import export_hf
  from moe_jax.models import registry
  from moe_jax.models.decoder import DecoderConfig

  try:
    import peft as hf_peft
  except ImportError:
    hf_peft = None

  import warnings
  warnings.filterwarnings("ignore")
  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  torch.set_num_threads(os.cpu_count() or 1)
  config = DecoderConfig(vocab_size=2048, d_model=256, num_layers=4, num_heads=4,
                         num_kv_heads=4, d_ff=704, max_seq_len=512)
  module = registry.build_module(config)
  base = registry.init_params(module, "decoder", seed=0)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size,
                                                         (args.batch, args.length)))

  methods = {
      "ia3": peft.PeftConfig(method="ia3"),
      "mov10": peft.PeftConfig(method="mov", num_experts=10),
      "lora": peft.PeftConfig(method="lora", rank=4, alpha=8.0),
      "molora10": peft.PeftConfig(method="molora", num_experts=10, rank=4, alpha=8.0),
  }
  runs, counts = {}, {}
  for name, cfg in methods.items():
    model = peft.adapt(module, cfg)
    params = peft.init_adapter_params(model, base, jax.random.key(1))
    counts[name] = peft.parameter_report(params)
    runs[name] = jax_step(model, params, peft, optax, jax, jnp, 1e-3)

  if hf_peft is not None:
    with tempfile.TemporaryDirectory() as tmp:
      export_hf(Path(tmp) / "base", config, base)
      hf_model = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "base")
    lora = hf_peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                              target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    hf_model = hf_peft.get_peft_model(hf_model, lora).train()
    opt = torch.optim.AdamW([q for q in hf_model.parameters() if q.requires_grad], lr=1e-3)
    hf_tokens = torch.tensor(np.asarray(tokens), dtype=torch.long)

    def hf_step(_tokens):  # same signature as ours; uses the same batch, as torch tensors
      opt.zero_grad(set_to_none=True)
      loss = hf_model(input_ids=hf_tokens, labels=hf_tokens).loss
      loss.backward()
      opt.step()

    counts["hf_peft_lora"] = {"trainable": sum(q.numel() for q in hf_model.parameters()
                                               if q.requires_grad)}
    runs["hf_peft_lora"] = hf_step

  for fn in runs.values():  # warm-up: compilation, allocators, thread pools
    fn(tokens)
  times: dict[str, list[float]] = {name: [] for name in runs}
  faults = {name: 0 for name in runs}
  for _ in range(args.rounds):
    for name, fn in runs.items():
      f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      t0 = time.perf_counter()
      fn(tokens)
      times[name].append(time.perf_counter() - t0)
      faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
  med = {name: statistics.median(t) for name, t in times.items()}
  faults = {name: f / args.rounds for name, f in faults.items()}
  base = None if args.no_baseline or not tuned else _untuned_baseline(args)

  print(f"train step, batch {args.batch} x {args.length} tokens, decoder d_model="
        f"{config.d_model} x {config.num_layers} layers, {len(jax.devices())} jax device(s), "
        f"{torch.get_num_threads()} torch threads; median of {args.rounds} rounds; "
        f"glibc allocator {'tuned' if tuned else 'untuned'}")
  print(f"{'method':<14} {'trainable':>10} {'share %':>8} {'step ms':>9} {'faults/step':>12}"
        + (f" {'untuned ms':>11} {'untuned faults':>15}" if base else ""))
  for name in runs:
    c = counts[name]
    share = f"{c['share_percent']:.3f}" if "share_percent" in c else "-"
    row = (f"{name:<14} {c['trainable']:>10} {share:>8} {1e3 * med[name]:>9.1f} "
           f"{faults[name]:>12.0f}")
    if base:
      row += f" {base['step_ms'][name]:>11.1f} {base['faults_per_step'][name]:>15.0f}"
    print(row)
  if counts.get("hf_peft_lora") and counts["hf_peft_lora"]["trainable"] != counts["lora"][
      "trainable"]:
    print(f"note: trainable counts differ (ours {counts['lora']['trainable']}, peft "
          f"{counts['hf_peft_lora']['trainable']})")
  result = {
      "mov10_over_ia3": round(med["mov10"] / med["ia3"], 4),
      "molora10_over_lora": round(med["molora10"] / med["lora"], 4),
      "ours_lora_over_hf_peft": (round(med["lora"] / med["hf_peft_lora"], 4)
                                 if "hf_peft_lora" in med else None),
      "step_ms": {k: round(1e3 * v, 2) for k, v in med.items()},
      "faults_per_step": {k: round(v) for k, v in faults.items()},
      "allocator_tuned": tuned,
  }
  if base:
    result["untuned_step_ms"] = base["step_ms"]
    result["untuned_faults_per_step"] = base["faults_per_step"]
    result["untuned_ours_lora_over_hf_peft"] = base["ours_lora_over_hf_peft"]
  if hf_peft is None:
    print("note: `peft` is not installed; ours_lora_over_hf_peft is null "
          "(pip install peft)")
  print(json.dumps(result))


def _untuned_baseline(args) -> dict | None:
  """This benchmark rerun in a child process with glibc's allocator left as it is."""
  argv = [sys.executable, str(Path(__file__).resolve()), "--no-baseline", "--rounds",
          str(args.rounds), "--batch", str(args.batch), "--length", str(args.length)]
  env = dict(os.environ, MOE_JAX_MALLOC_TUNING="0")
  out = subprocess.run(argv, env=env, capture_output=True, text=True)
  if out.returncode != 0:
    print(f"note: the untuned baseline failed:\n{out.stderr[-2000:]}")
    return None
  return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
  main()
