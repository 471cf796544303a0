"""The Python API for notebooks: each step of a run in one call, on the CLIs' own code.

Every function builds the objects the gin entry points build (model wrappers,
``Trainer``, ``DatasetConfig``, seqio tasks, ``InferEvalConfig``) and calls the
library functions the CLIs call; nothing here is a second implementation::

    import moe_jax as mj

    base = mj.load("path/to/llama-or-t5")                      # HF or moe-jax directory
    model = mj.add_adapters(base, "mov", num_experts=10)       # backbone frozen, adapters fresh
    run = mj.finetune(model, [{"inputs": "2+2=", "targets": "4"}, ...], steps=100)
    run.history[-1]["loss"]                                    # one row per logged step
    mj.evaluate(run.model, "my_task", feature_lengths={"inputs": 32, "targets": 8})
    mj.predict(run.model, ["2+3="], max_new_tokens=4)         # ["5"]
    mj.save(run.model, "out/mov")                              # adapters + base reference
    mj.export_hf(mj.upcycle_model(base, num_experts=8), "out/moe")  # sparse upcycling -> Mixtral

A model is a :class:`~moe_jax.checkpoints.LoadedModel` throughout (config,
flax module, host parameters, source); functions return new ones and never
modify their inputs. CALM compositions come from :func:`calm_jax.api.compose`
and go through the same :func:`finetune` / :func:`predict`.

The names avoid the subpackages' (``moe_jax.train``, ``moe_jax.generate``,
``moe_jax.upcycle``), which would shadow them at the top level.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import jax
import numpy as np

from moe_jax.checkpoints import LoadedModel

Examples = Union[Sequence[Mapping[str, str]], Mapping[str, Sequence[Mapping[str, str]]]]
#: A seqio task or mixture name, or in-memory examples ``[{"inputs", "targets"}, ...]``
#: (or ``{"train": [...], "validation": [...]}``).
Data = Union[str, Examples]

__all__ = ["Data", "LoadedModel", "TrainResult", "add_adapters", "encode_prompts", "evaluate",
           "export_hf", "export_peft", "finetune", "load", "predict", "router_probabilities",
           "save", "upcycle_model"]


# ----------------------------------------------------------------------------- models


def load(path: str | os.PathLike, *, dtype: str | None = None) -> LoadedModel:
  """Loads a Hugging Face directory, a moe-jax ``save_model`` directory or a training dir.

  Same as :func:`moe_jax.checkpoints.load_checkpoint` (and ``--checkpoint`` of
  the CLIs); a directory written by :func:`save` for an adapted model
  (``adapter_config.json``) loads its base and adapters.

  Args:
    path: the checkpoint directory.
    dtype: cast parameters (``"float32"``, ``"bfloat16"``, ``"float16"``).
  """
  from moe_jax import peft
  from moe_jax.checkpoints import load_checkpoint
  from moe_jax.peft.export import ADAPTER_CONFIG_FILE

  if (Path(path) / ADAPTER_CONFIG_FILE).exists():
    return peft.load_adapted(path, dtype=dtype)
  return load_checkpoint(path, dtype=dtype)


def add_adapters(model: LoadedModel, method: str = "mov", *, num_experts: int | None = None,
                 seed: int = 0, **options: Any) -> LoadedModel:
  """The model with fresh (IA)^3 / LoRA / MoV / MoLoRA adapters on its frozen backbone.

  Args:
    model: a loaded decoder or T5 (not already adapted).
    method: ``"ia3"``, ``"lora"``, ``"mov"`` or ``"molora"``.
    num_experts: experts of ``mov`` / ``molora`` (default 10); 1 for the others.
    seed: adapter and router initialisation.
    **options: further :class:`~moe_jax.peft.PeftConfig` fields (``sites``,
      ``rank``, ``alpha``, ``router``, ``top_k``, ``load_balance_coef``, ...).

  Returns:
    A model whose backbone parameters are ``model``'s (same names) plus
    ``peft_*`` adapters; :func:`finetune` trains only the adapters.
  """
  from moe_jax import peft

  if num_experts is None:
    num_experts = 10 if method in ("mov", "molora") else 1
  config = peft.PeftConfig(method=method, num_experts=num_experts, **options)
  module = peft.adapt(model, config)
  params = peft.init_adapter_params(module, model.params, jax.random.key(seed))
  return dataclasses.replace(model, module=module, params=jax.device_get(params))


def upcycle_model(models: LoadedModel | Sequence[LoadedModel], *, method: str = "sparse",
                  num_experts: int | None = None, top_k: int | None = None,
                  capacity_factor: float | None = None, moe_layout: str | Sequence[int] = "every",
                  seed: int = 0, **options: Any) -> LoadedModel:
  """Dense decoder(s) -> MoE, as ``python -m moe_jax.upcycle`` does.

  Args:
    models: one dense model (``sparse``) or the branches (``btx``, ``bam``).
    method: a method of :mod:`moe_jax.upcycle.methods`: ``"sparse"`` (FFN
      copied into ``num_experts`` experts), ``"btx"`` (branch FFNs become
      experts, the rest is averaged) or ``"bam"`` (FFN and attention experts).
    num_experts: experts for ``sparse``; one per branch otherwise.
    top_k: experts per token (default the method's: 2, BAM 1; at most E).
    capacity_factor: ``None`` is dropless.
    moe_layout: ``"every"``, ``"every_other"`` or layer indices.
    seed: router initialisation (and ``noise_std`` noise for ``sparse``).
    **options: method options (``noise_std`` for sparse; ``shared_kv``,
      ``attention_top_k`` for bam; ``target``, ``shared_expert...`` for sparse /
      BTX: the HF export architecture and a shared expert, :mod:`moe_jax.upcycle.targets`).
  """
  from moe_jax.models import registry
  from moe_jax.upcycle import methods

  inputs = [models] if isinstance(models, LoadedModel) else list(models)
  config, out = methods.upcycle(method, [m.config for m in inputs], [m.params for m in inputs],
                                num_experts=num_experts, top_k=top_k,
                                capacity_factor=capacity_factor, moe_layout=moe_layout,
                                seed=seed, names=[m.source for m in inputs],
                                owner="upcycle_model", **options)
  return LoadedModel(config=config, module=registry.build_module(config), params=out,
                     source=f"{method}({', '.join(m.source for m in inputs)})",
                     tokenizer_dir=inputs[0].tokenizer_dir)


# ----------------------------------------------------------------------------- data


def _vocabulary(model: LoadedModel, vocabulary: Any = None) -> Any:
  from moe_jax.data.tasks import default_vocabulary

  return vocabulary if vocabulary is not None else default_vocabulary(model.tokenizer_dir)


def _task(data: Data, model: LoadedModel, vocabulary: Any = None) -> str:
  """A registered seqio task / mixture name for ``data`` (in-memory examples are registered)."""
  from moe_jax.data import pipeline
  from moe_jax.data.tasks import register_in_memory_task

  if isinstance(data, str):
    pipeline.get_mixture_or_task(data)  # a clear error naming close matches
    return data
  digest = zlib.crc32(json.dumps(data, sort_keys=True, default=str).encode())
  vocab = _vocabulary(model, vocabulary)
  name = f"api_examples_{digest:08x}_{zlib.crc32(repr(vocab).encode()):08x}"
  register_in_memory_task(name, data, vocab)
  return name


def _has_inputs(task: str) -> bool:
  from moe_jax.data import pipeline

  return "inputs" in pipeline.get_mixture_or_task(task).output_features


def _feature_lengths(task: str, lengths: Mapping[str, int] | None) -> dict[str, int]:
  """``lengths``, or the longest example of the task's train split (or its first split,
  if it has no train split) plus one, rounded up to a multiple of 8."""
  if lengths is not None:
    return dict(lengths)
  from moe_jax.data import pipeline

  provider = pipeline.get_mixture_or_task(task)
  longest = {k: 1 for k in provider.output_features}
  splits = list(getattr(provider, "splits", ()) or ["train"])
  split = "train" if "train" in splits else splits[0]
  ds = provider.get_dataset(sequence_length=None, split=split, shuffle=False)
  for i, ex in enumerate(ds.as_numpy_iterator()):
    if i >= 10_000:
      break
    for k in longest:
      longest[k] = max(longest[k], len(ex[k]))
  return {k: -(-(n + 1) // 8) * 8 for k, n in longest.items()}


def _wrapper(model: LoadedModel, task: str | None = None) -> tuple[Any, str | None]:
  """The trainer's model wrapper and feature converter for ``model`` on ``task``.

  Decoder-only models train seq2seq tasks through seqio's prefix-LM features
  (the loss on the targets only), as ``experiments.calm_kv_arithmetic`` does.
  """
  from moe_jax.train.wrappers import DecoderOnlyModel, EncoderDecoderModel

  if model.is_encoder_decoder:
    return EncoderDecoderModel(model.config, module=model.module), None
  converter = "prefix_lm" if task is not None and _has_inputs(task) else None
  return DecoderOnlyModel(model.config, module=model.module, allow_causal_prefix_lm=True), \
      converter


def _default_trainable(model: LoadedModel) -> Any:
  """Adapters only for an adapted model, else the model kind's ``trainable_mask`` hook
  (CALM: the composition layers only), else everything."""
  from moe_jax import peft
  from moe_jax.models import registry

  if peft.peft_config_of(model.module) is not None:
    return peft.trainable_mask
  return registry.hook(model.config, "trainable_mask")


def _partitioner_config(mesh: Any) -> Any:
  from moe_jax.train.partitioner import PartitionerConfig

  if mesh is None:
    return PartitionerConfig()
  return PartitionerConfig(**mesh) if isinstance(mesh, Mapping) else mesh


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass
class TrainResult:
  """What :func:`finetune` returns.

  Attributes:
    model: the trained model (host parameters).
    history: one dict per logged step (``step``, ``split``, ``loss``,
      ``accuracy``, ``learning_rate``, ...), as written to ``metrics.jsonl``.
    state: the final sharded :class:`~moe_jax.train.trainer.TrainState`.
    task: the seqio task or mixture trained on.
  """

  model: LoadedModel
  history: list[dict[str, Any]]
  state: Any
  task: str

  def losses(self, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``(steps, losses)`` of ``split``'s rows, for plotting."""
    rows = [r for r in self.history if r["split"] == split and "loss" in r]
    return (np.array([r["step"] for r in rows]), np.array([r["loss"] for r in rows]))


def _recording_writer(model_dir: str | os.PathLike | None, echo: bool):
  from moe_jax.train.trainer import MetricsWriter, _to_json

  class Recording(MetricsWriter):
    def __init__(self):
      super().__init__(model_dir, echo=echo)
      self.rows: list[dict[str, Any]] = []

    def write(self, step, split, metrics):
      self.rows.append({"step": int(step), "split": split,
                        **{k: _to_json(v) for k, v in metrics.items()}})
      super().write(step, split, metrics)

  return Recording()


def finetune(model: LoadedModel, data: Data, *, steps: int, batch_size: int = 8,
             feature_lengths: Mapping[str, int] | None = None, learning_rate: float = 1e-3,
             optimizer: str | Any = "adamw", schedule: str = "constant", warmup_steps: int = 0,
             end_lr: float = 0.0, weight_decay: float = 0.0,
             clip_grad_norm: float | None = None, trainable: Any = "auto",
             model_dir: str | os.PathLike | None = None, checkpoint_every: int | None = 1000,
             keep_checkpoints: int | None = 3, resume: bool = True, log_every: int = 1,
             seed: int = 0, mesh: Any = None, num_microbatches: int = 1,
             frozen_param_dtype: str | None = None, pack: bool = True, vocabulary: Any = None,
             progress_bar: bool = False, echo: bool = False, tensorboard: bool = True,
             wandb_project: str | None = None) -> TrainResult:
  """Trains ``model`` for ``steps`` steps with :func:`moe_jax.train.run.train`.

  That is the function ``python -m moe_jax.train`` runs: with the same
  settings both train the same steps (the options and their defaults are
  listed in :mod:`moe_jax.train.run`).

  Args:
    model: a loaded, adapted, upcycled or composed model.
    data: a registered seqio task / mixture name, or in-memory examples
      (``[{"inputs": ..., "targets": ...}]``; registered as a seqio task with
      :func:`moe_jax.data.tasks.register_in_memory_task`).
    steps, batch_size: training steps; global batch (rows; packed rows hold
      several examples).
    feature_lengths: e.g. ``{"inputs": 32, "targets": 16}``; default the
      longest example (in-memory and small tasks).
    learning_rate: peak learning rate.
    optimizer: ``"adamw"`` or ``"adafactor"``, or a whole
      :class:`~moe_jax.train.optimizers.OptimizerConfig` (then the schedule,
      weight-decay and clipping arguments must keep their defaults).
    schedule: ``"constant"``, ``"rsqrt"`` or ``"cosine"`` (decays to
      ``end_lr`` at ``steps``).
    warmup_steps, end_lr: linear warm-up; the cosine schedule's final rate.
    weight_decay: decoupled weight decay (matrices only).
    clip_grad_norm: clip gradients to this global norm (``None``: no clipping).
    trainable: ``"auto"`` (adapters for adapted models, composition layers
      for CALM, everything otherwise), ``None`` (everything), regexes, a bool
      pytree or a callable ``params -> mask``.
    model_dir: write metrics, checkpoints and the config there (``None``: nothing).
    checkpoint_every: with ``model_dir``: save every this many steps (and at
      the end); ``None``: only at the end.
    keep_checkpoints: with ``model_dir``: keep the newest this many (``None``: all).
    resume: with ``model_dir``: continue from its newest checkpoint, if any
      (parameters, optimizer state and data position), instead of ``model``'s
      parameters.
    log_every, seed: record metrics every this many steps (``history``); data
      shuffling and per-step RNG.
    mesh: a ``PartitionerConfig`` or ``{"data": ..., "expert": ..., "model": ...}``
      (default: data parallel over every device); ``"fsdp": True`` also shards
      parameters and optimizer state over the data axis.
    num_microbatches, frozen_param_dtype, tensorboard, wandb_project: the
      :class:`~moe_jax.train.trainer.TrainerConfig` fields of those names
      (gradient accumulation; e.g. ``"bfloat16"`` frozen parameters; event
      files in ``model_dir``'s ``train/`` and ``eval/``; a W&B project).
    pack, vocabulary: pack several examples per row; the seqio vocabulary of
      in-memory examples (default the model's tokenizer, or bytes).
    progress_bar, echo: tqdm bar and printed log lines.
  """
  from moe_jax.checkpoints.orbax import CheckpointConfig
  from moe_jax.train import run
  from moe_jax.train.trainer import TrainerConfig

  task, wrapper, dataset = _train_data(model, data, vocabulary, batch_size=batch_size,
                                       feature_lengths=feature_lengths, pack=pack, seed=seed)
  writer = _recording_writer(model_dir, echo)
  state = run.train(
      model=wrapper, train_dataset=dataset, model_dir=model_dir, params=model.params,
      optimizer=_optimizer_config(optimizer, steps=steps, learning_rate=learning_rate,
                                  schedule=schedule, warmup_steps=warmup_steps, end_lr=end_lr,
                                  weight_decay=weight_decay, clip_grad_norm=clip_grad_norm),
      trainer=TrainerConfig(num_train_steps=steps, log_every=log_every, seed=seed, eval_steps=None,
                            progress_bar=progress_bar, num_microbatches=num_microbatches,
                            frozen_param_dtype=frozen_param_dtype, tensorboard=tensorboard,
                            wandb_project=wandb_project),
      partitioner=_partitioner_config(mesh), metrics_writer=writer,
      checkpoint=CheckpointConfig(save_every=checkpoint_every, keep=keep_checkpoints,
                                  restore=resume),
      trainable=_default_trainable(model) if trainable == "auto" else trainable)
  trained = dataclasses.replace(model, params=jax.device_get(state.params))
  return TrainResult(model=trained, history=writer.rows, state=state, task=task)


def _train_data(model: LoadedModel, data: Data, vocabulary: Any, *, batch_size: int,
                feature_lengths: Mapping[str, int] | None, pack: bool, seed: int
                ) -> tuple[str, Any, Any]:
  """:func:`finetune`'s ``(task name, model wrapper, DatasetConfig)``."""
  from moe_jax.train.trainer import DatasetConfig

  task = _task(data, model, vocabulary)
  wrapper, converter = _wrapper(model, task)
  return task, wrapper, DatasetConfig(
      mixture_or_task_name=task, batch_size=batch_size, pack=pack, seed=seed,
      task_feature_lengths=_feature_lengths(task, feature_lengths), feature_converter=converter)


def _optimizer_config(optimizer: Any, *, steps: int, learning_rate: float, schedule: str,
                      warmup_steps: int, end_lr: float, weight_decay: float,
                      clip_grad_norm: float | None) -> Any:
  """:func:`finetune`'s optimizer arguments as an ``OptimizerConfig``."""
  from moe_jax.train.optimizers import OptimizerConfig, ScheduleConfig

  if isinstance(optimizer, OptimizerConfig):
    given = dict(learning_rate=learning_rate != 1e-3, schedule=schedule != "constant",
                 warmup_steps=warmup_steps != 0, end_lr=end_lr != 0.0,
                 weight_decay=weight_decay != 0.0, clip_grad_norm=clip_grad_norm is not None)
    if any(given.values()):
      raise ValueError(f"finetune: optimizer is an OptimizerConfig; set "
                       f"{', '.join(k for k, v in given.items() if v)} in it instead")
    return optimizer
  sched = ScheduleConfig(kind=schedule, lr=learning_rate, warmup_steps=warmup_steps,
                         decay_steps=steps if schedule == "cosine" else None, end_lr=end_lr)
  return OptimizerConfig(name=optimizer, schedule=sched, weight_decay=weight_decay,
                         clip_grad_norm=clip_grad_norm)


def evaluate(model: LoadedModel, data: Data, *, feature_lengths: Mapping[str, int] | None = None,
             batch_size: int = 8, split: str = "validation", num_examples: int | None = None,
             metrics: bool = True, loss: bool = True, mesh: Any = None,
             vocabulary: Any = None) -> dict[str, Any]:
  """Validation loss and the tasks' seqio metrics, with :func:`moe_jax.train.run.evaluate`.

  (What ``python -m moe_jax.eval`` runs on a checkpoint.)

  Args:
    model: the model to evaluate.
    data: task / mixture name or in-memory examples (give a ``{"validation": [...]}``
      split, or ``split="train"`` for a plain list).
    feature_lengths: as in :func:`finetune`.
    batch_size: global batch size.
    split: the split to evaluate.
    num_examples: inference metrics on only the first examples of each task.
    metrics: run the tasks' ``metric_fns`` (greedy generation).
    loss: compute the validation loss (packed batches of the whole split).
    mesh, vocabulary: as in :func:`finetune`.

  Returns:
    ``{"loss": {"loss", "accuracy", ...}, "tasks": {task: {metric: value}}}``.
  """
  from moe_jax.train import run
  from moe_jax.train.evaluation import InferEvalConfig
  from moe_jax.train.trainer import DatasetConfig

  if not (metrics or loss):
    raise ValueError("evaluate: nothing to do (metrics=False and loss=False)")
  task = _task(data, model, vocabulary)
  wrapper, converter = _wrapper(model, task)
  lengths = _feature_lengths(task, feature_lengths)
  eval_dataset = DatasetConfig(mixture_or_task_name=task, task_feature_lengths=lengths,
                               batch_size=batch_size, split=split, shuffle=False,
                               feature_converter=converter) if loss else None
  infer = InferEvalConfig(mixture_or_task_name=task, task_feature_lengths=lengths, split=split,
                          batch_size=batch_size, num_examples=num_examples) if metrics else None
  return run.evaluate(model=wrapper, params=model.params, eval_dataset=eval_dataset,
                      infer_eval=infer, partitioner=_partitioner_config(mesh), echo=False)


# ----------------------------------------------------------------------------- inference


def encode_prompts(model: LoadedModel, prompts: Sequence[str], *, vocabulary: Any = None,
                   task_format: bool = True) -> list[list[int]]:
  """The token ids :func:`predict` feeds the model for string ``prompts``.

  ``vocabulary``: default the model's tokenizer (or bytes). ``task_format``:
  as the training pipeline presents a task's ``inputs`` (EOS appended; for
  decoder-only models after a leading 0, as seqio's prefix-LM features);
  ``False``: the plain encoding. For probing hidden states at the positions
  the model was trained on (pad with :func:`moe_jax.decoding.pad_prompts`).
  """
  return _prompt_ids(model, prompts, vocabulary, task_format)[0]


def _prompt_ids(model: LoadedModel, prompts: Sequence[Any], vocabulary: Any,
                task_format: bool) -> tuple[list[list[int]], Any]:
  if not prompts:
    raise ValueError("no prompts")
  if not isinstance(prompts[0], str):
    return [list(map(int, p)) for p in prompts], None
  vocab = _vocabulary(model, vocabulary)
  ids = [list(vocab.encode(p)) for p in prompts]
  if task_format:  # as seqio's features present an example's inputs
    if vocab.eos_id is None:
      raise ValueError(
          f"{model.source}: its vocabulary ({getattr(vocab, '_source', type(vocab).__name__)}) has "
          "no EOS token, which task-format prompts end with; name it in the tokenizer's "
          "special_tokens_map.json / tokenizer_config.json or pass vocabulary=")
    eos = [vocab.eos_id]
    bos = [] if model.is_encoder_decoder else [0]
    ids = [bos + p + eos for p in ids]
  return ids, vocab


def predict(model: LoadedModel, prompts: Sequence[str] | Sequence[Sequence[int]], *,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, eos_id: int | None = None,
             vocabulary: Any = None, task_format: bool = True
             ) -> list[str] | list[list[int]]:
  """Generates continuations with :func:`moe_jax.decoding.generate` (KV cache, one jit).

  Args:
    model: any model of this API (adapted, upcycled and composed ones too).
    prompts: strings (encoded with ``vocabulary``: default the model's
      tokenizer, or bytes) or token-id lists.
    max_new_tokens, temperature, top_k, top_p, seed: sampling (greedy at
      temperature 0).
    eos_id: stop id; default the config's ``eos_token_id`` (or the vocabulary's).
    vocabulary: a seqio vocabulary for string prompts.
    task_format: encode string prompts as the training pipeline encodes a
      task's ``inputs`` (EOS appended; decoder-only models: after a leading 0,
      as seqio's prefix-LM features), so a model fine-tuned with :func:`finetune`
      sees what it was trained on. ``False``: the plain encoding.

  Returns:
    Decoded strings for string prompts, else generated id lists (each up to EOS).
  """
  from moe_jax import decoding

  ids, vocab = _prompt_ids(model, prompts, vocabulary, task_format)
  if eos_id is None:
    eos_id = getattr(model.config, "eos_token_id", None)
    if eos_id is None and vocab is not None:
      eos_id = vocab.eos_id
  out = decoding.generate(model.module, model.params, ids, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          eos_id=eos_id).to_lists()
  return [vocab.decode(row) for row in out] if vocab is not None else out


def router_probabilities(model: LoadedModel, prompts: Sequence[str] | Sequence[Sequence[int]], *,
                         vocabulary: Any = None, task_format: bool = True
                         ) -> dict[str, np.ndarray]:
  """Average router probability per expert at every routed site, over the prompts' tokens.

  Works for adapter mixtures (MoV, MoLoRA) and routed-expert layers (MoE):
  both sow ``expert_usage`` (the mean routing weight of each expert over the
  valid tokens) into the ``moe_metrics`` collection.

  Returns:
    ``{site: [E] array}`` with sites like ``"layers_0/attn/peft_k"`` in model order;
    stack the arrays for a (site x expert) heatmap.
  """
  import jax.numpy as jnp

  from moe_jax.decoding import pad_prompts
  from moe_jax.peft import METRICS_COLLECTION

  ids, _ = _prompt_ids(model, prompts, vocabulary, task_format)
  tokens, _ = pad_prompts(ids, side="right")
  args = [jnp.asarray(tokens)]
  if model.is_encoder_decoder:
    args.append(jnp.zeros((tokens.shape[0], 1), jnp.int32))
  _, state = jax.jit(lambda p, *a: model.module.apply({"params": p}, *a,
                                                      mutable=[METRICS_COLLECTION]))(
                                                          model.params, *args)
  usage: dict[str, list[np.ndarray]] = {}  # every report of a site (calls, sown entries)
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.get(METRICS_COLLECTION, {})):
    names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    if "expert_usage" not in names:
      continue
    site = "/".join(n for n in names[:names.index("expert_usage")] if n != "router")
    usage.setdefault(site, []).append(np.asarray(leaf, np.float32))
  if not usage:
    raise ValueError(f"router_probabilities: {type(model.module).__name__} has no routers "
                     "(add MoV / MoLoRA adapters or upcycle it)")
  return {site: np.mean(leaves, axis=0) for site, leaves in usage.items()}


# ----------------------------------------------------------------------------- saving


def save(model: LoadedModel, path: str | os.PathLike, *, base_checkpoint: str | None = None
         ) -> Path:
  """Writes the model where :func:`load` (and every CLI) reads it back.

  * adapted models: only the adapters and routers
    (:func:`moe_jax.peft.save_adapters`), with a reference to the base
    checkpoint (``base_checkpoint``, default ``model.source``);
  * models whose kind has a ``save`` hook (:mod:`moe_jax.models.registry`):
    what it writes (CALM compositions: only the composition layers,
    :func:`calm_jax.save_composition`);
  * anything else: config + parameters (:func:`moe_jax.checkpoints.save_model`).
  """
  from moe_jax import peft
  from moe_jax.checkpoints import save_model
  from moe_jax.models import registry

  cfg = peft.peft_config_of(model.module)
  if cfg is not None:
    base = base_checkpoint or model.source
    if not Path(base).is_dir():
      raise ValueError(f"save: the adapters' base checkpoint {base!r} is not a directory; pass "
                       "base_checkpoint= (save the base with save() first if it was made here)")
    return peft.save_adapters(path, model.params, cfg, base_checkpoint=str(base))
  save_hook = registry.hook(model.config, "save")
  if save_hook is not None:
    return save_hook(model, path)
  return save_model(path, model.config, model.params)


def export_hf(model: LoadedModel, path: str | os.PathLike, **options: Any) -> Path:
  """Writes a Hugging Face checkpoint (``config.json`` + safetensors), atomically.

  (IA)^3 and LoRA adapters are folded into the base weights
  (:func:`moe_jax.peft.merge_and_export_hf`); MoV / MoLoRA mixtures cannot be
  folded (the merge depends on each token) and raise ``ValueError``: use
  :func:`save`. Sparse / BTX upcycled models export as Mixtral or their ``target``.

  Args:
    model: the model.
    path: target directory.
    **options: ``dtype``, ``max_shard_bytes``, ``tokenizer_dir`` of
      :func:`moe_jax.checkpoints.export_hf` (``tokenizer_dir`` defaults to the model's).
  """
  from moe_jax import peft
  from moe_jax.checkpoints import export_hf as export

  options.setdefault("tokenizer_dir", model.tokenizer_dir)
  cfg = peft.peft_config_of(model.module)
  if cfg is not None:
    if cfg.num_experts > 1:
      raise ValueError(f"export_hf: {cfg.method} with {cfg.num_experts} experts cannot be folded "
                       "into the base weights (each token merges the experts differently); "
                       "use save() for the adapters")
    return peft.merge_and_export_hf(path, model.config, model.params, cfg, **options)
  return export(path, model.config, model.params, **options)


def export_peft(model: LoadedModel, path: str | os.PathLike, **options: Any) -> Path:
  """The adapters as a Hugging Face ``peft`` / vLLM directory (:func:`peft.export_peft`)."""
  from moe_jax import peft

  cfg = peft.peft_config_of(model.module)
  if cfg is None:
    raise ValueError("export_peft: the model has no adapters (add_adapters first)")
  return peft.export_peft(path, model.config, model.params, cfg, **options)
