"""``make demo``: the embedded default job.

Until the CALM reproduction replaces it: builds a tiny random Llama-style
checkpoint (HF format, written by our exporter, with a byte-level tokenizer),
loads it back through the same path users take with real checkpoints, and
generates greedily and by sampling for a batch of text prompts, printing
throughput. Needs no network.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def make_tokenizer(directory: Path) -> None:
  """A byte-level BPE-free tokenizer: 256 byte tokens plus <pad>, <s>, </s>."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

  specials = ["<pad>", "<s>", "</s>"]
  vocab = {tok: i for i, tok in enumerate(specials)}
  for _, ch in sorted(_byte_chars().items()):
    vocab[ch] = len(vocab)
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      pre_tokenizers.Split("", "isolated")])
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  tok.add_special_tokens(specials)
  tok.save(str(directory / "tokenizer.json"))


def _byte_chars() -> dict[int, str]:
  """GPT-2's byte -> printable character table (what ByteLevel pre-tokenizes into)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {b: chr(c) for b, c in zip(bs, cs)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m moe_jax.demo")
  parser.add_argument("--out", default=None, help="where to write the demo checkpoint")
  parser.add_argument("--max_new_tokens", type=int, default=48)
  args = parser.parse_args(argv)

  import jax
  import numpy as np

  from moe_jax import decoding
  from moe_jax.checkpoints import export_hf, load_checkpoint
  from moe_jax.models import registry
  from moe_jax.models.decoder import DecoderConfig

  out = Path(args.out or tempfile.mkdtemp(prefix="moe-jax-demo-")) / "tiny-llama"
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; writing {out}")
  config = DecoderConfig(vocab_size=259, d_model=128, num_layers=4, num_heads=8,
                         num_kv_heads=2, d_ff=352, tie_embeddings=False, max_seq_len=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
  module = registry.build_module(config)
  t0 = time.perf_counter()
  params = registry.init_params(module, "decoder", seed=0)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  with tempfile.TemporaryDirectory() as tok_dir:
    make_tokenizer(Path(tok_dir))
    export_hf(out, config, params, tokenizer_dir=tok_dir)
  print(f"1. random Llama-style model, {n_params / 1e6:.2f}M parameters, exported as a "
        f"Hugging Face checkpoint in {time.perf_counter() - t0:.1f}s: "
        f"{sorted(p.name for p in out.iterdir())}")

  loaded = load_checkpoint(out)
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(out / "tokenizer.json"))
  prompts = ["Mixture of experts", "Upcycling a dense model", "CALM composes two LMs",
             "Hello"] * 2
  ids = [tok.encode(p).ids for p in prompts]
  print(f"2. loaded back ({type(loaded.config).__name__}, {loaded.config.num_layers} layers, "
        f"GQA {loaded.config.num_heads}q/{loaded.config.kv_heads}kv); batch of {len(ids)} prompts")
  for name, kw in (("greedy", dict(temperature=0.0)),
                   ("sampling T=0.8 top_p=0.9", dict(temperature=0.8, top_p=0.9, seed=1))):
    sampling = decoding.SamplingConfig(max_new_tokens=args.max_new_tokens, eos_id=2, pad_id=0,
                                       **kw)
    t0 = time.perf_counter()
    decoding.generate(loaded.module, loaded.params, ids, sampling=sampling)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = decoding.generate(loaded.module, loaded.params, ids, sampling=sampling)
    run_s = time.perf_counter() - t0
    n = int(result.lengths_B.sum())
    print(f"3. {name}: {n} tokens in {run_s:.3f}s = {n / run_s:.0f} tok/s "
          f"(first call incl. compile {compile_s:.1f}s)")
    for prompt, row in list(zip(prompts, result.to_lists()))[:2]:
      print(f"   {prompt!r} -> {tok.decode(row)!r}")
  print("(the weights are random, so the text is noise; the point is the pipeline.)")


if __name__ == "__main__":
  from moe_jax.runtime import tune_cpu_allocator

  tune_cpu_allocator()  # before jax starts its threads
  main()
