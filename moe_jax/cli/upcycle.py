"""Upcycle dense checkpoints into an MoE: ``python -m moe_jax.upcycle --method ... --out DIR``.

Examples::

    # sparse upcycling: one dense model, FFN copied into 8 experts, top-2
    python -m moe_jax.upcycle --method sparse --num_experts 8 --top_k 2 \\
        --checkpoints /ckpt/llama --out /ckpt/llama_moe8

    # BTX: a seed's three domain branches -> 3 FFN experts, the rest averaged
    python -m moe_jax.upcycle --method btx --checkpoints /b/code /b/math /b/law --out /ckpt/btx

    # BAM, shared-KV variant: FFN + attention experts, one KV cache per layer
    python -m moe_jax.upcycle --method bam --shared_kv --checkpoints /b/code /b/math /b/law \\
        --out /ckpt/bam

    python -m moe_jax.generate --checkpoint /ckpt/bam --prompt_ids "1 2 3"
    python -m moe_jax.train --gin_file=/ckpt/bam/finetune.gin --model_dir=/ckpt/bam/train

Inputs are Hugging Face directories (Llama / Mistral / Qwen2), moe-jax
``save_model`` directories or training ``model_dir`` s; they must share one
architecture (a mismatch is an error naming the tensor and both shapes).
``--router_init prompts --prompts FILE`` initialises the routers from
per-expert positive/negative prompts (mergekit-moe style, see
:mod:`moe_jax.upcycle.router_init`); FILE is JSON ``[{"positive": [...],
"negative": [...]}, ...]`` with one entry per expert, prompts as text (needs
a tokenizer.json) or token-id lists. ``--export_mixtral DIR`` also writes a
Hugging Face MixtralForCausalLM checkpoint (sparse / BTX with standard
attention only; BAM's attention experts have no Mixtral equivalent).

``--target qwen2_moe`` / ``qwen3_moe`` picks another transformers architecture
for ``--export_hf DIR`` (Qwen2-MoE: with a sigmoid-gated shared expert made
from the dense FFN; Qwen3-MoE: from a Qwen3 backbone); ``--shared_expert``
adds a shared expert without a target (``--no_shared_expert_gate``:
DeepSeek-style, ungated), ``--shared_expert_scale`` is mergekit-moe's
``residual_scale`` (see :mod:`moe_jax.upcycle.targets`)::

    python -m moe_jax.upcycle --method sparse --num_experts 8 --target qwen2_moe \
        --checkpoints /ckpt/llama --out /ckpt/llama_moe8 --export_hf /ckpt/llama_qwen2moe

The output directory layout is described in :mod:`moe_jax.upcycle.io`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from moe_jax.checkpoints.hf_common import CheckpointError

PROG = "python -m moe_jax.upcycle"


def parse_args(argv=None) -> argparse.Namespace:
  from moe_jax.upcycle.methods import METHODS

  p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--method", required=True, choices=tuple(METHODS))
  p.add_argument("--checkpoints", required=True, nargs="+", metavar="DIR",
                 help="dense inputs (sparse: exactly one)")
  p.add_argument("--out", required=True, help="output directory (replaced atomically)")
  p.add_argument("--num_experts", type=int, default=None,
                 help="E (sparse: required; btx/bam: the number of checkpoints)")
  p.add_argument("--top_k", type=int, default=None,
                 help="FFN experts per token (default: sparse 2, btx 2, bam 1)")
  p.add_argument("--shared_kv", action="store_true", help="bam: one shared k/v per layer")
  p.add_argument("--attention_top_k", type=int, default=None,
                 help="bam: top-k attention experts (default: soft, all experts)")
  p.add_argument("--moe_layout", default="every",
                 help="'every', 'every_other' or comma-separated layer indices")
  p.add_argument("--noise_std", type=float, default=0.0,
                 help="sparse: relative noise on the expert copies")
  p.add_argument("--capacity_factor", default="none",
                 help="expert capacity factor, or 'none' for dropless (default)")
  p.add_argument("--no_renormalize", action="store_true",
                 help="Switch gates (router probability) instead of renormalised top-k gates")
  p.add_argument("--router_init", choices=("random", "prompts"), default="random")
  p.add_argument("--prompts", help="JSON prompts file for --router_init prompts")
  p.add_argument("--router_scale", type=float, default=1.0,
                 help="--router_init prompts: norm of each router row")
  p.add_argument("--tokenizer", help="directory with tokenizer.json (default: first checkpoint)")
  p.add_argument("--dtype", default=None, help="parameter dtype: float32, bfloat16, float16")
  p.add_argument("--seed", type=int, default=0, help="routers and noise")
  p.add_argument("--export_mixtral", metavar="DIR", help="also write an HF Mixtral checkpoint")
  p.add_argument("--target", choices=("mixtral", "qwen2_moe", "qwen3_moe"), default=None,
                 help="transformers architecture of --export_hf (default: Mixtral)")
  p.add_argument("--export_hf", metavar="DIR",
                 help="also write an HF checkpoint of the --target architecture")
  p.add_argument("--shared_expert", action="store_true",
                 help="add a shared expert from the dense FFN (implied by --target qwen2_moe)")
  p.add_argument("--no_shared_expert_gate", action="store_true",
                 help="shared expert without Qwen2-MoE's sigmoid gate (DeepSeek-style)")
  p.add_argument("--shared_expert_scale", type=float, default=None,
                 help="scale of the shared expert's down-projection (mergekit's residual_scale; "
                      "default: half the FFN shared, half routed)")
  p.add_argument("--safetensors", action="store_true",
                 help="also write params.safetensors (native copy) beside the orbax checkpoint")
  return p.parse_args(argv)


def _layout(text: str):
  if text in ("every", "every_other"):
    return text
  try:
    return tuple(int(t) for t in text.split(","))
  except ValueError:
    raise CheckpointError(f"--moe_layout {text!r}: use 'every', 'every_other' or layer "
                          "indices like '1,3'") from None


def _capacity_factor(text: str) -> float | None:
  if str(text).lower() == "none":
    return None
  try:
    return float(text)
  except ValueError:
    raise CheckpointError(f"--capacity_factor {text!r}: a number or 'none'") from None


def _method_options(args) -> dict:
  """The method-specific flags that were given (the registry checks they fit the method)."""
  given = {"noise_std": args.noise_std or None, "shared_kv": args.shared_kv or None,
           "attention_top_k": args.attention_top_k}
  return {k: v for k, v in given.items() if v is not None}


def _target_options(args) -> dict:
  """Shared expert and export architecture (checked by the registry before any surgery)."""
  target = args.target
  if args.export_mixtral:
    if target not in (None, "mixtral"):
      raise CheckpointError(f"--export_mixtral writes Mixtral, not --target {target}; use "
                            "--export_hf")
    target = "mixtral"
  return dict(target=target, shared_expert=args.shared_expert or None,
              shared_expert_gate=not args.no_shared_expert_gate,
              shared_expert_scale=args.shared_expert_scale)


def build(args) -> tuple:
  """``(config, params, loaded inputs)`` for parsed arguments."""
  from moe_jax.upcycle import methods
  from moe_jax.upcycle.io import load_dense

  dirs, options = args.checkpoints, _method_options(args)
  targets = _target_options(args)
  try:  # before loading anything
    method = methods.check(args.method, len(dirs), num_experts=args.num_experts,
                           options=options, owner=PROG)
    methods.check_target(targets["target"], targets["shared_expert"], label=method.label,
                         name=method.name, attention_experts=method.attention_experts,
                         owner=PROG)
    for flag in ("top_k", "attention_top_k"):  # explicit numbers are taken literally
      value = getattr(args, flag)
      if value is not None and value < 1:
        raise ValueError(f"{PROG}: --{flag} must be a positive integer, got {value}")
  except ValueError as e:
    raise CheckpointError(str(e)) from None
  loaded = [load_dense(d, dtype=args.dtype) for d in dirs]
  config, out = methods.upcycle(
      args.method, [m.config for m in loaded], [m.params for m in loaded],
      num_experts=args.num_experts, top_k=args.top_k,
      capacity_factor=_capacity_factor(args.capacity_factor),
      renormalize=not args.no_renormalize, moe_layout=_layout(args.moe_layout), seed=args.seed,
      names=dirs, owner=PROG, **targets, **options)
  if args.router_init == "prompts":
    out = _prompt_routers(args, loaded, out, config.moe.num_experts)
  elif args.prompts:
    raise CheckpointError("--prompts needs --router_init prompts")
  return config, out, loaded


def _prompt_routers(args, loaded, params, num_experts):
  import jax

  from moe_jax.upcycle.common import average
  from moe_jax.upcycle.io import read_prompts
  from moe_jax.upcycle.router_init import init_routers_from_vectors, prompt_router_vectors

  if not args.prompts:
    raise CheckpointError("--router_init prompts needs --prompts FILE")
  tok = args.tokenizer or loaded[0].tokenizer_dir or args.checkpoints[0]
  experts = read_prompts(args.prompts, num_experts, tok)
  # The trunk the merged model shares: the average of the dense inputs.
  trunk = jax.tree.map(lambda *xs: average(xs), *[m.params for m in loaded])
  vectors = prompt_router_vectors(loaded[0].module, trunk, experts)
  return init_routers_from_vectors(params, vectors, scale=args.router_scale)


def main(argv=None) -> int:
  args = parse_args(argv)
  from moe_jax.upcycle.io import write_upcycled

  command = "python -m moe_jax.upcycle " + " ".join(
      shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
  try:
    config, params, loaded = build(args)
    export = args.export_hf or args.export_mixtral
    if export:  # refuse before writing anything
      from moe_jax.checkpoints.hf import converter_for_config
      converter_for_config(config).config_to_hf(config)
    out = write_upcycled(
        args.out, config, params, command=command, write_safetensors=args.safetensors,
        tokenizer_dir=args.tokenizer or loaded[0].tokenizer_dir,
        provenance={"method": args.method, "inputs": [m.source for m in loaded],
                    "args": vars(args)})
    if export:
      from moe_jax.checkpoints import export_hf
      export_hf(export, config, params,
                tokenizer_dir=args.tokenizer or loaded[0].tokenizer_dir)
  except (CheckpointError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  m = config.moe
  print(f"wrote {type(config).__name__} ({args.method}, {m.num_experts} experts, "
        f"top-{m.num_selected}) to {out}\n"
        f"  generate: python -m moe_jax.generate --checkpoint {out} --prompt_ids \"1 2 3\"\n"
        f"  train:    python -m moe_jax.train --gin_file={Path(out) / 'finetune.gin'} "
        f"--model_dir={Path(out) / 'train'}"
        + (f"\n  mixtral:  {args.export_mixtral}" if args.export_mixtral else "")
        + (f"\n  hf:       {args.export_hf}" if args.export_hf else ""))
  return 0

