"""Small-scale reproduction of CALM's Table 1 (KV arithmetic) on CPU.

1. Generate keys -> values and the three tasks (:mod:`calm_jax.tasks`).
2. Train m_A on KV-SUBS (it learns the key -> value table) and m_B on
   NUM-MATH (it learns arithmetic), each with the moe-jax trainer.
3. Compose them (m_B anchor, m_A augmenting), train only the composition
   layers on KV-MATH over 20% of the keys.
4. Report exact-match accuracy of m_A, m_B and CALM on held-out test
   expressions of KV-SUBS, NUM-MATH and KV-MATH, print the table and plot it.

``python -m experiments.calm_kv_arithmetic [--out DIR] [--quick]`` from the
repository root; ``make demo`` runs it. Built on the library's public API
(:mod:`calm_jax`, :mod:`moe_jax.train.run`, :mod:`moe_jax.api`); the steps of
:func:`run` are the functions below it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

PAPER_KV_MATH = {"m_A": 0.7, "m_B": 0.0, "CALM": 84.3}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReproConfig:
  """Sizes and budgets (defaults: about 12 minutes on 2 quiet CPU cores).

  The defaults shrink the paper's setting (25K keys with unique values 1-25K,
  3-6 operands with + - x) to what tiny models learn in minutes on a CPU:
  100 keys with values 0-99, 2 operands with + and -. Composition still trains
  on KV-MATH over 20% of the keys and is tested on held-out expressions over
  all keys; 20% of 100 keys is 20 distinct values, where the paper's 20% is
  5000 (``num_keys`` and ``value_range`` move towards it).

  Three choices make m_A's key positions carry the values at all (measured
  with :func:`value_probe`): ``tokens="keys"`` (each key one token, as a
  trained tokenizer keeps frequent strings whole; ``"bytes"``/``"chars"``
  split keys into characters), ``m_a_hints`` (m_A also trains on KV-HINTS,
  with the loss on its inputs, see :mod:`calm_jax.tasks`) with
  ``hint_style`` (``None``: ``"lettered"``, or ``"forward"`` with
  ``tokens="numbers"``), and ``cover_digits`` (the composition keys' values
  show every digit in every place).
  ``--set`` restores any of the paper's settings (with longer budgets).

  Off by default (none raised held-out KV-MATH, see the README):
  ``tokens="numbers"`` (each value one token), ``shared_base`` (m_A is
  fine-tuned from m_B, so both share its number embeddings; needs equal
  sizes), ``freeze_m_a_embeddings``, ``embed_init_std``, ``tie_embeddings``
  and explicit composition ``layer_pairs`` (``(a, b)``: m_A layer ``a`` into
  m_B after layer ``b``).

  ``oracle_m_a`` (a diagnostic) composes m_B with
  :func:`oracle_augmenting_model` instead of a trained m_A: a perfect,
  key-independent code of every key's value, so held-out KV-MATH then shows
  what the composition and m_B can make of the best possible m_A.
  ``composition_key_fraction`` (the paper: 0.2) is the share of keys composition
  training sees; m_A and m_B do not depend on it (``--reuse`` keeps them).
  """

  seed: int = 0
  num_keys: int = 100
  value_range: tuple[int, int] = (0, 99)
  num_operands: tuple[int, int] = (2, 2)
  ops: tuple[str, ...] = ("+", "-")
  d_model_a: int = 96
  layers_a: int = 4
  d_model_b: int = 128
  layers_b: int = 4
  composition_layers: int = 4
  steps_a: int = 600
  steps_b: int = 1500
  steps_calm: int = 1500
  batch_size: int = 32
  lr: float = 3e-3
  num_eval: int = 128
  input_length: int = 32
  target_length: int = 16
  tokens: str = "keys"
  m_a_hints: bool = True
  hint_style: str | None = None
  cover_digits: bool = True
  shared_base: bool = False
  freeze_m_a_embeddings: bool = False
  embed_init_std: float = 1.0
  tie_embeddings: bool = False
  layer_pairs: tuple[tuple[int, int], ...] | None = None
  oracle_m_a: bool = False
  composition_key_fraction: float = 0.2


#: Columns of the results table and plot: the paper's three views on held-out test
#: expressions, then KV-MATH over the composition keys and over no composition key.
_COLUMNS = ("kv_subs", "num_math", "kv_math", "kv_math_comp", "kv_math_new")
_TASK_FIELDS = ("seed", "num_keys", "value_range", "num_operands", "ops", "batch_size", "lr",
                "input_length", "target_length", "tokens", "embed_init_std", "tie_embeddings")
TOKENS = ("bytes", "chars", "keys", "numbers")
#: ReproConfig fields a saved m_A / m_B depends on (``--reuse`` checks them).
_RECIPE = {"m_a": _TASK_FIELDS + ("d_model_a", "layers_a", "steps_a", "m_a_hints", "hint_style",
                                  "shared_base", "freeze_m_a_embeddings"),
           "m_b": _TASK_FIELDS + ("d_model_b", "layers_b", "steps_b")}

QUICK = dict(num_keys=12, value_range=(1, 12), num_operands=(2, 3), d_model_a=32, layers_a=2,
             d_model_b=32, layers_b=2, composition_layers=1, steps_a=30, steps_b=30, steps_calm=30,
             batch_size=16, num_eval=16, input_length=48, target_length=24)


def _decoder_config(vocab_size: int, d: int, layers: int, rc: ReproConfig):
  from moe_jax.models.decoder import DecoderConfig
  return DecoderConfig(vocab_size=vocab_size, d_model=d, num_layers=layers, num_heads=4,
                       d_ff=4 * d, max_seq_len=128, pad_token_id=0, eos_token_id=1,
                       embed_init_std=rc.embed_init_std, tie_embeddings=rc.tie_embeddings)


def _trainer(config: Any, module: Any, rc: ReproConfig, steps: int, trainable=None,
             progress: bool = True):
  import jax

  from moe_jax.train.optimizers import OptimizerConfig, ScheduleConfig
  from moe_jax.train.partitioner import Partitioner, PartitionerConfig
  from moe_jax.train.run import build_trainer
  from moe_jax.train.trainer import TrainerConfig
  from moe_jax.train.wrappers import DecoderOnlyModel

  model = DecoderOnlyModel(config, module=module, allow_causal_prefix_lm=True)
  schedule = ScheduleConfig(kind="cosine", lr=rc.lr, warmup_steps=min(100, steps // 10),
                            decay_steps=steps, end_lr=rc.lr * 0.05)
  return build_trainer(
      model, optimizer=OptimizerConfig(name="adamw", schedule=schedule, weight_decay=0.01,
                                       clip_grad_norm=1.0),
      partitioner=Partitioner(PartitionerConfig(data=1), devices=jax.devices()[:1]),
      trainer=TrainerConfig(num_train_steps=steps, log_every=max(1, steps // 5), seed=rc.seed,
                            progress_bar=progress),
      trainable=trainable)


def _batches(trainer, task: str, rc: ReproConfig, loss_on_inputs: bool = False):
  """Packed prefix-LM batches of ``task``; ``loss_on_inputs`` weights every real token."""
  from moe_jax.train.trainer import DatasetConfig, make_data_iterator
  ds = DatasetConfig(mixture_or_task_name=task, batch_size=rc.batch_size,
                     task_feature_lengths={"inputs": rc.input_length,
                                           "targets": rc.target_length},
                     feature_converter="prefix_lm", pack=True, seed=rc.seed)
  batches = make_data_iterator(ds, trainer.model)
  if not loss_on_inputs:
    return batches
  return ({**b, "decoder_loss_weights": (b["decoder_target_tokens"] > 0).astype(
      b["decoder_loss_weights"].dtype)} for b in batches)


def exact_match(model, examples, vocab, batch_size: int = 64, progress=None) -> float:
  """Greedy exact-match accuracy (%) of ``targets`` given ``inputs``.

  Prompts are encoded as the training pipeline presents a task's inputs
  (seqio prefix-LM: leading 0, inputs, EOS), through :func:`moe_jax.api.predict`.
  """
  from moe_jax.api import predict

  correct = 0
  max_new = max(len(vocab.encode(ex["targets"])) for ex in examples) + 2
  for i in range(0, len(examples), batch_size):
    chunk = examples[i:i + batch_size]
    outputs = predict(model, [ex["inputs"] for ex in chunk], max_new_tokens=max_new,
                      vocabulary=vocab)
    correct += sum(out == ex["targets"] for ex, out in zip(chunk, outputs))
    if progress is not None:
      progress.update(len(chunk))
  return 100.0 * correct / len(examples)


@dataclasses.dataclass(frozen=True)
class _Run:
  """What every step of :func:`run` shares: settings, output directory, tasks, vocabulary."""

  rc: ReproConfig
  out_dir: Path
  gen: Any  # calm_jax.tasks.KVArithmetic
  vocab: Any
  vocab_files: dict[str, bytes]
  names: dict[str, str]  # task -> registered seqio task name
  m_a_task: str
  progress: bool
  reuse: bool


def run(rc: ReproConfig, out_dir: Path, *, progress: bool = True, reuse: bool = False
        ) -> dict[str, dict[str, float]]:
  """Trains m_A, m_B and the composition, evaluates all three; writes everything to ``out_dir``.

  ``out_dir`` gets ``m_a/`` and ``m_b/`` (moe-jax checkpoints), ``calm/`` (the
  composition layers), ``results.{md,json}`` and ``accuracy.png``. With
  ``reuse``, m_A and m_B already in ``out_dir`` (trained with the same
  recipe) are loaded instead of trained again.
  """
  out_dir.mkdir(parents=True, exist_ok=True)
  t_start = time.perf_counter()
  if rc.shared_base and (rc.d_model_a, rc.layers_a) != (rc.d_model_b, rc.layers_b):
    raise ValueError(f"shared_base: m_A is fine-tuned from m_B, so d_model_a/layers_a "
                     f"({rc.d_model_a}, {rc.layers_a}) must equal d_model_b/layers_b "
                     f"({rc.d_model_b}, {rc.layers_b})")
  ctx = _setup_tasks(rc, out_dir, progress=progress, reuse=reuse)
  m_a, m_b = _single_models(ctx)
  models = {"m_A": m_a, "m_B": m_b, "CALM": _train_composition(ctx, m_b, m_a)}
  results = _evaluate(ctx, models)
  _report(ctx, models, results, t_start)
  return results


def _setup_tasks(rc: ReproConfig, out_dir: Path, *, progress: bool, reuse: bool) -> _Run:
  """Step 1: keys -> values, the vocabulary (saved in ``out_dir``) and the seqio tasks."""
  from calm_jax.tasks import TASKS, KVArithmetic, register_kv_tasks
  from moe_jax.data.tasks import register_mixture

  gen = KVArithmetic(seed=rc.seed, num_keys=rc.num_keys, value_range=rc.value_range,
                     num_operands=rc.num_operands, ops=rc.ops, cover_digits=rc.cover_digits,
                     composition_key_fraction=rc.composition_key_fraction,
                     hint_style=rc.hint_style or ("forward" if rc.tokens == "numbers"
                                                  else "lettered"))
  vocab, vocab_files = make_vocabulary(gen, rc.tokens)
  for file, data in vocab_files.items():
    (out_dir / file).write_bytes(data)
  names = register_kv_tasks(gen, num_eval=rc.num_eval, vocabulary=vocab,
                            tasks=TASKS if rc.m_a_hints else TASKS[:3])
  m_a_task = names["kv_subs"]
  if rc.m_a_hints:  # m_A: KV-SUBS and KV-HINTS, half and half
    m_a_task = "calm_m_a"
    register_mixture(m_a_task, {names["kv_subs"]: 1.0, names["kv_hints"]: 1.0},
                     overwrite=True)
  print(f"KV arithmetic: {rc.num_keys} keys, {rc.num_operands[0]}-{rc.num_operands[1]} operands "
        f"with {' '.join(rc.ops)}; composition keys ({len(gen.composition_keys)}): "
        f"{', '.join(gen.composition_keys)}")
  for task in names:
    ex = gen.examples(task, "train", 1)[0]
    print(f"  {task:9s} {ex['inputs']}  ->  {ex['targets']}")
  return _Run(rc=rc, out_dir=out_dir, gen=gen, vocab=vocab, vocab_files=vocab_files,
              names=names, m_a_task=m_a_task, progress=progress, reuse=reuse)


def _recipe(ctx: _Run, name: str) -> dict[str, Any]:
  """What a saved m_A / m_B was trained with (``--reuse`` compares it)."""
  fields = dataclasses.asdict(ctx.rc)
  return {k: fields[k] for k in _RECIPE[name]} | {"vocab_size": ctx.vocab.vocab_size}


def _train_single(ctx: _Run, name: str, task: str, d: int, layers: int, steps: int, *,
                  loss_on_inputs: bool = False, init: Any = None, trainable=None) -> Any:
  """Steps 2a / 2b: trains (or, with ``reuse``, loads) one single model into ``out_dir/name``."""
  import jax

  from moe_jax.checkpoints import LoadedModel, load_checkpoint, save_model
  from moe_jax.models import registry

  directory, rc = ctx.out_dir / name, ctx.rc
  recipe = _recipe(ctx, name)
  if init is not None:  # fine-tuned from m_B: m_B's recipe is part of this one
    recipe["init"] = _recipe(ctx, "m_b")
  if ctx.reuse and (directory / "repro.json").exists():
    saved = json.loads((directory / "repro.json").read_text())
    if saved != json.loads(json.dumps(recipe)):
      raise SystemExit(f"error: --reuse: {directory} was trained with {saved}, not {recipe}; "
                       "drop --reuse or use another --out")
    print(f"\n== reusing {name} from {directory}")
    return load_checkpoint(directory)
  config = _decoder_config(ctx.vocab.vocab_size, d, layers, rc)
  module = registry.build_module(config)
  trainer = _trainer(config, module, rc, steps, trainable=trainable, progress=ctx.progress)
  start = "" if init is None else f", from {init.source}"
  print(f"\n== training {name} on {task} ({steps} steps, d_model {d}, {layers} layers{start})")
  state = (trainer.create_state() if init is None
           else trainer.state_from_params(jax.device_put(init.params)))
  state = trainer.train(state, _batches(trainer, task, rc, loss_on_inputs=loss_on_inputs))
  params = jax.device_get(state.params)
  save_model(directory, config, params,  # the vocabulary travels with the model
             extra_files={"repro.json": json.dumps(recipe, indent=2).encode(),
                          **ctx.vocab_files})
  return LoadedModel(config=config, module=module, params=params, source=str(directory))


def _single_models(ctx: _Run) -> tuple[Any, Any]:
  """Step 2: ``(m_A, m_B)``; m_B first, as with ``shared_base`` m_A starts from it."""
  rc = ctx.rc
  m_b = _train_single(ctx, "m_b", ctx.names["num_math"], rc.d_model_b, rc.layers_b, rc.steps_b)
  if not rc.oracle_m_a:
    m_a = _train_single(ctx, "m_a", ctx.m_a_task, rc.d_model_a, rc.layers_a, rc.steps_a,
                        loss_on_inputs=rc.m_a_hints, init=m_b if rc.shared_base else None,
                        trainable=(r"(?!embed/).*",) if rc.freeze_m_a_embeddings else None)
    return m_a, m_b
  from moe_jax.checkpoints import save_model

  m_a = oracle_augmenting_model(ctx.gen, ctx.vocab, rc.d_model_a, rc.layers_a, rc)
  m_a = dataclasses.replace(m_a, source=str(save_model(
      ctx.out_dir / "m_a_oracle", m_a.config, m_a.params, extra_files=ctx.vocab_files)))
  print(f"\n== m_A is the oracle (each key's value digits one-hot at its token), "
        f"saved to {m_a.source}")
  return m_a, m_b


def _train_composition(ctx: _Run, m_b: Any, m_a: Any) -> Any:
  """Step 3: composes m_B (anchor) with m_A and trains only the composition layers."""
  import jax

  from calm_jax.composition import compose_modules, save_composition, trainable_mask
  from moe_jax.checkpoints import LoadedModel

  rc = ctx.rc
  module, params = compose_modules(
      m_b, [m_a], num_composition_layers=rc.composition_layers,
      layer_pairs=None if rc.layer_pairs is None else (rc.layer_pairs,), seed=rc.seed)
  trainer = _trainer(module.config, module, rc, rc.steps_calm, trainable=trainable_mask,
                     progress=ctx.progress)
  print(f"\n== training CALM composition on KV-MATH over {len(ctx.gen.composition_keys)} keys "
        f"({rc.steps_calm} steps; pairs {module.config.pairs[0]})")
  state = trainer.train(trainer.state_from_params(jax.device_put(params)),
                        _batches(trainer, ctx.names["kv_math"], rc))
  calm_params = jax.device_get(state.params)
  save_composition(ctx.out_dir / "calm", module.config, calm_params,
                   anchor_checkpoint=str(ctx.out_dir / "m_b"), augment_checkpoints=[m_a.source])
  for k in ("anchor", "augment_0"):  # frozen means frozen
    same = jax.tree.all(jax.tree.map(np.array_equal, calm_params[k], params[k]))
    assert same, f"frozen model {k} changed during composition training"
  return LoadedModel(config=module.config, module=module, params=calm_params, source="CALM")


def _eval_sets(ctx: _Run) -> dict[str, list[dict[str, str]]]:
  """The table's columns: held-out test expressions, and KV-MATH by composition keys."""
  from calm_jax.tasks import TASKS

  gen, n = ctx.gen, ctx.rc.num_eval
  eval_sets = {task: gen.examples(task, "test", n) for task in TASKS[:3]}
  # KV-MATH over the composition keys only: the composition's training distribution.
  eval_sets["kv_math_comp"] = gen.examples("kv_math", "train", n)
  # ... and held-out KV-MATH with no composition key at all: only m_A knows every key.
  comp = {f"<{k}>" for k in gen.composition_keys}
  eval_sets["kv_math_new"] = [
      ex for ex in gen.examples("kv_math", "test", 20 * n)
      if not comp & set(re.findall(r"<[a-z]+>", ex["inputs"]))][:n]
  if not eval_sets["kv_math_new"]:
    raise RuntimeError("no held-out KV-MATH expression without a composition key; "
                       "lower composition_key_fraction")
  return eval_sets


def _evaluate(ctx: _Run, models: dict[str, Any]) -> dict[str, dict[str, float]]:
  """Step 4: greedy exact match of every model on every evaluation set."""
  from tqdm.auto import tqdm

  print("\n== evaluating (greedy exact match on held-out test expressions)")
  eval_sets = _eval_sets(ctx)
  with tqdm(total=len(models) * sum(map(len, eval_sets.values())), desc="eval", unit="ex",
            disable=not ctx.progress) as bar:
    return {name: {task: exact_match(model, examples, ctx.vocab, progress=bar)
                   for task, examples in eval_sets.items()}
            for name, model in models.items()}


def _report(ctx: _Run, models: dict[str, Any], results: dict[str, dict[str, float]],
            t_start: float) -> None:
  """Step 5: m_A's value probe, sample outputs, the table; ``results.{md,json}``, the plot."""
  from moe_jax.api import predict

  probe = value_probe(models["m_A"], ctx.gen, ctx.vocab)
  print("\nLinear probe of m_A's states at the last token of each key (ridge, fit on the "
        "composition keys' values, tested on the other keys; chance ~10% / ~17%):")
  for layer, (units, tens) in enumerate(probe):
    print(f"  layer {layer}: units digit {100 * units:.0f}%, tens digit {100 * tens:.0f}%")
  samples = ctx.gen.examples("kv_math", "test", 4)
  print("\nKV-MATH test examples (target | m_A | m_B | CALM):")
  outs = {name: predict(model, [ex["inputs"] for ex in samples], max_new_tokens=16,
                        vocabulary=ctx.vocab) for name, model in models.items()}
  for i, ex in enumerate(samples):
    print(f"  {ex['inputs']:<32} {ex['targets']:>6} | " +
          " | ".join(f"{outs[name][i]!r}" for name in models))
  elapsed = time.perf_counter() - t_start
  table = format_table(results)
  print(table)
  print(f"(paper, KV-MATH: m_A {PAPER_KV_MATH['m_A']}, m_B {PAPER_KV_MATH['m_B']}, "
        f"CALM {PAPER_KV_MATH['CALM']}; total time {elapsed / 60:.1f} min)")
  out_dir = ctx.out_dir
  (out_dir / "results.json").write_text(json.dumps(
      {"results": results, "config": dataclasses.asdict(ctx.rc), "seconds": elapsed,
       "value_probe_units_tens_by_layer": probe}, indent=2))
  (out_dir / "results.md").write_text(table + "\n")
  plot(results, out_dir / "accuracy.png")
  print(f"wrote {out_dir / 'results.md'}, {out_dir / 'results.json'}, {out_dir / 'accuracy.png'}")


def make_vocabulary(gen, tokens: str) -> tuple[Any, dict[str, bytes]]:
  """The vocabulary all three models share, and the files that save it (none for bytes).

  ``bytes``: UTF-8 bytes (the library default). ``chars``: one token per
  character. ``keys``: one token per character, and each key (``<abc>``) one
  token, as a trained tokenizer keeps frequent strings whole. ``numbers``: as
  ``keys``, and digits in pairs from the right (each value 0-99 one token).
  """
  from calm_jax.tasks import kv_tokenizer, kv_tokenizer_files, kv_vocabulary
  from moe_jax.data.tasks import default_vocabulary

  if tokens not in TOKENS:
    raise ValueError(f"tokens={tokens!r}: expected one of {', '.join(TOKENS)}")
  if tokens == "bytes":
    return default_vocabulary(), {}
  tok = kv_tokenizer(gen if tokens in ("keys", "numbers") else None, numbers=tokens == "numbers")
  return kv_vocabulary(tok), kv_tokenizer_files(tok)


def oracle_augmenting_model(gen, vocab, d_model: int, num_layers: int, rc: ReproConfig):
  """An m_A that holds every key's value perfectly: the upper bound of the m_A side.

  Its hidden state at a key's token is, after every layer, the value's digits
  one-hot (place ``p``, digit ``d`` -> dimension ``10 p + d``; norm that of an
  embedding drawn with ``embed_init_std``); zero at every other token. Attention and MLP
  output projections are zero, so each layer passes its input on unchanged.
  Composing m_B with it measures what the composition and m_B make of a clean,
  key-independent value code; anything short of 100% on held-out KV-MATH is
  not m_A's fault. Needs one token per key (``tokens="keys"`` or ``"numbers"``).
  """
  import jax

  from moe_jax.checkpoints import LoadedModel
  from moe_jax.models import registry

  places = gen.places
  if d_model < 10 * places:
    raise ValueError(f"oracle m_A: d_model {d_model} < {10 * places} (10 dims per digit place)")
  config = _decoder_config(vocab.vocab_size, d_model, num_layers, rc)
  module = registry.build_module(config)
  params = jax.tree.map(np.array, registry.init_params(module, "decoder", seed=rc.seed))
  table = np.zeros_like(params["embed"]["embedding"])
  for key, value in gen.table.items():
    ids = vocab.encode(f"<{key}>")
    if len(ids) != 1:
      raise ValueError(f"oracle m_A: key <{key}> is {len(ids)} tokens; it needs one token per "
                       f"key (tokens='keys' or 'numbers')")
    for place, digit in enumerate(reversed(str(value))):
      table[ids[0], 10 * place + int(digit)] = rc.embed_init_std * np.sqrt(d_model / places)
  params["embed"]["embedding"] = table

  silenced = []

  def silence(path, x):  # attention / MLP outputs: the residual stream stays the embedding
    names = [getattr(k, "key", None) for k in path]
    if names[-2] in ("o", "wo"):
      silenced.append(names)
      return np.zeros_like(x)
    return x

  params = jax.tree_util.tree_map_with_path(silence, params)
  assert len(silenced) >= 2 * num_layers, silenced  # every layer's two output projections
  return LoadedModel(config=config, module=module, params=params, source="oracle m_A")


def value_probe(m_a, gen, vocab, num_examples: int = 256) -> list[tuple[float, float]]:
  """Are key values linearly readable from m_A's states at the keys (per layer)?

  CALM's composition layers read m_A's hidden states at positions up to the
  current one; to generalise beyond the composition keys, a key's *value* must
  be present (in a shared, readable form) at the key's own positions. This fits
  a ridge readout of the value's units and tens digit from each layer's state
  at the last token of every key (its closing ``>``, or the key's own token)
  on the composition keys and returns its accuracy ``(units, tens)`` on all
  other keys.
  """
  import jax.numpy as jnp

  from moe_jax.api import encode_prompts
  from moe_jax.decoding import pad_prompts

  examples = gen.examples("kv_subs", "test", num_examples)
  ids = encode_prompts(m_a, [ex["inputs"] for ex in examples], vocabulary=vocab)  # as trained
  tokens, valid = pad_prompts(ids, side="right")
  _, state = m_a.module.apply({"params": m_a.params}, jnp.asarray(tokens),
                              valid_BL=jnp.asarray(valid), sow_hidden=True,
                              mutable=["intermediates"])
  where = []  # (example, token index of the key's last token, key)
  for i, ex in enumerate(examples):
    offset = len(ids[i]) - len(vocab.encode(ex["inputs"])) - 1  # leading 0; EOS at the end
    for m in re.finditer(r"<([a-z]+)>", ex["inputs"]):
      where.append((i, offset + len(vocab.encode(ex["inputs"][:m.end()])) - 1, m.group(1)))
  values = np.array([gen.table[key] for _, _, key in where])
  fit = np.isin([key for _, _, key in where], list(gen.composition_keys))
  out = []
  for hidden in state["intermediates"]["hidden"]:
    x = np.asarray(hidden)[[i for i, _, _ in where], [j for _, j, _ in where]]
    x = np.c_[x, np.ones(len(x))]
    accs = []
    for digit in (values % 10, values // 10 % 10):
      onehot = np.eye(10)[digit]
      w = np.linalg.solve(x[fit].T @ x[fit] + np.eye(x.shape[1]), x[fit].T @ onehot[fit])
      accs.append(float(((x[~fit] @ w).argmax(1) == digit[~fit]).mean()))
    out.append(tuple(accs))
  return out


def format_table(results: dict[str, dict[str, float]]) -> str:
  head = ("| model | KV-SUBS | NUM-MATH | KV-MATH | KV-MATH, composition keys "
          "| KV-MATH, no composition key |")
  rows = [head, "|---|---|---|---|---|---|"]
  for name, accs in results.items():
    rows.append(f"| {name} | " + " | ".join(f"{accs[t]:.1f}" for t in _COLUMNS) + " |")
  return "\n".join(rows)


def plot(results: dict[str, dict[str, float]], path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  labels = ("KV-SUBS", "NUM-MATH", "KV-MATH\n(held-out)", "KV-MATH\n(composition keys)",
            "KV-MATH\n(no comp. key)")
  fig, ax = plt.subplots(figsize=(9.5, 3.8))
  width = 0.26
  for i, (name, accs) in enumerate(results.items()):
    xs = np.arange(len(_COLUMNS)) + (i - 1) * width
    bars = ax.bar(xs, [accs[t] for t in _COLUMNS], width, label=name)
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
  ax.set_xticks(np.arange(len(_COLUMNS)), labels)
  ax.set_ylabel("exact match (%)")
  ax.set_ylim(0, 105)
  ax.set_title("CALM on KV arithmetic (small-scale reproduction of Table 1)")
  ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _tuples(value):
  """JSON lists (of lists) as tuples, so --set values hash like the defaults."""
  return tuple(map(_tuples, value)) if isinstance(value, list) else value


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m experiments.calm_kv_arithmetic", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="out/calm_repro", help="results directory")
  p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test, ~1 min)")
  p.add_argument("--reuse", action="store_true",
                 help="load m_A / m_B from --out if they were trained there with the same recipe")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="override a ReproConfig field, e.g. --set steps_b=3000")
  args = p.parse_args(argv)
  overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
  fields = {f.name: f for f in dataclasses.fields(ReproConfig)}
  for item in args.set:
    name, _, value = item.partition("=")
    if name not in fields:
      raise SystemExit(f"error: --set {item!r}: unknown field; known: {sorted(fields)}")
    try:  # numbers, lists, true / false; anything else is a string
      overrides[name] = json.loads(value)
    except json.JSONDecodeError:
      overrides[name] = value
    overrides[name] = _tuples(overrides[name])
  run(ReproConfig(**overrides), Path(args.out), reuse=args.reuse)


if __name__ == "__main__":
  main()
