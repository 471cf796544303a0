"""Orbax checkpoints: exact resume (params, optimizer, data position), NaN stop, load_latest."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.checkpoints import CheckpointError, assignment, orbax
from moe_jax.checkpoints.native import flatten
from moe_jax.models.decoder import DecoderConfig
from moe_jax.train import trainer as trainer_lib
from moe_jax.train.run import train
from moe_jax.train.wrappers import DecoderOnlyModel
from moe_jax.train.optimizers import OptimizerConfig, ScheduleConfig, make_optimizer
from moe_jax.train.partitioner import Partitioner, PartitionerConfig

CONFIG = DecoderConfig(vocab_size=384, d_model=16, num_layers=1, num_heads=2, d_ff=32)


def _run(model_dir, steps, seen):
  return train(
      model=DecoderOnlyModel(CONFIG),
      train_dataset=trainer_lib.DatasetConfig(
          mixture_or_task_name="synthetic_lm_text", task_feature_lengths={"targets": 32},
          batch_size=8, seed=3),
      model_dir=str(model_dir),
      trainer=trainer_lib.TrainerConfig(num_train_steps=steps, log_every=1, progress_bar=False),
      optimizer=OptimizerConfig(name="adamw", schedule=ScheduleConfig(lr=1e-2, warmup_steps=2)),
      partitioner=PartitionerConfig(data=2),
      checkpoint=orbax.CheckpointConfig(save_every=2, keep=2))


def _losses(model_dir):
  rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_resume_is_exact(tmp_path, monkeypatch):
  seen: list[bytes] = []
  original = trainer_lib.Trainer.train_step

  def recording(self, state, batch):
    seen.append(b"".join(np.asarray(batch[k]).tobytes() for k in sorted(batch)))
    return original(self, state, batch)

  monkeypatch.setattr(trainer_lib.Trainer, "train_step", recording)
  straight = jax.device_get(_run(tmp_path / "a", 4, seen))
  batches_a = list(seen)
  seen.clear()
  _run(tmp_path / "b", 2, seen)
  assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["2"]
  resumed = jax.device_get(_run(tmp_path / "b", 4, seen))  # restores step 2 and its data position
  assert len(batches_a) == 4 and seen == batches_a  # the same batches, in the same order
  assert int(resumed.step) == 4
  for a, b in zip(jax.tree.leaves((straight.params, straight.opt_state)),
                  jax.tree.leaves((resumed.params, resumed.opt_state))):
    np.testing.assert_array_equal(a, b)  # bit-identical
  assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
  assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["2", "4"]

  # The training directory is a model directory: config + newest params.
  loaded = orbax.load_latest(tmp_path / "a")
  assert loaded.config == CONFIG
  jax.tree.map(np.testing.assert_array_equal, loaded.params, straight.params)
  older = orbax.load_latest(tmp_path / "a", step=2, dtype="bfloat16")
  assert older.config.param_dtype == "bfloat16"
  assert older.params["embed"]["embedding"].dtype == jnp.bfloat16
  assert (tmp_path / "a" / "model_config.json").exists()
  assert flatten(straight.params).keys() == \
      assignment.load_source_params(tmp_path / "a").keys()
  with pytest.raises(CheckpointError, match="no step 3"):
    orbax.load_latest(tmp_path / "a", step=3)

  # python -m moe_jax.eval on the training directory: validation loss at step 4.
  from moe_jax.cli import eval as eval_cli
  assert eval_cli.main([
      "--gin_file=runs/eval.gin", f"--checkpoint={tmp_path / 'a'}",
      "--gin.MIXTURE_OR_TASK_NAME='synthetic_lm_text'", "--gin.BATCH_SIZE=8",
      "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.EVAL_STEPS=2",
      "--gin.INFER_EVAL=None"]) == 0
  rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["split"] == "validation" and rows[-1]["step"] == 4
  assert rows[-1]["num_batches"] == 2 and np.isfinite(rows[-1]["loss"])


class _NanAtToken7(DecoderOnlyModel):
  """A model whose loss is NaN on batches starting with token 7."""

  def loss_fn(self, params, batch, rng=None):
    loss, metrics = super().loss_fn(params, batch, rng)
    bad = batch["decoder_input_tokens"][0, 0] == 7
    loss = jnp.where(bad, jnp.nan, loss)
    metrics["loss"] = loss
    return loss, metrics


def test_nan_loss_stops_before_checkpointing(tmp_path, numpy_params, place):
  model = _NanAtToken7(CONFIG)
  params = numpy_params(model)
  opt = make_optimizer(OptimizerConfig(name="adamw"), params)
  tr = trainer_lib.Trainer(
      model=model, optimizer=opt, partitioner=Partitioner(PartitionerConfig(),
                                                          devices=jax.devices()[:1]),
      config=trainer_lib.TrainerConfig(num_train_steps=5, log_every=10, progress_bar=False))
  rng = np.random.default_rng(0)
  batches = []
  for i in range(5):
    t = rng.integers(8, 300, (2, 8)).astype(np.int32)
    t[0, 0] = 7 if i == 2 else 8
    batches.append({"decoder_input_tokens": t, "decoder_target_tokens": t,
                    "decoder_loss_weights": np.ones_like(t)})
  ckpt = orbax.Checkpointer(tmp_path, orbax.CheckpointConfig(save_every=2, async_save=False))
  with pytest.raises(trainer_lib.NonFiniteError, match=r"step 3: non-finite .*loss"):
    tr.train(place(tr, params), iter(batches), checkpointer=ckpt)
  ckpt.close()
  assert ckpt.all_steps() == [2]
