"""The train loop: sharded, jitted train step, metrics, periodic eval and checkpoints.

:class:`Trainer` ties a model wrapper (:mod:`wrappers`), an optimizer
(:mod:`optimizers`) and a partitioner (:mod:`partitioner`) together:

* ``create_state(seed)`` initialises parameters and optimizer state directly
  into their shardings (``jit`` with ``out_shardings``: no host copy of a big
  model ever exists); ``restore_state`` does the same from a checkpoint.
* ``train_step(state, batch)`` is one jitted function, state donated, with
  in/out shardings for parameters, optimizer state and batch. The per-step
  RNG is ``fold_in(key(seed), step)``: resuming needs no RNG state.
* ``train(state, batches, ...)`` runs the loop. The loop never waits for the
  device between log lines: metrics stay on device and are fetched every
  ``log_every`` steps (and before a checkpoint), so host-side input work
  overlaps the device's step. Each log line goes to stdout (with a tqdm
  progress bar) and to the run's metric writers (``model_dir/metrics.jsonl``,
  TensorBoard, W&B: :mod:`metric_writers`): loss, cross-entropy, z-loss,
  accuracy, auxiliary losses and model metrics (see :mod:`losses`), per-layer
  router metrics (``router/...``), gradient norm, learning rate, steps/s,
  seconds per step (``step_time``) and non-padding target tokens/s, all
  averaged over the steps since the last line (the learning rate is the last
  step's).
* ``TrainerConfig.dropless_fallback``: a step whose MoE layers dropped rows
  past their ragged receive buffers (``ragged_buffer_factor``) is not applied;
  the same batch re-runs with worst-case buffers (see ``train_step``).
* A non-finite loss (or gradient norm, or auxiliary loss) raises
  :class:`NonFiniteError` naming the first bad step and the values, *before*
  any checkpoint of the bad state is written: nothing good on disk is lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from moe_jax.moe.layer import BUFFER_DROPPED, BUFFER_LOAD
from moe_jax.moe.ragged_parallel import worst_case_buffers
from moe_jax.train.microbatch import MAX_METRICS
from moe_jax.train.wrappers import BaseModel
# The JSON-lines writer kept its old names here (callers import them from this module).
from moe_jax.train.metric_writers import METRICS_FILE, to_json as _to_json  # noqa: F401
from moe_jax.train.metric_writers import JsonlWriter as MetricsWriter, MetricWriter
from moe_jax.train.optimizers import Optimizer, masked_global_norm
from moe_jax.train.partitioner import Partitioner

logger = logging.getLogger(__name__)

#: The loss metrics' mean over MoE layers of assignments past a ragged receive buffer.
OVERFLOW_METRIC = f"model/{BUFFER_DROPPED}"
LOAD_METRIC = f"model/{BUFFER_LOAD}"  # the busiest layer's exchange / its balanced load
#: 1 for a step re-run with worst-case buffers (logged: how many since the last line).
FALLBACK_METRIC = "moe/fallback_steps"


@flax.struct.dataclass
class TrainState:
  """Step counter (completed steps), parameters and optimizer state."""

  step: jax.Array
  params: Any
  opt_state: Any


class NonFiniteError(FloatingPointError):
  """A training step produced a NaN or infinite loss (or gradient norm)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerConfig:
  """The loop's schedule.

  Attributes:
    num_train_steps: train until the state's step reaches this.
    log_every: fetch metrics, check them, and log every this many steps.
    eval_every: evaluate every this many steps (``None``: only at the end,
      if an evaluation is configured).
    eval_steps: validation-loss batches per evaluation (``None``: the whole split).
    seed: parameter initialisation and per-step RNG seed.
    progress_bar: show a tqdm bar (process 0 only).
    check_finite_every_step: fetch the loss every step to stop at the exact
      first non-finite step even between log lines (costs a host sync per step).
    num_microbatches: gradient accumulation (:mod:`moe_jax.train.microbatch`):
      each step runs forward and backward on this many slices of the global
      batch in turn and applies one update with their summed gradients.
      Activation memory drops by this factor; the step's FLOPs do not change.
      The global batch must divide into ``num_microbatches`` x the batch shards.
    frozen_param_dtype: dtype of the parameters the optimizer does not train
      (``None``: as initialised, float32). ``"bfloat16"`` halves the memory of
      a PEFT / CALM run's frozen backbone; frozen parameters have no gradient
      and no optimizer state, and trainable parameters (and their optimizer
      state) keep their own dtype. The backbone's weights are rounded once,
      as a bfloat16 checkpoint would be.
    tensorboard: with a ``model_dir``, also write the metric rows as
      TensorBoard event files in ``model_dir/train`` and ``model_dir/eval``
      (:mod:`moe_jax.train.metric_writers`).
    wandb_project: also log the rows to this Weights & Biases project
      (``None``: off). Needs ``pip install wandb``; checked before training.
    dropless_fallback: MoE layers with ``dispatch="ragged"`` under expert
      parallelism and a small receive buffer (``MoeConfig.ragged_buffer_factor``)
      stay exactly dropless: a step in which any layer dropped a row past its
      buffer keeps the old train state (a ``lax.cond`` in the jitted step
      skips the update: memory-neutral, the step counter and RNG do not
      advance), and the host, which reads that flag every step, re-runs the
      batch with a second jitted step traced with worst-case buffers
      (``ragged_buffer_factor=None``). The steps that fit cost the small
      buffer's memory and FLOPs; one that overflows costs both steps.
      ``moe/fallback_steps`` counts them. ``eval_step`` and ``score_batch``
      run with worst-case buffers (no backward pass to hold).
    fallback_microbatches: gradient-accumulation microbatches of the
      worst-case step (``None``: ``num_microbatches``), so that its larger
      buffers fit the memory of the small-buffer step. Exact for the token
      loss; the auxiliary losses become means over the microbatches.
  """

  num_train_steps: int
  log_every: int = 100
  eval_every: int | None = None
  eval_steps: int | None = 20
  seed: int = 0
  progress_bar: bool = True
  check_finite_every_step: bool = False
  num_microbatches: int = 1
  frozen_param_dtype: str | None = None
  tensorboard: bool = True
  wandb_project: str | None = None
  dropless_fallback: bool = False
  fallback_microbatches: int | None = None

  def __post_init__(self):
    if self.num_train_steps < 0:
      raise ValueError(f"TrainerConfig.num_train_steps must be >= 0, got {self.num_train_steps}")
    if self.log_every < 1:
      raise ValueError(f"TrainerConfig.log_every must be >= 1, got {self.log_every}")
    if self.eval_every is not None and self.eval_every < 1:
      raise ValueError(f"TrainerConfig.eval_every must be >= 1 or None, got {self.eval_every}")
    if self.num_microbatches < 1:
      raise ValueError(f"TrainerConfig.num_microbatches must be >= 1, got "
                       f"{self.num_microbatches}")
    if self.fallback_microbatches is not None and self.fallback_microbatches < 1:
      raise ValueError(f"TrainerConfig.fallback_microbatches must be >= 1 or None, got "
                       f"{self.fallback_microbatches}")
    if self.frozen_param_dtype is not None:
      jnp.dtype(self.frozen_param_dtype)  # TypeError naming an unknown dtype


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetConfig:
  """A seqio input pipeline (``moe_jax.data.pipeline.get_dataset``).

  Attributes:
    mixture_or_task_name: registered seqio task or mixture.
    task_feature_lengths: e.g. ``{"inputs": 64, "targets": 32}``.
    batch_size: **global** batch size (split evenly over processes).
    split: dataset split.
    feature_converter: ``"decoder"``, ``"prefix_lm"`` or ``"enc_dec"``;
      ``None`` uses the model's (``decoder`` / ``enc_dec``).
    pack: pack several examples per row.
    shuffle: shuffle examples.
    seed: shuffle seed (same on every host).
    use_cached: read seqio's offline cache.
  """

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  batch_size: int
  split: str = "train"
  feature_converter: str | None = None
  pack: bool = True
  shuffle: bool = True
  seed: int | None = 0
  use_cached: bool = False


def make_data_iterator(config: DatasetConfig, model: BaseModel, *,
                       num_epochs: int | None = None, **overrides: Any):
  """A ``DataIterator`` over this process's rows of ``config``'s global batches.

  Every process builds the same global batch stream and keeps its block of
  rows (:mod:`moe_jax.data.iterator`): the global batch is the same
  examples whatever the process count, and a checkpoint's data position
  resumes on any process count.
  """
  from moe_jax.data import pipeline

  c = dataclasses.replace(config, **overrides) if overrides else config
  n = jax.process_count()
  if c.batch_size % n:
    raise ValueError(f"DatasetConfig.batch_size={c.batch_size} (global) is not divisible by "
                     f"the {n} processes")
  ds = pipeline.get_dataset(
      mixture_or_task_name=c.mixture_or_task_name,
      task_feature_lengths=dict(c.task_feature_lengths), split=c.split,
      batch_size=c.batch_size, feature_converter=c.feature_converter or
      model.FEATURE_CONVERTER, pack=c.pack, shuffle=c.shuffle, seed=c.seed,
      num_epochs=num_epochs, shard_info=None, use_cached=c.use_cached)
  rows = pipeline.global_batch_rows(c.batch_size, jax.process_index(), n)
  return pipeline.DataIterator(ds, rows=rows)


def cast_frozen(params: Any, trainable_mask: Any, dtype: Any) -> Any:
  """Floating leaves of ``params`` (arrays or shapes) that the mask freezes, in ``dtype``."""
  if dtype is None:
    return params

  def cast(x, trainable):
    if trainable or not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype), sharding=x.sharding)
    return x.astype(dtype)

  return jax.tree.map(cast, params, trainable_mask)


class Trainer:
  """Sharded training of a model wrapper with an optimizer (see the module docstring)."""

  def __init__(self, *, model: BaseModel, optimizer: Optimizer | None, partitioner: Partitioner,
               config: TrainerConfig, metrics_writer: MetricWriter | None = None):
    """``optimizer=None`` gives an evaluation-only trainer (``eval_step``, ``score_batch``)."""
    self.model = model
    self.optimizer = optimizer
    self.partitioner = partitioner
    self.config = config
    self.writer = metrics_writer or MetricsWriter(None, echo=False)
    p = partitioner
    boxed = model.abstract_boxed_params()  # outside the mesh: see Partitioner.jit(in_context=)
    self.abstract_params = self.cast_frozen(nn.meta.unbox(boxed))
    self.param_specs = p.param_specs(boxed)
    abstract_opt = (None if optimizer is None
                    else jax.eval_shape(optimizer.tx.init, self.abstract_params))
    opt_specs = p.derived_specs(abstract_opt, self.abstract_params, self.param_specs)
    self.state_shardings = TrainState(step=p.replicated, params=p.shardings(self.param_specs),
                                      opt_state=p.shardings(opt_specs))
    self.abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=self.abstract_params,
                   opt_state=abstract_opt), self.state_shardings)
    self._steps: dict[tuple, Callable] = {}
    self._fallbacks: dict[tuple, Callable] = {}
    self.fallback_steps = 0  # steps re-run with worst-case buffers (dropless_fallback)
    self._evals: dict[tuple, Callable] = {}
    self._scores: dict[tuple, Callable] = {}
    self._checked: set[tuple] = set()

  # -- state -------------------------------------------------------------------

  def cast_frozen(self, params: Any) -> Any:
    """``params`` (arrays or shapes) with frozen leaves in ``config.frozen_param_dtype``."""
    if self.optimizer is None:
      return params
    return cast_frozen(params, self.optimizer.trainable_mask, self.config.frozen_param_dtype)

  def create_state(self, seed: int | None = None) -> TrainState:
    """Freshly initialised, sharded train state at step 0."""
    seed = self.config.seed if seed is None else seed
    model, tx = self.model, self.optimizer.tx

    def init(key):
      params = self.cast_frozen(model.init_params(key))
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    fn = self.partitioner.jit(init, out_shardings=self.state_shardings, in_context=False)
    return fn(jax.random.key(seed))

  def create_params(self, seed: int | None = None) -> Any:
    """Freshly initialised, sharded parameters (no optimizer state)."""
    seed = self.config.seed if seed is None else seed
    fn = self.partitioner.jit(lambda key: self.cast_frozen(self.model.init_params(key)),
                              out_shardings=self.state_shardings.params, in_context=False)
    return fn(jax.random.key(seed))

  def state_from_params(self, params: Any, step: int = 0) -> TrainState:
    """A train state around given (sharded) parameters, with a fresh optimizer state."""
    tx = self.optimizer.tx
    if self.config.frozen_param_dtype is not None:
      params = self.partitioner.jit(self.cast_frozen,
                                    out_shardings=self.state_shardings.params)(params)
    fn = self.partitioner.jit(lambda p: tx.init(p), in_shardings=(self.state_shardings.params,),
                              out_shardings=self.state_shardings.opt_state)
    return TrainState(step=jax.device_put(jnp.asarray(step, jnp.int32),
                                          self.state_shardings.step),
                      params=params, opt_state=fn(params))

  # -- jitted steps ------------------------------------------------------------

  def _batch_key(self, batch: Mapping[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(np.shape(v))) for k, v in batch.items()))

  def _prepare(self, batch: Mapping[str, Any]) -> tuple[tuple, Mapping[str, Any]]:
    """``(key, batch)`` ready for a jitted step.

    Multi-process: per-host numpy batches become global arrays. One process:
    numpy arrays go straight into the jitted call, whose ``in_shardings``
    place them (jit's C++ fast path; checked once per batch shape).
    """
    key = self._batch_key(batch)
    if jax.process_count() > 1 and not all(isinstance(v, jax.Array) for v in batch.values()):
      return key, self.partitioner.shard_batch(batch)
    if key not in self._checked:
      self.partitioner.check_batch(batch)
      self._checked.add(key)
    return key, batch

  def _batch_shardings(self, batch):
    return {k: self.partitioner.batch_sharding(np.ndim(v)) for k, v in batch.items()}

  def _fallback_microbatches(self) -> int:
    return self.config.fallback_microbatches or self.config.num_microbatches

  def _make_train_step(self, batch, fallback: bool = False) -> Callable:
    """The jitted step; ``fallback``: the worst-case-buffer replay (called in its context)."""
    opt = self.optimizer
    base_key = jax.random.key(self.config.seed)
    n = self._fallback_microbatches() if fallback else self.config.num_microbatches
    grads_of = functools.partial(self._loss_and_grads, num_microbatches=n)
    guard = self.config.dropless_fallback and not fallback

    def train_step(state: TrainState, batch):
      rng = jax.random.fold_in(base_key, state.step)
      (_, metrics), grads = grads_of(state.params, batch, rng)
      metrics["grad_norm"] = masked_global_norm(grads, opt.trainable_mask)
      metrics["learning_rate"] = jnp.asarray(opt.schedule(state.step), jnp.float32)

      def update(state):
        updates, opt_state = opt.tx.update(grads, state.opt_state, state.params)
        return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state)

      if not (guard and OVERFLOW_METRIC in metrics):
        new = update(state)
      else:  # overflowed: keep the old state (the update does not even run)
        overflow = metrics[OVERFLOW_METRIC] > 0
        new = jax.lax.cond(overflow, lambda s: s, update, state)
        metrics[FALLBACK_METRIC] = overflow.astype(jnp.float32)
      if guard and OVERFLOW_METRIC not in metrics:
        logger.warning("TrainerConfig.dropless_fallback: no MoE layer of this model has a "
                       "ragged receive buffer (dispatch='ragged' with the ragged or emulated "
                       "exchange under expert parallelism): nothing can overflow, no fallback")
      return new, metrics

    return self.partitioner.jit(
        train_step, in_shardings=(self.state_shardings, self._batch_shardings(batch)),
        out_shardings=(self.state_shardings, self.partitioner.replicated), donate_argnums=(0,))

  def _loss_and_grads(self, params: Any, batch: Mapping[str, Any], rng: jax.Array, *,
                      num_microbatches: int | None = None):
    """``((loss, metrics), grads)``: one pass, or accumulated over microbatches."""
    n = num_microbatches or self.config.num_microbatches
    if n == 1:
      return jax.value_and_grad(self.model.loss_fn, has_aux=True)(params, batch, rng)
    from moe_jax.train import losses, microbatch

    loss_config = getattr(self.model, "loss_config", None)
    token_weighted = (getattr(loss_config, "loss_normalizing_factor", losses.NUM_TARGET_TOKENS)
                      == losses.NUM_TARGET_TOKENS)
    axes = self.partitioner.batch_axes

    def constrain(x):
      spec = jax.sharding.PartitionSpec(None, axes, *([None] * (x.ndim - 2)))
      return jax.lax.with_sharding_constraint(x, self.partitioner.sharding(spec))

    return microbatch.accumulate_gradients(
        self.model.loss_fn, params, batch, rng, num_microbatches=n,
        trainable_mask=self.optimizer.trainable_mask, token_weighted=token_weighted,
        constrain=constrain)

  def _check_microbatches(self, batch: Mapping[str, Any], n: int | None = None) -> None:
    n, shards = n or self.config.num_microbatches, self.partitioner.num_batch_shards
    rows = np.shape(next(iter(batch.values())))[0] * (
        1 if isinstance(next(iter(batch.values())), jax.Array) else jax.process_count())
    if n > 1 and rows % (n * shards):
      raise ValueError(f"TrainerConfig.num_microbatches={n} (or fallback_microbatches): the "
                       f"global batch of {rows} rows "
                       f"does not split into {n} microbatches over {shards} batch shards; use a "
                       f"batch size that is a multiple of {n * shards}")

  def train_step(self, state: TrainState, batch: Mapping[str, Any]
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on a sharded (or per-process numpy) batch.

    With ``TrainerConfig.dropless_fallback`` the host reads one flag of the
    step (a sync per step) and, if a MoE receive buffer overflowed, re-runs
    the batch on the unchanged state with worst-case buffers.
    """
    key, batch = self._prepare(batch)
    if key not in self._steps:
      self._check_microbatches(batch)
      self._steps[key] = self._make_train_step(batch)
    state, metrics = self._steps[key](state, batch)
    if FALLBACK_METRIC in metrics and bool(jax.device_get(metrics[FALLBACK_METRIC])):
      state, metrics = self._fallback_step(key, state, batch, metrics.get(LOAD_METRIC))
    return state, metrics

  def _fallback_step(self, key: tuple, state: TrainState, batch: Mapping[str, Any],
                     load: jax.Array | None = None) -> tuple[TrainState, dict[str, Any]]:
    """The batch again on the kept state, every MoE layer with its worst-case buffer."""
    if key not in self._fallbacks:
      self._check_microbatches(batch, self._fallback_microbatches())
      self._fallbacks[key] = self._make_train_step(batch, fallback=True)
    if self.fallback_steps == 0:
      needed = "" if load is None else (
          f" (the busiest layer was sent {float(jax.device_get(load)):.3f}x its balanced "
          f"load; {LOAD_METRIC} logs it per step: a ragged_buffer_factor above it fits)")
      logger.warning("step %d: a MoE receive buffer overflowed%s; re-running the step with "
                     "worst-case buffers (ragged_buffer_factor=None, %d microbatches); later "
                     "ones are counted by %s", int(jax.device_get(state.step)) + 1, needed,
                     self._fallback_microbatches(), FALLBACK_METRIC)
    with worst_case_buffers():
      state, metrics = self._fallbacks[key](state, batch)
    self.fallback_steps += 1
    return state, {**metrics, FALLBACK_METRIC: 1.0}

  def eval_step(self, params: Any, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Loss metrics of one batch without RNG (no jitter, no dropout)."""
    key, batch = self._prepare(batch)
    if key not in self._evals:
      model = self.model
      self._evals[key] = self.partitioner.jit(
          lambda p, b: model.loss_fn(p, b)[1],
          in_shardings=(self.state_shardings.params, self._batch_shardings(batch)),
          out_shardings=self.partitioner.replicated)
    with self._eval_buffers():
      return self._evals[key](params, batch)

  def score_batch(self, params: Any, batch: Mapping[str, Any]) -> np.ndarray:
    """``[B]`` per-example log-likelihoods (``BaseModel.score_batch``), jitted and sharded."""
    batch = {k: v for k, v in batch.items() if k != "decoder_causal_attention"}
    key, batch = self._prepare(batch)
    if key not in self._scores:
      model = self.model
      self._scores[key] = self.partitioner.jit(
          model.score_batch,
          in_shardings=(self.state_shardings.params, self._batch_shardings(batch)),
          out_shardings=self.partitioner.replicated)
    with self._eval_buffers():
      return np.asarray(self._scores[key](params, batch))

  def _eval_buffers(self):
    """Evaluation of a ``dropless_fallback`` run is dropless too (no backward: it fits)."""
    return worst_case_buffers() if self.config.dropless_fallback else contextlib.nullcontext()

  # -- loop --------------------------------------------------------------------

  def train(self, state: TrainState, batches: Iterator[Mapping[str, Any]], *,
            checkpointer: Any = None, data_iterator: Any = None,
            eval_fn: Callable[[TrainState], None] | None = None) -> TrainState:
    """Trains until ``config.num_train_steps``; returns the final state.

    Args:
      state: the starting state (its ``step`` says where the loop starts).
      batches: per-process numpy batches (e.g. a ``DataIterator``).
      checkpointer: a :class:`~moe_jax.checkpoints.orbax.Checkpointer`;
        saves every ``save_every`` steps and at the end.
      data_iterator: saved with each checkpoint (default ``batches`` if it
        has ``save``).
      eval_fn: called with the state every ``eval_every`` steps and at the end.
    """
    from tqdm.auto import tqdm

    c = self.config
    if data_iterator is None and hasattr(batches, "save"):
      data_iterator = batches
    step = int(jax.device_get(state.step))
    end = c.num_train_steps
    bar = tqdm(total=end, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not c.progress_bar or jax.process_index() != 0 or step >= end)
    self.writer.bar = bar
    pending: list[tuple[int, dict]] = []
    timer = [time.perf_counter(), 0]  # last flush time, steps since

    def flush():
      if pending:
        self._log(pending, timer, bar)
        pending.clear()

    def save(force=False):
      flush()
      checkpointer.save(step, params=state.params, opt_state=state.opt_state,
                        data_iterator=data_iterator, force=force)

    try:
      while step < end:
        try:
          batch = next(batches)
        except StopIteration:
          raise RuntimeError(f"the training data ran out after step {step} (of {end}); "
                             "use num_epochs=None for training data") from None
        state, metrics = self.train_step(state, batch)
        step += 1
        timer[1] += 1
        pending.append((step, metrics))
        if c.check_finite_every_step:
          self._check_finite(pending[-1:])
        if step % c.log_every == 0:
          flush()
        if checkpointer is not None and checkpointer.should_save(step) and step < end:
          save()
        if eval_fn is not None and c.eval_every and step % c.eval_every == 0 and step < end:
          flush()
          eval_fn(state)
          timer[0] = time.perf_counter()
      flush()
      if c.dropless_fallback:
        logger.info("dropless fallback: %d step(s) re-ran with worst-case MoE buffers",
                    self.fallback_steps)
      if checkpointer is not None and step > 0:
        save(force=True)  # before the final evaluation: a failing eval loses no training
      if eval_fn is not None and step > 0:
        eval_fn(state)
      if checkpointer is not None:
        checkpointer.wait_until_finished()
    finally:
      bar.close()
      self.writer.bar = None
    return state

  def _check_finite(self, pending: list[tuple[int, dict]], host=None) -> list[dict]:
    host = jax.device_get([m for _, m in pending]) if host is None else host
    watched = ("loss", "grad_norm", "z_loss", "cross_entropy")
    for (step, _), m in zip(pending, host):
      bad = {k: float(v) for k, v in m.items()
             if (k in watched or k.startswith("aux_loss")) and np.ndim(v) == 0
             and not np.isfinite(v)}
      if bad:
        values = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        raise NonFiniteError(
            f"step {step}: non-finite {', '.join(sorted(bad))} ({values}). Training stopped "
            "before this state was checkpointed; lower the learning rate, enable "
            "OptimizerConfig.clip_grad_norm or the z-loss, or check the data of this step.")
    return host

  def _log(self, pending: list[tuple[int, dict]], timer: list, bar) -> None:
    host = self._check_finite(pending)
    now = time.perf_counter()
    elapsed = max(now - timer[0], 1e-9)
    n_steps = timer[1]
    timer[0], timer[1] = now, 0
    keys = set().union(*(m.keys() for m in host))
    avg = {k: _mean([m[k] for m in host if k in m]) for k in keys}
    tokens = float(sum(m.get("num_tokens", 0.0) for m in host))
    avg.pop("num_tokens", None)
    if FALLBACK_METRIC in keys:  # a count, not a mean
      avg[FALLBACK_METRIC] = float(sum(m.get(FALLBACK_METRIC, 0.0) for m in host))
    for k in keys.intersection(MAX_METRICS):  # the buffer must hold the busiest step
      avg[k] = float(max(m[k] for m in host if k in m))
    avg["learning_rate"] = float(host[-1]["learning_rate"])
    avg["steps_per_sec"] = n_steps / elapsed
    avg["step_time"] = elapsed / max(n_steps, 1)
    avg["tokens_per_sec"] = tokens / elapsed
    step = pending[-1][0]
    self.writer.write(step, "train", avg)
    bar.update(step - bar.n)
    bar.set_postfix(loss=f"{avg['loss']:.4f}", refresh=False)

  # -- evaluation --------------------------------------------------------------

  def evaluate_loss(self, params: Any, batches: Iterator[Mapping[str, Any]],
                    num_batches: int | None = None) -> dict[str, float]:
    """Mean loss metrics over up to ``num_batches`` batches (token-weighted accuracy)."""
    results = []
    for i, batch in enumerate(batches):
      if num_batches is not None and i >= num_batches:
        break
      results.append(self.eval_step(params, batch))
    if not results:
      raise ValueError("evaluate_loss: the evaluation data is empty")
    host = jax.device_get(results)
    tokens = np.array([m["num_tokens"] for m in host], np.float64)
    out = {}
    for k in host[0]:
      if k == "num_tokens":
        continue
      vals = np.array([m[k] for m in host], np.float64)
      out[k] = float(np.sum(vals * tokens) / max(tokens.sum(), 1.0)) if k == "accuracy" \
          else _mean(vals)
    out["num_tokens"] = float(tokens.sum())
    out["num_batches"] = len(host)
    return out


def _mean(values) -> Any:
  """Mean over steps / batches: a float, or a float64 array for vector metrics (expert usage)."""
  m = np.mean(np.asarray(values, np.float64), axis=0)
  return float(m) if np.ndim(m) == 0 else m
