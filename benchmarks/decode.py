"""Greedy decode throughput: ours vs ``transformers.generate`` on the same random Llama.

``python benchmarks/decode.py [--quick]`` builds a ~20M-parameter Llama with
random weights, exports it through our HF exporter, loads it into both
frameworks and times greedy generation at batch 1 and 8 (same prompts, no
EOS so both produce exactly ``--new_tokens`` tokens). Times are medians of
several repeats after a warm-up (which includes our compilation). Prints a
table, then one JSON line: ``ours_over_hf_b1``, ``ours_over_hf_b8`` are time
ratios (lower is better; goal b8 <= 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_jax.runtime import tune_cpu_allocator  # noqa: E402

tune_cpu_allocator()  # before jax starts its threads (see moe_jax/runtime.py)


def median_time(fn, repeats: int) -> float:
  fn()  # warm-up (compilation, allocator, thread pools)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--quick", action="store_true")
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  if args.quick:
    args.new_tokens, args.repeats = 32, 2

  import jax
  import numpy as np
  import torch
  import transformers

  from moe_jax import decoding
  from moe_jax.checkpoints import export_hf, load_checkpoint
  from moe_jax.models import registry
  from moe_jax.models.decoder import DecoderConfig

  torch.set_num_threads(os.cpu_count() or 1)
  config = DecoderConfig(vocab_size=8192, d_model=512, num_layers=4, num_heads=8,
                         num_kv_heads=8, d_ff=1408, max_seq_len=512)
  module = registry.build_module(config)
  params = registry.init_params(module, "decoder", seed=0)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  rows, results = [], {}
  with tempfile.TemporaryDirectory() as tmp:
    export_hf(Path(tmp) / "m", config, params)
    ours = load_checkpoint(Path(tmp) / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "m").eval()
  hf.generation_config.eos_token_id = None
  hf.generation_config.pad_token_id = 0
  rng = np.random.default_rng(0)
  for batch in (1, 8):
    prompts = rng.integers(3, config.vocab_size, size=(batch, args.prompt_len))
    sampling = decoding.SamplingConfig(max_new_tokens=args.new_tokens)

    def run_ours():
      out = decoding.generate(ours.module, ours.params, prompts, sampling=sampling)
      assert out.tokens_BN.shape == (batch, args.new_tokens)

    ids = torch.tensor(prompts)

    def run_hf():
      with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                          max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                          do_sample=False)
      assert out.shape == (batch, args.prompt_len + args.new_tokens)

    t_hf = median_time(run_hf, args.repeats)
    t_ours = median_time(run_ours, args.repeats)
    toks = batch * args.new_tokens
    rows.append((batch, toks / t_ours, toks / t_hf, t_ours / t_hf))
    results[f"ours_over_hf_b{batch}"] = round(t_ours / t_hf, 4)
    results[f"ours_tok_per_s_b{batch}"] = round(toks / t_ours, 1)
    results[f"hf_tok_per_s_b{batch}"] = round(toks / t_hf, 1)

  print(f"random Llama, {n_params / 1e6:.1f}M params, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, greedy, {jax.devices()[0].platform}, "
        f"torch threads {torch.get_num_threads()}")
  print(f"{'batch':>5} {'ours tok/s':>11} {'hf tok/s':>10} {'ours/hf time':>13}")
  for b, o, h, r in rows:
    print(f"{b:>5} {o:>11.1f} {h:>10.1f} {r:>13.3f}")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
