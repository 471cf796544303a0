"""Generate from a checkpoint: ``python -m moe_jax.generate --checkpoint DIR ...``.

``--checkpoint`` takes a Hugging Face directory or one of ours. Text prompts
(``--prompt``, repeatable) need a ``tokenizer.json`` in the checkpoint
directory (or ``--tokenizer DIR``) and print decoded text; ``--prompt_ids
"1 2 3"`` (repeatable) prints the generated ids, one space-separated line per
sequence. Several prompts are decoded as one left-padded batch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from moe_jax.checkpoints.hf_common import CheckpointError


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m moe_jax.generate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="HF or moe-jax checkpoint directory")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", action="append", help="text prompt (repeatable)")
  src.add_argument("--prompt_ids", action="append",
                   help='space-separated token ids, e.g. "1 2 3" (repeatable)')
  p.add_argument("--tokenizer", help="directory with tokenizer.json (default: the checkpoint)")
  p.add_argument("--max_new_tokens", type=int, default=32)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top_k", type=int, default=None)
  p.add_argument("--top_p", type=float, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default=None, help="parameter dtype: float32, bfloat16, float16")
  p.add_argument("--timing", action="store_true", help="print tokens/s to stderr")
  return p.parse_args(argv)


def _parse_ids(text: str) -> list[int]:
  try:
    ids = [int(t) for t in text.replace(",", " ").split()]
  except ValueError:
    raise SystemExit(f"error: --prompt_ids {text!r}: expected space-separated integers")
  if not ids:
    raise SystemExit("error: --prompt_ids is empty")
  return ids


def main(argv=None) -> int:
  args = parse_args(argv)
  from moe_jax import decoding
  from moe_jax.checkpoints import load_checkpoint

  try:
    loaded = load_checkpoint(args.checkpoint, dtype=args.dtype)
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  tokenizer = None
  if args.prompt is not None:
    from tokenizers import Tokenizer

    tok_dir = Path(args.tokenizer or loaded.tokenizer_dir or args.checkpoint)
    if not (tok_dir / "tokenizer.json").exists():
      print(f"error: {tok_dir / 'tokenizer.json'} not found; pass --tokenizer DIR or use "
            "--prompt_ids", file=sys.stderr)
      return 2
    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    prompts = [tokenizer.encode(text).ids for text in args.prompt]
  else:
    prompts = [_parse_ids(text) for text in args.prompt_ids]
  cfg = loaded.config
  pad = cfg.pad_token_id if getattr(cfg, "pad_token_id", None) is not None else 0
  try:
    sampling = decoding.SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, eos_id=getattr(cfg, "eos_token_id", None),
        pad_id=pad)
    start = time.perf_counter()
    out = decoding.generate(loaded.module, loaded.params, prompts, sampling=sampling)
    elapsed = time.perf_counter() - start
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for row in out.to_lists():
    if tokenizer is not None:
      print(tokenizer.decode(row, skip_special_tokens=True))
    else:
      print(" ".join(map(str, row)))
  if args.timing:
    n = int(out.lengths_B.sum())
    print(f"{n} tokens in {elapsed:.2f}s (including compilation): {n / elapsed:.1f} tok/s",
          file=sys.stderr)
  return 0

