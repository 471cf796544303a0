"""Metric writers: TensorBoard event files read back with TensorBoard's own reader, W&B opt-in."""

import json
import sys
import types

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from moe_jax.models.moe_decoder import MoeDecoderConfig
from moe_jax.moe.layer import MoeConfig
from moe_jax.train import metric_writers
from moe_jax.train.partitioner import PartitionerConfig
from moe_jax.train.run import train
from moe_jax.train.trainer import DatasetConfig, TrainerConfig
from moe_jax.train.optimizers import OptimizerConfig, ScheduleConfig
from moe_jax.train.wrappers import DecoderOnlyModel

# Four layers, MoE every other one, scanned: layers 1 and 3 are block_1 at scan steps 0 and 1.
CONFIG = MoeDecoderConfig(vocab_size=384, d_model=16, num_layers=4, num_heads=2, d_ff=32,
                          scan_layers=True, moe_layout="every_other",
                          moe=MoeConfig(num_experts=4, num_selected=2))
STEPS = 4


class _FakeWandb(types.ModuleType):
  """Records what a ``wandb`` module is asked to do."""

  def __init__(self):
    super().__init__("wandb")
    self.calls = []

  def init(self, **kw):
    self.calls.append(("init", kw))
    return object()

  def log(self, data, step=None):
    self.calls.append(("log", dict(data), step))

  def finish(self):
    self.calls.append(("finish",))

  class Histogram:
    def __init__(self, np_histogram):
      self.counts, self.edges = np_histogram


def _dataset(split):
  return DatasetConfig(mixture_or_task_name="synthetic_lm_text",
                       task_feature_lengths={"targets": 32}, batch_size=8, seed=3, split=split)


def _run(model_dir, **trainer):
  return train(model=DecoderOnlyModel(CONFIG), train_dataset=_dataset("train"),
               eval_dataset=_dataset("validation"), model_dir=str(model_dir),
               trainer=TrainerConfig(num_train_steps=STEPS, log_every=1, eval_every=2, eval_steps=1,
                                     progress_bar=False, **trainer),
               optimizer=OptimizerConfig(name="adamw",
                                         schedule=ScheduleConfig(lr=1e-2, warmup_steps=2)),
               partitioner=PartitionerConfig(data=2))


def _events(run_dir):
  acc = event_accumulator.EventAccumulator(
      str(run_dir), size_guidance={event_accumulator.SCALARS: 0,
                                   event_accumulator.HISTOGRAMS: 0})
  acc.Reload()
  return acc


def _scalars(acc, tag):
  return {e.step: e.value for e in acc.Scalars(tag)}


def test_training_run_writes_tensorboard_events_and_wandb(tmp_path, monkeypatch):
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  _run(tmp_path, wandb_project="moe-test")
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_rows = {r["step"]: r for r in rows if r["split"] == "train"}
  eval_rows = {r["step"]: r for r in rows if r["split"] == "validation"}
  assert sorted(train_rows) == list(range(1, STEPS + 1)) and sorted(eval_rows) == [2, 4]
  assert list((tmp_path / "train").glob("events.out.tfevents.*"))
  assert list((tmp_path / "eval").glob("events.out.tfevents.*"))

  # Train: every logged scalar of every step, as in metrics.jsonl (TensorBoard stores float32).
  acc = _events(tmp_path / "train")
  tags = set(acc.Tags()["scalars"])
  moe = [f"router/layer_{i}/mlp/{m}" for i in (1, 3)
         for m in ("load_balancing_loss", "router_z_loss", "router_confidence")]
  wanted = ["loss", "learning_rate", "grad_norm", "step_time", "tokens_per_sec", "accuracy",
            "aux_loss", "model/load_balancing_loss", *moe]
  assert set(wanted) <= tags, sorted(set(wanted) - tags)
  assert not any(t.startswith(("router/layer_0/", "router/layer_2/")) for t in tags)  # dense
  for tag in wanted:
    got = _scalars(acc, tag)
    assert sorted(got) == sorted(train_rows), tag
    np.testing.assert_allclose([got[s] for s in sorted(got)],
                               [train_rows[s][tag] for s in sorted(got)], rtol=1e-6, err_msg=tag)
  assert len({train_rows[s]["learning_rate"] for s in train_rows}) > 1  # warm-up: values move
  assert all(train_rows[s]["tokens_per_sec"] > 0 for s in train_rows)

  # Expert usage: one histogram per MoE layer and step; bucket e holds expert e's fraction.
  assert {"router/layer_1/mlp/expert_usage", "router/layer_3/mlp/expert_usage"} <= set(
      acc.Tags()["histograms"])
  for layer in (1, 3):
    tag = f"router/layer_{layer}/mlp/expert_usage"
    events = acc.Histograms(tag)
    assert [e.step for e in events] == list(range(1, STEPS + 1))
    for e in events:
      h = e.histogram_value
      usage = train_rows[e.step][tag]
      assert len(usage) == CONFIG.moe.num_experts
      np.testing.assert_allclose(h.bucket, usage, rtol=1e-6)
      np.testing.assert_allclose(h.bucket_limit, np.arange(4) + 0.5)
      assert h.min == -0.5 and h.max == 3.5
      dropped = train_rows[e.step][f"router/layer_{layer}/mlp/dropped_fraction"]
      np.testing.assert_allclose(sum(usage), 1.0 - dropped, rtol=1e-5)  # capacity drops
  # The two layers route differently (they really are two layers' metrics).
  assert train_rows[1]["router/layer_1/mlp/expert_usage"] != \
      train_rows[1]["router/layer_3/mlp/expert_usage"]

  # Eval: the validation loss rows of steps 2 and 4, with the same tags as train (overlaid).
  eval_acc = _events(tmp_path / "eval")
  for tag in ("loss", "accuracy", "router/layer_1/mlp/load_balancing_loss"):
    got = _scalars(eval_acc, tag)
    assert sorted(got) == [2, 4], tag
    np.testing.assert_allclose([got[2], got[4]], [eval_rows[2][tag], eval_rows[4][tag]],
                               rtol=1e-6)
  assert "router/layer_3/mlp/expert_usage" in eval_acc.Tags()["histograms"]

  # Weights & Biases: one run, every row logged at its step, finished at the end.
  assert fake.calls[0][0] == "init" and fake.calls[0][1]["project"] == "moe-test"
  assert fake.calls[-1] == ("finish",)
  assert sum(c[0] == "init" for c in fake.calls) == 1
  logs = [c for c in fake.calls if c[0] == "log"]
  train_logs = {step: data for _, data, step in logs if "train/loss" in data}
  assert sorted(train_logs) == list(range(1, STEPS + 1))
  for s, data in train_logs.items():
    assert data["train/loss"] == pytest.approx(train_rows[s]["loss"], rel=1e-9)
    assert data["train/grad_norm"] == pytest.approx(train_rows[s]["grad_norm"], rel=1e-9)
    np.testing.assert_allclose(data["train/router/layer_3/mlp/expert_usage"].counts,
                               train_rows[s]["router/layer_3/mlp/expert_usage"])
  assert sorted(step for _, data, step in logs if "validation/loss" in data) == [2, 4]


def test_missing_wandb_is_an_error_before_training(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
  with pytest.raises(ImportError, match=r"wandb_project='p'.*pip install wandb"):
    _run(tmp_path / "run", wandb_project="p")
  assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_tensorboard_can_be_turned_off(tmp_path):
  kinds = lambda w: [type(x).__name__ for x in w.writers]  # noqa: E731
  assert kinds(metric_writers.make_metric_writer(tmp_path)) == ["JsonlWriter",
                                                                "TensorBoardWriter"]
  assert kinds(metric_writers.make_metric_writer(tmp_path, tensorboard=False)) == ["JsonlWriter"]
  assert kinds(metric_writers.make_metric_writer(None)) == ["JsonlWriter"]  # no model_dir
  assert TrainerConfig(num_train_steps=1).tensorboard  # on by default, like t5x

  # Both options are TrainerConfig fields: gin binds them like any other.
  import gin

  from moe_jax.cli import configurables
  configurables.parse_gin([], ["TrainerConfig.tensorboard = False",
                               "TrainerConfig.wandb_project = 'proj'"], finalize=False)
  try:
    config = gin.get_configurable("train.TrainerConfig")(num_train_steps=1)
  finally:
    gin.clear_config()
  assert (config.tensorboard, config.wandb_project) == (False, "proj")


def test_resumed_run_replaces_the_killed_runs_later_rows(tmp_path):
  w = metric_writers.TensorBoardWriter(tmp_path)
  for step in (1, 2, 3):
    w.write(step, "train", {"loss": float(step), "note": "text is skipped"})
  w.write(3, "validation/task_a", {"accuracy": 0.5})
  w.write(0, "init", {"loaded": 3})
  w.close()
  resumed = metric_writers.TensorBoardWriter(tmp_path)  # a run resumed from step 1's checkpoint
  resumed.drop_rows_after(1)
  for step in (2, 3, 4):
    resumed.write(step, "train", {"loss": 10.0 * step})
  resumed.close()
  acc = _events(tmp_path / "train")
  assert _scalars(acc, "loss") == {1: 1.0, 2: 20.0, 3: 30.0, 4: 40.0}
  assert acc.Tags()["scalars"] == ["loss"]
  assert _scalars(_events(tmp_path / "eval"), "task_a/accuracy") == {3: 0.5}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "train"]  # no "init" dir
